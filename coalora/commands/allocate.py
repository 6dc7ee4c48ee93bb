"""``coalora allocate``: bit budgets -> quantization configuration files (SPEC §2.5).

One budget writes ``--out FILE``; several write ``<budget>bits.json`` files into ``--out-dir``. The error
table is cached (``--cache-dir``, ``$COALORA_CACHE`` or ``~/.cache/coalora``), so only the first run on a
backbone pays for it. ``--fisher-glue-task`` weighs errors by an empirical Fisher from that task's
training sentences.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from coalora.checks import FINITE, POSITIVE_INT, arg, check_output_dir, check_output_file
from coalora.errors import CoaloraError
from coalora.pretrained import DEFAULT_MODEL
from coalora.quant.codebooks import CODE_FAMILIES
from coalora.quant.options import BITS_CHOICES, OPTION_SPACE
from coalora.utils import budget_label


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"backbone name or folder (default: {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--budget",
        type=arg(FINITE),
        nargs="+",
        required=True,
        help="average bits per weight, e.g. 3.0",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help="qconfig file to write (one budget)")
    where.add_argument("--out-dir", default=None, help="folder for one <budget>bits.json per budget")
    fisher = parser.add_mutually_exclusive_group()
    fisher.add_argument(
        "--fisher-glue-task", default=None, help="weigh errors by a Fisher from this task's text"
    )
    fisher.add_argument(
        "--fisher-text",
        nargs="+",
        default=None,
        help="weigh errors by a Fisher from these text files or folders (.txt, .jsonl, .json.gz): decoders",
    )
    parser.add_argument(
        "--glue-dir", default=None, help="local GLUE folder (default: $GLUE_DIR or ../shared/data)"
    )
    parser.add_argument(
        "--fisher-samples", type=arg(POSITIVE_INT), default=256, help="sentences for the Fisher (default 256)"
    )
    parser.add_argument(
        "--codes", choices=CODE_FAMILIES, default="nf", help="code family: NormalFloat or int"
    )
    parser.add_argument("--cache-dir", default=None, help="error-table cache (default: $COALORA_CACHE)")


def _outputs(args: argparse.Namespace) -> list[Path | None]:
    """Where each budget's configuration goes (None: print only)."""
    budgets = args.budget
    labels = [budget_label(b, decimals=4) for b in budgets]
    twice = [label for i, label in enumerate(labels) if label in labels[:i]]
    if twice:
        raise CoaloraError(f"--budget {twice[0]} is given twice; give each budget once")
    if args.out is not None:
        if len(budgets) != 1:
            raise CoaloraError(
                f"--out takes one budget but got {len(budgets)}; use --out-dir DIR for several"
            )
        return [check_output_file(args.out, "--out")]
    if args.out_dir is not None:
        folder = check_output_dir(args.out_dir, "--out-dir")
        return [check_output_file(folder / f"{label}bits.json", "--out-dir file") for label in labels]
    return [None] * len(budgets)


def _fisher_texts(args: argparse.Namespace) -> list[str] | None:
    if args.fisher_text is not None:
        from coalora.data.glue_files import default_glue_dir
        from coalora.data.text_files import read_documents

        folder = Path(args.glue_dir) if args.glue_dir else default_glue_dir()
        return read_documents(args.fisher_text, folder)
    if args.fisher_glue_task is None:
        if args.glue_dir is not None:
            raise CoaloraError(
                "--glue-dir only matters with --fisher-glue-task or --fisher-text; add one or drop --glue-dir"
            )
        return None
    from coalora.data.glue import get_task
    from coalora.data.glue_files import load_split

    spec = get_task(args.fisher_glue_task)
    rows = load_split(spec.name, "train", glue_dir=args.glue_dir)
    return [" ".join(str(row[field]) for field in spec.text_fields) for row in rows]


def run(args: argparse.Namespace) -> int:
    from coalora.quant.allocate import allocate, check_budget, model_error_table, total_error

    for budget in args.budget:
        check_budget(budget)
    outputs = _outputs(args)
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache-dir")
    texts = _fisher_texts(args)
    start = time.perf_counter()
    space, table = model_error_table(args.model, texts, args.codes, args.cache_dir, args.fisher_samples)
    source = args.fisher_glue_task or (args.fisher_text and ", ".join(args.fisher_text))
    kind = "plain" if texts is None else f"Fisher ({source})"
    print(
        f"{args.model}: {len(space)} matrices x {len(OPTION_SPACE)} options, {kind} {args.codes} error table "
        f"ready in {time.perf_counter() - start:.1f} s"
    )
    bit_columns = "".join(f"{f'{b}b':>4}" for b in BITS_CHOICES)
    print(f"{'budget':>7} {'avg_bits':>9} {'total_error':>12} {'time_s':>7} {bit_columns}  file")
    for budget, path in zip(args.budget, outputs, strict=True):
        start = time.perf_counter()
        config = allocate(space, table, budget)
        seconds = time.perf_counter() - start
        avg = space.avg_bits(config)
        if path is not None:
            space.save(config, path)
        counts = Counter(option.bits for option in config.matrices.values())
        histogram = "".join(f"{counts.get(b, 0):>4}" for b in BITS_CHOICES)
        error = total_error(space, table, config)
        print(f"{budget:>7.3f} {avg:>9.4f} {error:>12.5g} {seconds:>7.2f} {histogram}  {path or '-'}")
    return 0
