"""``coalora demo``: the main job on the embedded default — train CoA-LoRA on SST-2 with the packaged
MiniLM (offline), then evaluate the last checkpoint at 2.5/3.0/3.5/4.0 bits plus random unseen
configurations, writing the table (JSON, CSV) and the plot."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from coalora import utils
from coalora.checks import COUNT, arg, check_output_dir
from coalora.errors import CoaloraError

DEFAULT_CONFIG = "configs/sst2_minilm.yaml"
#: unknown flags (e.g. ``--trainer.max_epochs 1``) are handed to LightningCLI as overrides
ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"LightningCLI config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--out", default="runs/demo", help="run folder (checkpoints, logs, eval/)")
    parser.add_argument(
        "--random", type=arg(COUNT), default=8, help="random unseen configurations to evaluate too"
    )


def find_config(name: str | None) -> Path:
    """The demo config: as given, else in ./configs, else beside the installed package's repository."""
    candidates = (
        [Path(name)] if name else [Path(DEFAULT_CONFIG), Path(__file__).resolve().parents[2] / DEFAULT_CONFIG]
    )
    for path in candidates:
        if path.is_file():
            return path
    raise CoaloraError(f"config {candidates[0]} not found; run from the repository root or pass --config")


def precision_flags(overrides: list[str]) -> list[str]:
    """fp32 training where this CPU has no native bf16 (the shipped bf16-mixed is many times slower
    there), unless the user chose a precision; CUDA machines keep the config's precision."""
    import torch

    if torch.cuda.is_available() or utils.cpu_has_native_bf16():
        return []
    if any(flag.split("=", 1)[0] == "--trainer.precision" for flag in overrides):
        return []
    return ["--trainer.precision", "32-true"]


def run(args: argparse.Namespace) -> int:
    from coalora.cli import lightning_main
    from coalora.commands import evaluate

    config = find_config(args.config)
    out = check_output_dir(args.out, "--out")
    precision = precision_flags(args.overrides)
    if precision:
        print(
            "this CPU has no native bf16 (AVX512-BF16/AMX): the demo trains and evaluates in fp32", flush=True
        )
    start = time.perf_counter()
    cli = lightning_main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.save_dir",
            str(out),
            *precision,
            *args.overrides,
        ]
    )
    fit_seconds = time.perf_counter() - start
    checkpoint = cli.trainer.checkpoint_callback
    # the last checkpoint, never one selected on dev: dev is the split this reports
    last = checkpoint.last_model_path if checkpoint else ""
    if not last:
        raise CoaloraError(
            "training wrote no last checkpoint; keep ModelCheckpoint (save_last: true) in the config"
        )
    print(f"trained in {fit_seconds / 60:.1f} min; evaluating {last}", flush=True)
    parser = argparse.ArgumentParser(prog="coalora evaluate")  # evaluate's own defaults: no drift
    evaluate.add_arguments(parser)
    flags = ["--ckpt", str(last), "--random", str(args.random), "--seen", "4", "--out", str(out / "eval")]
    eval_precision = "32" if precision else "bf16"
    eval_args = parser.parse_args([*flags, "--batch-size", "128", "--precision", eval_precision])
    evaluate.run(eval_args)
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min; results in {out / 'eval'}")
    return 0
