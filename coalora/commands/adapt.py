"""``coalora adapt``: a checkpoint and a configuration in, a self-contained deployable model out.

The configuration comes from a bit budget (the allocator), a qconfig file, or a byte budget (the
least-error configuration whose weights fit). qlora/lqlora/fp checkpoints need none: they are exported at
the one configuration they were trained for (fp: full precision). ``--format peft`` writes a dequantized
Hugging Face base model and a standard PEFT LoRA adapter instead of the compact artifact; ``--format gguf``
writes a LLaMA run as llama.cpp's ``model.gguf`` + ``adapter.gguf`` (:mod:`coalora.deploy.gguf_adapt`).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from coalora.checks import FINITE, arg, check_input_files, check_output_dir
from coalora.errors import CoaloraError
from coalora.quant.allocate import check_budget
from coalora.quant.rounding import ROUNDINGS

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'5000000', '4.5MB', '3MiB' -> bytes (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a byte count; write e.g. 5000000, 4.5MB or 3MiB")
    count = int(float(match.group(1)) * _UNITS[unit])
    if count <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive byte count, got '{text}'")
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `coalora fit`")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--budget", type=arg(FINITE), default=None, help="average bits per weight, e.g. 3.0")
    which.add_argument("--qconfig", default=None, help="configuration file (coalora allocate --out)")
    which.add_argument(
        "--max-bytes", type=parse_bytes, default=None, help="byte budget for all weights, e.g. 6MB"
    )
    parser.add_argument("--out", required=True, help="folder to write (replaced only if it is an export)")
    parser.add_argument(
        "--format",
        choices=("coalora", "peft", "gguf"),
        default="coalora",
        help="coalora: packed low-bit artifact (default); peft: dequantized base + PEFT adapter; gguf: "
        "llama.cpp model.gguf + adapter.gguf (LLaMA runs; with --gguf-type or --budget)",
    )
    parser.add_argument(
        "--gguf-type",
        default=None,
        help="with --format gguf: one llama.cpp type for every target, e.g. Q4_K (K-quants fall back per "
        "tensor where rows are not multiples of 256); or give --budget to allocate types per tensor",
    )
    parser.add_argument(
        "--embedding-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of the stored embedding tables (float16 halves a small encoder's artifact)",
    )
    parser.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default=None,
        help="how the configuration is rounded (default: the run's own; gptq calibrates on its training "
        "data, --glue-dir says where that is now)",
    )
    parser.add_argument("--glue-dir", default=None, help="the run's data folder, if it moved (for gptq)")


def run(args: argparse.Namespace) -> int:
    from coalora.deploy.export import export
    from coalora.deploy.files import check_replaceable
    from coalora.tasks.checkpoint import load_task

    if args.format == "gguf":
        return _run_gguf(args)
    if args.gguf_type is not None:
        raise CoaloraError("--gguf-type needs --format gguf")
    if args.budget is not None:
        check_budget(args.budget)
    check_input_files([args.ckpt], "checkpoint", "pass a .ckpt written by `coalora fit`")
    if args.qconfig is not None:
        check_input_files([args.qconfig], "qconfig file", "write one with `coalora allocate --out`")
    if args.glue_dir is not None and not Path(args.glue_dir).expanduser().is_dir():
        raise CoaloraError(f"--glue-dir '{args.glue_dir}' is not a folder; pass the data folder")
    check_replaceable(check_output_dir(args.out, "--out"))  # before minutes of work, not after
    start = time.perf_counter()
    overrides = {} if args.glue_dir is None else {"glue_dir": args.glue_dir, "data_dir": args.glue_dir}
    module = load_task(args.ckpt, args.rounding, overrides)
    loaded = time.perf_counter() - start
    report = export(
        module,
        args.out,
        budget=args.budget,
        qconfig=args.qconfig,
        max_bytes=args.max_bytes,
        format=args.format,
        embedding_dtype=args.embedding_dtype,
    )
    report.timings = {"load checkpoint": loaded, **report.timings}
    print("\n".join(report.lines()))
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    """``--format gguf``: every input checked before the checkpoint is read; nothing half-written."""
    from coalora.deploy.files import check_replaceable
    from coalora.deploy.gguf_adapt import check_gguf_request, export_gguf, summary_lines
    from coalora.deploy.gguf_export import require_gguf
    from coalora.tasks.checkpoint import load_task

    if args.max_bytes is not None:
        raise CoaloraError("--format gguf takes --gguf-type, --budget or --qconfig, not --max-bytes")
    check_gguf_request(args.gguf_type, args.budget, args.qconfig)
    require_gguf()  # the package that writes the files, before the checkpoint is read
    check_input_files([args.ckpt], "checkpoint", "pass a .ckpt written by `coalora fit`")
    if args.qconfig is not None:
        check_input_files(
            [args.qconfig], "qconfig file", "write one with `coalora allocate --codes gguf --out`"
        )
    check_replaceable(check_output_dir(args.out, "--out"))
    module = load_task(args.ckpt, "nearest")  # the base is written from full precision: no calibration
    metadata = export_gguf(
        module, args.out, gguf_kind=args.gguf_type, budget=args.budget, qconfig=args.qconfig
    )
    print("\n".join(summary_lines(metadata, args.out)))
    return 0
