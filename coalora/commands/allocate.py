"""``coalora allocate``: bit budgets -> quantization configuration files (SPEC §2.5).

One budget writes ``--out FILE``; several write ``<budget>bits.json`` files into ``--out-dir``. The error
table is cached (``--cache-dir``, ``$COALORA_CACHE`` or ``~/.cache/coalora``), so only the first run on a
backbone pays for it. ``--error-weighting fisher`` weighs errors by an empirical Fisher, ``activation`` by
each matrix's input statistics (tr(E H Eᵀ)), both from training text: ``--glue-task`` (a GLUE task's
training sentences) or ``--text`` (files). The older ``--fisher-glue-task``/``--fisher-text`` name the same
text and, without ``--error-weighting``, still mean ``fisher``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from coalora.checks import FINITE, POSITIVE_INT, arg, check_output_dir, check_output_file
from coalora.errors import CoaloraError
from coalora.pretrained import DEFAULT_MODEL
from coalora.quant.error_weighting import ERROR_WEIGHTINGS
from coalora.quant.families import family_names, get_family
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
    parser.add_argument(
        "--error-weighting",
        choices=ERROR_WEIGHTINGS,
        default=None,
        help="how the error table weighs each matrix's quantization error: none (plain squared error), "
        "fisher (empirical Fisher of an LM loss on the text) or activation (tr(E H E^T) with H the "
        "matrix's input second moment over the text); fisher and activation need --glue-task or --text "
        "(default: fisher with --fisher-glue-task/--fisher-text, else none)",
    )
    text = parser.add_mutually_exclusive_group()
    text.add_argument(
        "--glue-task", default=None, help="training sentences of this GLUE task, for --error-weighting"
    )
    text.add_argument(
        "--text",
        nargs="+",
        default=None,
        help="text files or folders (.txt, .jsonl, .json.gz) for --error-weighting: decoders",
    )
    text.add_argument(
        "--fisher-glue-task", default=None, help="as --glue-task; implies --error-weighting fisher"
    )
    text.add_argument("--fisher-text", nargs="+", default=None, help="as --text; implies fisher")
    parser.add_argument(
        "--glue-dir", default=None, help="local GLUE folder (default: $GLUE_DIR or ../shared/data)"
    )
    parser.add_argument(
        "--fisher-samples", type=arg(POSITIVE_INT), default=256, help="texts for the Fisher (default 256)"
    )
    parser.add_argument(
        "--calibration-samples",
        type=arg(POSITIVE_INT),
        default=128,
        help="texts for the activation statistics (default 128)",
    )
    parser.add_argument(
        "--codes",
        choices=family_names(trainable=True),
        default="nf",
        help="code family: nf (NormalFloat), int, or gguf (one llama.cpp type per matrix)",
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


def _weighting(args: argparse.Namespace) -> str:
    """The error weighting asked for, checked against the text given (one line on a mismatch)."""
    older = args.fisher_glue_task is not None or args.fisher_text is not None
    given = older or args.glue_task is not None or args.text is not None
    weighting = args.error_weighting
    if weighting is None:
        if given and not older:
            raise CoaloraError(
                "--glue-task/--text give the text for --error-weighting fisher or activation; add one"
            )
        weighting = "fisher" if older else "none"
    if weighting == "none" and given:
        raise CoaloraError(
            "--error-weighting none reads no text; drop --glue-task/--text or choose a weighting"
        )
    if weighting != "none" and not given:
        raise CoaloraError(
            f"--error-weighting {weighting} needs training text; add --glue-task TASK or --text FILE"
        )
    if weighting == "none" and args.glue_dir is not None:
        raise CoaloraError(
            "--glue-dir only matters with --glue-task or --text (and a weighting); add one or drop --glue-dir"
        )
    return weighting


def _texts(args: argparse.Namespace) -> list[str] | None:
    """The training text of --glue-task/--text (or their older --fisher-* names); None without one."""
    files = args.text if args.text is not None else args.fisher_text
    if files is not None:
        from coalora.data.glue_files import default_glue_dir
        from coalora.data.text_files import read_documents

        folder = Path(args.glue_dir) if args.glue_dir else default_glue_dir()
        return read_documents(files, folder)
    task = args.glue_task or args.fisher_glue_task
    if task is None:
        return None
    from coalora.data.glue import get_task
    from coalora.data.glue_files import load_split

    spec = get_task(task)
    rows = load_split(spec.name, "train", glue_dir=args.glue_dir)
    return [" ".join(str(row[field]) for field in spec.text_fields) for row in rows]


def run(args: argparse.Namespace) -> int:
    from coalora.quant.allocate import allocate, check_budget, model_error_table, total_error

    family = get_family(args.codes)
    for budget in args.budget:
        check_budget(budget, family.option_space)
    outputs = _outputs(args)
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache-dir")
    weighting = _weighting(args)
    texts = _texts(args)
    start = time.perf_counter()
    space, table = model_error_table(
        args.model,
        texts,
        args.codes,
        args.cache_dir,
        args.fisher_samples,
        weighting=weighting,
        calibration_samples=args.calibration_samples,
    )
    files = args.text or args.fisher_text
    source = args.glue_task or args.fisher_glue_task or (files and ", ".join(files))
    kind = {"none": "plain", "fisher": f"Fisher ({source})", "activation": f"activation ({source})"}[
        weighting
    ]
    print(
        f"{args.model}: {len(space)} matrices x {len(family.option_space)} options, {kind} {args.codes} "
        f"error table ready in {time.perf_counter() - start:.1f} s"
    )
    # matrices per code width (nf/int), or per type (gguf)
    by_bits = "bits" in family.field_choices
    columns = list(family.field_choices["bits"]) if by_bits else [o.short() for o in family.option_space]
    width = 4 if by_bits else max(len(c) for c in columns) + 1
    header = "".join(f"{f'{c}b' if by_bits else c:>{width}}" for c in columns)
    print(f"{'budget':>7} {'avg_bits':>9} {'total_error':>12} {'time_s':>7} {header}  file")
    for budget, path in zip(args.budget, outputs, strict=True):
        start = time.perf_counter()
        config = allocate(space, table, budget)
        seconds = time.perf_counter() - start
        avg = space.avg_bits(config)
        if path is not None:
            space.save(config, path)
        counts = Counter(o.bits if by_bits else o.short() for o in config.matrices.values())
        histogram = "".join(f"{counts.get(c, 0):>{width}}" for c in columns)
        error = total_error(space, table, config)
        print(f"{budget:>7.3f} {avg:>9.4f} {error:>12.5g} {seconds:>7.2f} {histogram}  {path or '-'}")
    return 0
