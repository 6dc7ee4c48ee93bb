"""The decoder comparison (issue #12) on this CPU: fp-LoRA, QLoRA per budget, Shared-LoRA and CoA-LoRA on the
tiny LLaMA that ``pretrain_tiny_lm.py`` pretrains on SST-2 sentences, fine-tuned on WikiText-2 valid and
reported as WikiText-2 *test* perplexity (nothing is selected on test: every number is from ``last.ckpt``).

    python benchmarks/pretrain_tiny_lm.py          # once: runs/tiny-llama-sst2
    python benchmarks/lm_compare.py                # seeds 42 43 44, resumable
    python benchmarks/lm_compare.py --seeds 42 --only coalora shared

Evaluation configurations: the budgets 2.1 / 2.5 / 3.0 / 4.0 bits (allocated; none is on the training grid
2.25, 2.35, ...) and 10 random configurations over 2.1-4.0 bits drawn once from a fixed seed and kept in
``benchmarks/lm/random/`` (the same for every method and seed). Every run uses
``configs/wikitext_llama_cpu.yaml`` (one epoch over WikiText-2 valid minus the search split, batch 16 x 128
tokens, rank 16, bf16) and differs only in the method. Runs live in ``runs/lm/s<seed>/<run>/`` and are
skipped once their ``done.json`` exists.
Outputs: ``docs/bench/lm_compare.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from eval_reuse import evaluate_once

BASE = "configs/wikitext_llama_cpu.yaml"
MODEL = "runs/tiny-llama-sst2"
BUDGETS = (2.1, 2.5, 3.0, 4.0)
RANDOM_RANGE = (2.1, 4.0)
RANDOM_COUNT = 10
RANDOM_SEED = 2026
SEEDS = (42, 43, 44)
HERE = REPO / "benchmarks" / "lm"
BUDGET_FLAG = "[" + ", ".join(map(str, BUDGETS)) + "]"


def planned_runs() -> list[tuple[str, list[str]]]:
    """(run name, extra flags): the methods of the issue, and the mapper-off ablation."""
    runs = [("fp", ["--config", "configs/baselines/fp.yaml"])]
    for budget in BUDGETS:
        runs.append(
            (
                f"qlora@{budget}",
                ["--config", "configs/baselines/qlora.yaml", "--model.train_budget", str(budget)],
            )
        )
    runs.append(("shared", ["--config", "configs/baselines/shared.yaml"]))
    runs.append(("shared-trainset", ["--model.use_mapper", "false"]))  # CoA-LoRA's training, no mapper
    runs.append(("coalora", []))
    return runs


def _env() -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("GLUE_DIR", str(REPO.parent / "shared" / "data"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(command: list[str], log: Path) -> None:
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=REPO, env=_env(), stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(command[2:5])} ...` failed (exit {result.returncode}); see {log}")


def train(name: str, flags: list[str], root: Path, seed: int) -> dict:
    """Train one run (or reuse it); its done.json record."""
    folder = root / name.replace("@", "_")
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "coalora.cli", "fit", "--config", BASE, *flags]
    command += ["--model.model_name", MODEL, "--model.eval_budgets", BUDGET_FLAG, "--model.seed", str(seed)]
    command += ["--seed_everything", str(seed), "--trainer.limit_val_batches", "0"]
    command += ["--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir", str(folder)]
    command += ["--trainer.enable_progress_bar", "false"]
    print(f"[train] s{seed} {name}", flush=True)
    start = time.perf_counter()
    _run(command, folder / "train.log")
    ckpt = sorted(folder.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    record = {"name": name, "ckpt": str(ckpt), "train_seconds": round(time.perf_counter() - start, 1)}
    done.write_text(json.dumps(record))
    return record


def random_configs(folder: Path = HERE / "random", count: int = RANDOM_COUNT) -> list[Path]:
    """``count`` random configurations over RANDOM_RANGE bits for the tiny LLaMA's matrices, drawn once
    (fixed seed) and kept in ``folder``."""
    files = sorted(folder.glob("random-*.json"))
    if len(files) >= count:
        return files[:count]
    import torch

    from coalora.pretrained import load_causal_lm
    from coalora.quant.qconfig import ConfigSpace
    from coalora.quant.targets import discover_targets

    space = ConfigSpace(discover_targets(load_causal_lm(str(REPO / MODEL))), model=MODEL)
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    low, high = RANDOM_RANGE
    found: list[Path] = []
    while len(found) < count:
        config = space.random_near(low + (high - low) * float(torch.rand(1, generator=generator)), generator)
        if low <= space.avg_bits(config) <= high:
            path = folder / f"random-{len(found):02d}.json"
            space.save(config, path)
            found.append(path)
    return found


def evaluate(record: dict, root: Path, randoms: list[Path]) -> list[dict]:
    """WikiText-2 test perplexity of one run at every configuration it serves (bf16)."""
    flags = ["--split", "test", "--precision", "bf16"]
    if not record["name"].startswith(("fp", "qlora")):
        flags += ["--budgets", *map(str, BUDGETS), "--qconfig", *map(str, randoms)]
    return evaluate_in(record, root / record["name"].replace("@", "_"), flags, record["name"])


def evaluate_in(record: dict, run_folder: Path, flags: list[str], label: str) -> list[dict]:
    """``coalora evaluate`` of ``record``'s checkpoint with ``flags`` into ``run_folder/eval``; an earlier
    eval.json is reused only when it was written under the same flags, checkpoint and qconfig files."""
    folder = run_folder / "eval"

    def run() -> None:
        command = [sys.executable, "-m", "coalora.cli", "evaluate", "--ckpt", record["ckpt"]]
        print(f"[eval] {label}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        _run([*command, "--out", str(folder), *flags], run_folder / "eval.log")

    return evaluate_once(folder, record["ckpt"], flags, run)


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per method: mean ± std over seeds of the test perplexity at each budget and over the random ones."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seeds = sorted({r["seed"] for r in mine})
        entry: dict = {"seeds": seeds, "ppl": {}}
        for label in [*map(str, BUDGETS), "fp"]:
            values = [r["ppl"] for r in mine if r["label"] == label and r["kind"] != "random"]
            if values:
                entry["ppl"][label] = _mean_std(values)
        per_seed = [
            statistics.fmean(r["ppl"] for r in mine if r["seed"] == s and r["kind"] == "random")
            for s in seeds
            if any(r["seed"] == s and r["kind"] == "random" for r in mine)
        ]
        entry["random_mean_ppl"] = _mean_std(per_seed) if per_seed else None
        times = {}
        for r in mine:
            times.setdefault(r["seed"], {})[r["run"]] = r["train_seconds"]
        entry["train_minutes_per_seed"] = round(
            statistics.fmean(sum(t.values()) for t in times.values()) / 60, 2
        )
        out[method] = entry
    return out


def _mean_std(values: list[float]) -> list[float]:
    return [
        round(statistics.fmean(values), 3),
        round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
    ]


def markdown(
    summary: dict[str, dict], first: str = "method", randoms: int = RANDOM_COUNT, fp_column: bool = False
) -> str:
    """The summary as a table; ``fp_column``: the unquantized model in its own column (else an fp run's
    number fills its budget cells)."""

    def cell(value: list[float] | None) -> str:
        return "-" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"

    labels = list(map(str, BUDGETS))
    extra = ["unquantized"] if fp_column else []
    head = [
        first,
        "seeds",
        *(f"ppl@{b}" for b in labels),
        *extra,
        f"mean ppl, {randoms} random",
        "train min/seed",
    ]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for method, s in summary.items():
        fill = None if fp_column else s["ppl"].get("fp")
        at = [cell(s["ppl"].get(b, fill)) for b in labels] + [cell(s["ppl"].get("fp"))] * fp_column
        lines.append(
            f"| {method} | {len(s['seeds'])} | "
            + " | ".join(at)
            + f" | {cell(s['random_mean_ppl'])} | {s['train_minutes_per_seed']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    parser.add_argument(
        "--only", nargs="*", default=None, help="run names as planned (qlora@2.1, coalora, ...)"
    )
    args = parser.parse_args()
    if not (REPO / MODEL).is_dir():
        raise SystemExit(f"{MODEL} does not exist; run `python benchmarks/pretrain_tiny_lm.py` first")
    randoms = random_configs()
    out = REPO / "docs" / "bench" / "lm_compare.json"
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    for seed in args.seeds:
        root = REPO / "runs" / "lm" / f"s{seed}"
        for name, flags in planned_runs():
            if args.only and name not in args.only:
                continue
            record = train(name, flags, root, seed)
            fresh = [
                {
                    "method": name.split("@")[0],
                    "run": name,
                    "seed": seed,
                    "label": r["label"],
                    "kind": "random" if r["kind"] == "qconfig" else r["kind"],
                    "avg_bits": r["avg_bits"],
                    "ppl": r["ppl"],
                    "train_seconds": record["train_seconds"],
                }
                for r in evaluate(record, root, randoms)
            ]
            rows = [r for r in rows if not (r["run"] == name and r["seed"] == seed)] + fresh
            summary = summarise(rows)
            result = {
                "machine": f"{os.cpu_count()} CPU cores (this repo's dev machine)",
                "command": "python benchmarks/lm_compare.py " + " ".join(sys.argv[1:]),
                "model": MODEL,
                "data": "train: WikiText-2 valid (minus 64 search blocks); report: WikiText-2 test",
                "summary": summary,
                "rows": sorted(rows, key=lambda r: (r["method"], r["seed"], r["kind"], r["label"])),
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")  # after every run: partial results survive
            (out.parent / "lm_compare.md").write_text(markdown(summary))
    print(markdown(summarise(rows)))


if __name__ == "__main__":
    main()
