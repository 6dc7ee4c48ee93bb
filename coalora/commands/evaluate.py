"""``coalora evaluate``: one or more checkpoints at budgets, qconfig files, random and seen configurations.

Per-configuration baselines (qlora, lqlora) are evaluated at their own configuration only; CoA-LoRA and
Shared-LoRA at every requested configuration; fp at full precision and, post-training quantized, at every
configuration requested explicitly (``--budgets``, ``--qconfig``, ``--random``). ``--rounding gptq``
rounds each configuration activation-aware (calibrated on the run's training examples). Writes eval.json,
eval.csv and eval.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from coalora.checks import COUNT, FINITE, POSITIVE_INT, SEED, arg, check_input_files, check_output_dir
from coalora.errors import CoaloraError
from coalora.eval.report import format_table, summarise, write_outputs
from coalora.eval.results import EvalResult, evaluate_config
from coalora.quant.allocate import check_budget
from coalora.quant.rounding import ROUNDINGS

if TYPE_CHECKING:
    from coalora.quant.qconfig import QConfig
    from coalora.tasks.base import CoALoRATask


def check_arguments(args: argparse.Namespace) -> Path:
    """Everything the command line alone can show wrong, before a checkpoint loads; the output folder."""
    if args.budgets == []:
        raise CoaloraError("--budgets needs at least one value (or leave it out for the run's budgets)")
    for budget in args.budgets or ():
        check_budget(budget)
    from coalora.tasks.checkpoint import read_checkpoint

    for path in args.ckpt:  # every checkpoint readable, with a split to report, before any model loads
        report_split(read_checkpoint(path), args.split)
    check_input_files(args.qconfig, "qconfig file", "write one with `coalora allocate --out`")
    if args.glue_dir is not None and not Path(args.glue_dir).expanduser().is_dir():
        raise CoaloraError(f"--glue-dir '{args.glue_dir}' is not a folder; pass the data folder")
    out = Path(args.out) if args.out else Path(args.ckpt[0]).resolve().parent / "eval"
    return check_output_dir(out, "--out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", nargs="+", required=True, help="checkpoint(s) written by `coalora fit`")
    parser.add_argument(
        "--budgets",
        nargs="*",
        type=arg(FINITE),
        default=None,
        help="bit budgets (default: the run's)",
    )
    parser.add_argument("--qconfig", nargs="*", default=[], help="qconfig JSON files to evaluate as well")
    parser.add_argument(
        "--random", type=arg(COUNT), default=0, help="N random unseen configurations over 2.25-7 bits"
    )
    parser.add_argument(
        "--seen", type=arg(COUNT), default=0, help="N configurations that training steps used"
    )
    parser.add_argument("--out", default=None, help="output folder (default: <first ckpt folder>/eval)")
    parser.add_argument(
        "--glue-dir",
        "--data-dir",
        dest="glue_dir",
        default=None,
        help="data folder (default: the run's, else GLUE_DIR or ../shared/data)",
    )
    parser.add_argument(
        "--split",
        choices=("validate", "test"),
        default=None,
        help="GLUE: dev either way (test labels are hidden); LM: default test if the run has test_files "
        "(validation without val_files is refused: that is the search split)",
    )
    parser.add_argument(
        "--eval-limit", type=arg(POSITIVE_INT), default=None, help="use only the first N examples/blocks"
    )
    parser.add_argument("--batch-size", type=arg(POSITIVE_INT), default=128)
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--seed", type=arg(SEED), default=0, help="seed for --random and --seen")
    parser.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default=None,
        help="how configurations are rounded (default: each run's own; gptq calibrates on its training data)",
    )


def report_split(checkpoint: dict, requested: str | None) -> str:
    """The split a checkpoint is reported on: GLUE's dev either way (``test`` reads dev too), an LM's test
    text if it has some, else its validation text, never the search split (see ``evaluation_split``)."""
    from coalora.data.text_datamodule import evaluation_split
    from coalora.tasks.causal_lm import CausalLMTask
    from coalora.tasks.checkpoint import task_class

    if issubclass(task_class(checkpoint), CausalLMTask):
        return evaluation_split(dict(checkpoint.get("datamodule_hyper_parameters", {})), requested)
    return requested or "validate"


def _data_overrides(args: argparse.Namespace) -> dict:
    """Where the run's data is now (``--glue-dir``), for evaluation and GPTQ's calibration alike."""
    return {} if args.glue_dir is None else {"glue_dir": args.glue_dir, "data_dir": args.glue_dir}


def _eval_loader(module: CoALoRATask, args: argparse.Namespace, checkpoint: dict):
    """The split to report on, with the training run's data arguments: GLUE dev, or the LM's test text."""
    data_hparams = dict(checkpoint.get("datamodule_hyper_parameters", {}))
    overrides = dict(data_hparams, eval_batch_size=args.batch_size, eval_limit=args.eval_limit)
    overrides.update(_data_overrides(args))
    overrides.update(search_size=0)  # GLUE: no search split needed to evaluate
    data = module.data_module(**overrides)
    split = report_split(checkpoint, args.split)
    data.setup(split)
    return data.test_dataloader() if split == "test" else data.val_dataloader()


def configs_to_evaluate(
    module: CoALoRATask, args: argparse.Namespace
) -> list[tuple[str, str, QConfig | None]]:
    """(label, kind, config) triples for one checkpoint."""
    from coalora.quant.allocate import allocate
    from coalora.utils import budget_label

    if module.method.serves == "own":
        return [(label, "own", config) for label, config in module.eval_configs.items()]
    space = module.model.space
    items: list[tuple[str, str, QConfig | None]]
    if module.method.serves == "fp":  # post-training quantized at what is asked for explicitly
        items = [("fp", "fp", None)]
        if args.budgets:
            table = module.error_table()
            items += [(budget_label(b), "budget", allocate(space, table, b)) for b in args.budgets]
    elif args.budgets is None:
        items = [(label, "budget", config) for label, config in module.eval_configs.items()]
    else:
        table = module.error_table()
        items = [(budget_label(b), "budget", allocate(space, table, b)) for b in args.budgets]
    items += [(Path(p).stem, "qconfig", space.load(p)) for p in args.qconfig]
    generator = torch.Generator().manual_seed(args.seed)
    for i in range(args.random):
        target = 2.25 + (7.0 - 2.25) * (i + 0.5) / args.random
        items.append((f"random-{i}", "random", space.random_near(target, generator)))
    if args.seen:
        trained = module.trained_on
        if args.seen > len(trained):
            raise CoaloraError(
                f"--seen {args.seen}: training steps used only {len(trained)} configurations; "
                f"pass --seen {len(trained)} or fewer"
            )
        picks = torch.randperm(len(trained), generator=generator)[: args.seen]
        items += [(f"seen-{int(i)}", "seen", trained[int(i)]) for i in picks]
    return items


def run(args: argparse.Namespace) -> int:
    from coalora.tasks.checkpoint import load_task, read_checkpoint

    out = check_arguments(args)
    results: list[EvalResult] = []
    task = None
    names: dict[str, int] = {}
    for path in args.ckpt:
        checkpoint = read_checkpoint(path)
        module = load_task(path, args.rounding, _data_overrides(args))
        if task is not None and module.evaluation_name != task:
            raise CoaloraError(
                f"checkpoints are for different tasks ({task}, {module.evaluation_name}); evaluate separately"
            )
        task = module.evaluation_name
        loader = _eval_loader(module, args, checkpoint)
        seen = set(module.trained_on)  # configurations a training step used, not the final set
        method = module.method.name
        items = configs_to_evaluate(module, args)
        rounding = module.model.rounder.method
        run_name = method if rounding == module.hparams.get("rounding", "nearest") else f"{method}-{rounding}"
        run_name = run_name if module.method.serves != "own" else f"{run_name}@{items[0][0]}"
        names[run_name] = names.get(run_name, 0) + 1
        if names[run_name] > 1:
            run_name = f"{run_name}#{names[run_name]}"
        for label, kind, config in items:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                metrics = evaluate_config(module, loader, config)
            bits = None if config is None else module.model.space.avg_bits(config)
            family = module.model.space.family_name
            results.append(
                EvalResult(run_name, method, label, kind, bits, config in seen, metrics, rounding, family)
            )
            print(f"  {run_name} {label}: {metrics} ({time.perf_counter() - start:.1f} s)", flush=True)
    assert task is not None  # argparse requires at least one --ckpt
    paths = write_outputs(results, task, out)
    print(format_table(results, task))
    for run_name, info in summarise(results, task).items():
        print(f"{run_name}: {info}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
