"""Which recipe serves any configuration best (issue #24): rounding-aware cells of the low-bit regime, fp32.

    python benchmarks/rounding_regime.py                          # every cell, seeds 42 43 44
    python benchmarks/rounding_regime.py --seeds 42 --only fp qlora

The low-bit regime's setting (``lowbit_regime.py``: one epoch over 3,200 SST-2 sentences = 100 steps,
batch 32, rank 16, lr 5e-4, the five budgets 2.1-3.0 bits and the same 20 random configurations, all 872
dev sentences), trained and evaluated in fp32 (this machine has no native bf16; none of these cells is
set against a bf16 row). Cells, chosen before any run:

- ``fp-nearest`` / ``fp-gptq``: one fp-LoRA run per seed, every configuration rounded after training, by
  round-to-nearest or by GPTQ with the fine-tuned model's statistics (128 training sentences).
- ``qlora`` / ``qlora-gptq``: one QLoRA run per budget, trained (and served) under that rounding.
- ``coalora-frozen`` / ``coalora-frozen-gptq``: CoA-LoRA on the frozen set, trained under that rounding.
- ``warm-coalora-frozen-gptq`` (item 5's first recipe, chosen before running): the seed's fp-LoRA run, then
  100 more steps of ``coalora-frozen-gptq`` starting from its adapter (``callbacks.AdapterWarmStart``):
  200 steps in all. Its control at equal steps is ``fp2-gptq``: fp-LoRA for two epochs (200 steps),
  every configuration rounded by GPTQ after training.
- ``coalora-frozen-gptq-distill`` (item 5's second recipe, chosen before running): ``coalora-frozen-gptq``
  with in-step distillation from the full-precision model (``distill_weight: 1.0``), 100 steps.

- ``coalora-search-gptq`` and ``shared-trainset-gptq`` (added before running): the shipped search under
  ``gptq``, and the frozen set with the mapper off under ``gptq`` (the exact mapper control of
  ``coalora-frozen-gptq``).
- ``shared-trainset-gptq-distill`` (added before running): ``coalora-frozen-gptq-distill`` with the mapper
  off, the recommended recipe's mapper control.
- ``coalora-frozen-gptq-distill-actw`` (added before running): the recommended recipe with its training set
  and evaluation budgets allocated from the activation-weighted error table (``error_weighting``).

Nothing is selected on dev: every run is evaluated from its ``last.ckpt``. Runs live in
``runs/rounding/s<seed>/<cell>/`` and are skipped once done (evaluations are reused only under the same
flags), so the regime runs in parts. Output: ``docs/bench/rounding.json`` (rows and mean ± std cells).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from compare_methods import REPO, _env, train
from eval_reuse import evaluate_once
from lowbit_regime import (
    BUDGETS,
    HERE,
    SETTINGS,
    difference,
    gap,
    mean_std,
    per_seed,
    random_configs,
)
from lowbit_regime import cells as lowbit_cells
from lowbit_report import markdown, plot

OUT = REPO / "docs" / "bench" / "rounding.json"
FULL = "fp-lora (unquantized)"
FP32 = ["--trainer.precision", "32-true"]
BUDGET_FLAG = "[" + ", ".join(str(b) for b in BUDGETS) + "]"
COMMON = ["--model.eval_budgets", BUDGET_FLAG, "--trainer.limit_val_batches", "0", *FP32]
GPTQ = ["--model.rounding", "gptq"]
#: cell -> (training run name, its flags, the rounding it is served with)
CELLS: dict[str, tuple[str, list[str], str]] = {
    "fp-nearest": ("fp", ["--config", "configs/baselines/fp.yaml"], "nearest"),
    "fp-gptq": ("fp", ["--config", "configs/baselines/fp.yaml"], "gptq"),
    "coalora-frozen": (
        "coalora-frozen",
        ["--config", str(HERE.relative_to(REPO) / "frozen.yaml")],
        "nearest",
    ),
    "coalora-frozen-gptq": (
        "coalora-frozen-gptq",
        ["--config", str(HERE.relative_to(REPO) / "frozen.yaml"), *GPTQ],
        "gptq",
    ),
}
CELLS["warm-coalora-frozen-gptq"] = (
    "warm-coalora-frozen-gptq",
    CELLS["coalora-frozen-gptq"][1],
    "gptq",
)
CELLS["fp2-gptq"] = ("fp2", ["--config", "configs/baselines/fp.yaml"], "gptq")
#: item 5's second recipe, chosen before running: in-step distillation from the full-precision model
CELLS["coalora-frozen-gptq-distill"] = (
    "coalora-frozen-gptq-distill",
    [*CELLS["coalora-frozen-gptq"][1], "--model.distill_weight", "1.0"],
    "gptq",
)
#: the bar's other CoA-LoRA rows under gptq (added 2026-12-07, before running): the shipped search, and
#: the frozen set with the mapper off (coalora-frozen-gptq's exact mapper control)
CELLS["coalora-search-gptq"] = (
    "coalora-search-gptq",
    ["--config", str(HERE.relative_to(REPO) / "search.yaml"), *GPTQ],
    "gptq",
)
CELLS["shared-trainset-gptq"] = (
    "shared-trainset-gptq",
    [*CELLS["coalora-frozen-gptq"][1], "--model.use_mapper", "false"],
    "gptq",
)
#: the recommended recipe's mapper control (added 2026-12-07, before running): distillation with the
#: mapper off, so "CoA-LoRA + GPTQ + distillation" is set against the same training without the mapper
CELLS["shared-trainset-gptq-distill"] = (
    "shared-trainset-gptq-distill",
    [*CELLS["shared-trainset-gptq"][1], "--model.distill_weight", "1.0"],
    "gptq",
)
#: the recommended recipe trained and served under activation-weighted allocation (added 2026-12-07,
#: session e, before running): its frozen training set and its five evaluation budgets are allocated
#: from tr(E H Eᵀ), so training and serving agree (serving recipe 2 at weighted budgets it never trained
#: on lost accuracy: docs/bench/weighting_accuracy.json)
CELLS["coalora-frozen-gptq-distill-actw"] = (
    "coalora-frozen-gptq-distill-actw",
    [*CELLS["coalora-frozen-gptq-distill"][1], "--model.error_weighting", "activation"],
    "gptq",
)
#: the recommended recipe trained where it is served (added 2026-12-07, session g, before running; an
#: attempt at bar 2): the frozen set the other CoA-LoRA cells train on is allocated at 2.25, 2.35, ...,
#: 7.15 bits, so 8 of its 50 configurations lie in the 2.1-3.0 bits of the five budgets and none at 2.1.
#: Here the 50 training budgets span what the regime serves (budgets 2.1-3.0, random configurations
#: 2.3-3.5 bits): 2.110, 2.138, ..., 3.482, nothing else changed. Evaluation configurations a run trained
#: on are marked seen by evaluate; its mapper control is the same flags with the mapper off
SERVED_RANGE = "[" + ", ".join(f"{2.11 + 0.028 * i:.3f}" for i in range(50)) + "]"
CELLS["coalora-frozen-gptq-distill-served"] = (
    "coalora-frozen-gptq-distill-served",
    [*CELLS["coalora-frozen-gptq-distill"][1], "--model.train_budgets", SERVED_RANGE],
    "gptq",
)
CELLS["shared-trainset-gptq-distill-served"] = (
    "shared-trainset-gptq-distill-served",
    [*CELLS["shared-trainset-gptq-distill"][1], "--model.train_budgets", SERVED_RANGE],
    "gptq",
)
#: cells with the mapper and their exact controls (the same flags with ``use_mapper: false``)
MAPPER_PAIRS = {
    "frozen-gptq": ("coalora-frozen-gptq", "shared-trainset-gptq"),
    "distill": ("coalora-frozen-gptq-distill", "shared-trainset-gptq-distill"),
    "served": ("coalora-frozen-gptq-distill-served", "shared-trainset-gptq-distill-served"),
}
#: cells trained for two epochs (the warm start's 100 + 100 steps, at equal steps)
TWO_EPOCHS = {"fp2-gptq"}
for _budget in BUDGETS:
    _qlora = ["--config", "configs/baselines/qlora.yaml", "--model.train_budget", str(_budget)]
    CELLS[f"qlora@{_budget}"] = (f"qlora@{_budget}", _qlora, "nearest")
    CELLS[f"qlora-gptq@{_budget}"] = (f"qlora-gptq@{_budget}", [*_qlora, *GPTQ], "gptq")


def evaluate(record: dict, root: Path, cell: str, rounding: str, serves_any: bool) -> list[dict]:
    """``coalora evaluate`` in fp32 at the five budgets and the 20 random configurations (``serves_any``)
    or at the run's own configuration, rounded by ``rounding``."""
    folder = root / cell.replace("@", "_") / "eval"
    flags = ["--precision", "32", "--rounding", rounding]
    if serves_any:
        flags += ["--budgets", *map(str, BUDGETS), "--qconfig", *map(str, random_configs())]

    def run() -> None:
        command = [sys.executable, "-m", "coalora.cli", "evaluate", "--ckpt", record["ckpt"]]
        print(f"[eval] {cell}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder.parent / "eval.log").open("w") as log:
            done = subprocess.run(
                [*command, "--out", str(folder), *flags], cwd=REPO, env=_env(), stdout=log, stderr=log
            )
        if done.returncode != 0:
            raise SystemExit(f"evaluating {cell} failed; see {folder.parent / 'eval.log'}")

    return evaluate_once(folder, record["ckpt"], flags, run)


def run_seed(seed: int, only: list[str] | None) -> list[dict]:
    root = REPO / "runs" / "rounding" / f"s{seed}"
    rows = []
    for cell, (name, flags, rounding) in CELLS.items():
        if only and cell.split("@")[0] not in only:
            continue
        settings = {**SETTINGS, "epochs": 2} if cell in TWO_EPOCHS else SETTINGS
        if cell.startswith("warm-"):
            fp_name, fp_flags, _ = CELLS["fp-nearest"]
            source = train(fp_name, [*fp_flags, *COMMON], root, SETTINGS, seed)["ckpt"]
            flags = [*flags, "--trainer.callbacks+=callbacks.AdapterWarmStart"]
            flags += ["--trainer.callbacks.checkpoint", source]
        record = train(name, [*flags, *COMMON], root, settings, seed)
        serves_any = not cell.startswith("qlora")
        for row in evaluate(record, root, cell, rounding, serves_any):
            if row["kind"] == "fp" and cell != "fp-nearest":
                continue  # full precision is one number per run, kept once
            kind = {"qconfig": "random", "own": "budget"}.get(row["kind"], row["kind"])
            rows.append(
                {
                    "method": cell.split("@")[0],
                    "seed": seed,
                    "label": row["label"],
                    "kind": kind,
                    "avg_bits": row["avg_bits"],
                    "rounding": rounding,
                    "accuracy": row["accuracy"],
                    "train_seconds": record["train_seconds"],
                }
            )
    return rows


def cells(rows: list[dict]) -> dict[str, dict]:
    """The low-bit regime's cells (mean ± std over seeds per budget, of the per-seed budget and random
    means), with training minutes counted per run: a per-budget method (either rounding) trains per budget."""
    out = lowbit_cells(rows)
    for method, entry in out.items():
        entry["train_minutes_per_seed"] = minutes(rows, method)
    return out


def collected_rows() -> list[dict]:
    """Every finished evaluation under ``runs/rounding``: the regime's own (``<cell>/eval``) and partial
    ones run by hand at the budgets only (``<cell>/eval-budgets``), one row per (cell, seed, label)."""
    rows: dict[tuple, dict] = {}
    for path in sorted((REPO / "runs" / "rounding").glob("s*/*/eval*/eval.json")):
        seed, cell = int(path.parts[-4][1:]), path.parts[-3].replace("_", "@")
        for row in json.loads(path.read_text())["results"]:
            if row["kind"] == "fp" and cell != "fp-nearest":
                continue
            kind = {"qconfig": "random", "own": "budget"}.get(row["kind"], row["kind"])
            done = path.parents[1].parent / CELLS[cell][0].replace("@", "_") / "done.json"
            seconds = json.loads(done.read_text())["train_seconds"] if done.is_file() else None
            rows[(cell, seed, row["label"])] = {
                # the unquantized model is its own line: one number per fp run, whatever the rounding
                "method": FULL if row["kind"] == "fp" else cell.split("@")[0],
                "seed": seed,
                "label": row["label"],
                "kind": kind,
                "avg_bits": row["avg_bits"],
                "rounding": row.get("rounding", "nearest"),
                "accuracy": row["accuracy"],
                "train_seconds": seconds,
            }
    return list(rows.values())


def comparisons(rows: list[dict]) -> dict[str, object]:
    """The issue's comparisons, each a per-seed difference (points, mean ± std over the seeds both have):
    every cell against QLoRA-nearest (per budget at 1 run each) and against fp-gptq; the gap to
    full precision at 2.1 bits."""
    out: dict[str, object] = {}
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
    for method in methods:
        if method != "qlora":
            for key, value in difference(rows, method, "qlora").items():
                out[f"{method}_minus_qlora_{key}"] = value
        if method != "fp-gptq":
            for key, value in difference(rows, method, "fp-gptq").items():
                if key != "per_budget":
                    out[f"{method}_minus_fp-gptq_{key}"] = value
    for prefix, (on, off) in MAPPER_PAIRS.items():  # the mapper's gain, only against its exact control
        for key, value in difference(rows, on, off).items():
            out[f"{prefix}_mapper_gain_{key}"] = value
    full = per_seed(rows, FULL, "fp")
    for method in (m for m in methods if m != FULL):
        at = per_seed(rows, method, "budget", str(BUDGETS[0]))
        found = gap(full, at)
        if found:
            out[f"fp_minus_{method}_at_{BUDGETS[0]}"] = mean_std(found)
    return out


def minutes(rows: list[dict], method: str) -> float | None:
    """Training minutes per seed: a per-budget method trains once per budget, the others once."""
    per = []
    for seed in sorted({r["seed"] for r in rows if r["method"] == method}):
        runs = {r["label"]: r["train_seconds"] for r in rows if r["method"] == method and r["seed"] == seed}
        seconds = [v for v in runs.values() if v is not None]
        if seconds:
            per.append(sum(seconds) if method.startswith("qlora") else seconds[0])
    return round(statistics.fmean(per) / 60, 1) if per else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--only", nargs="+", default=None, help="cells by method name (qlora: every budget)")
    parser.add_argument("--collect", action="store_true", help="only rebuild the JSON from finished runs")
    args = parser.parse_args(argv)
    if args.collect:
        # the runs found here replace their rows; rows of runs this machine lacks (runs/ is not committed)
        # are kept from the JSON, so collecting on a fresh checkout never drops a cell
        found = collected_rows()
        fresh = {(r["method"], r["seed"], r["label"]) for r in found}
        old = json.loads(OUT.read_text())["rows"] if OUT.is_file() else []
        rows = [r for r in old if (r["method"], r["seed"], r["label"]) not in fresh] + found
        report = {
            "command": "python benchmarks/rounding_regime.py --collect",
            "settings": {**SETTINGS, "precision": "fp32", "budgets": list(BUDGETS), "random": 20},
            "cells": cells(rows),
            "rows": rows,
        }
        report["comparisons"] = comparisons(rows)
        OUT.write_text(json.dumps(report, indent=1) + "\n")
        summary = report["cells"]
        OUT.with_suffix(".md").write_text(markdown(summary, report["comparisons"], BUDGETS))
        plot(rows, summary, OUT.with_suffix(".png"), BUDGETS)
        print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
        return
    old = json.loads(OUT.read_text())["rows"] if OUT.is_file() else []
    rows = []
    for seed in args.seeds:
        rows += run_seed(seed, args.only)
        fresh = {(r["method"], r["seed"], r["label"]) for r in rows}
        kept = [r for r in old if (r["method"], r["seed"], r["label"]) not in fresh]
        everything = kept + rows
        report = {
            "command": "python benchmarks/rounding_regime.py " + " ".join(sys.argv[1:]),
            "settings": {**SETTINGS, "precision": "fp32", "budgets": list(BUDGETS), "random": 20},
            "cells": cells(everything),
            "rows": everything,
            "comparisons": comparisons(everything),
        }
        OUT.write_text(json.dumps(report, indent=1) + "\n")  # after every seed: partial results survive
        print(json.dumps(report["cells"], indent=1), flush=True)


if __name__ == "__main__":
    main()
