"""What weighting the allocation's error table does to accuracy (issue #24, item 6), after training.

    python benchmarks/error_weighting.py --configs-dir docs/bench/weighting_configs   # the fixed files
    python benchmarks/weighting_accuracy.py [--seeds 42 43 44] [--cells fp-gptq ...]

The five budgets (2.1-3.0 bits) are allocated three ways on MiniLM (``none``: plain squared error, what
``fit`` and ``evaluate --budgets`` do by default; ``fisher``; ``activation``: tr(E H Eᵀ)), each written once
as a qconfig file, the same files for every checkpoint. A cell's checkpoint of ``rounding_regime.py`` (one
per seed) is evaluated at the ``fisher`` and ``activation`` files with its own rounding, in fp32, on the 872
dev sentences; its ``none`` numbers are the budget rows ``rounding_regime.py`` already evaluated for the
same checkpoint (the same allocation: at seed 42 the ``none`` files gave fp-gptq's budget accuracies to
the last digit at 2.1/2.3/2.5/2.7 bits). An evaluation here costs ~80 s a configuration on this loaded
2-core machine, so the default is the post-training recipe only. Nothing is selected: every run is its
``last.ckpt``. The question it answers is the one a user
serving a trained checkpoint asks: at equal bits, which allocation should I serve? (Training under a
weighted allocation, ``error_weighting`` in ``fit``, is a separate and costlier experiment.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from compare_methods import REPO, _env
from eval_reuse import evaluate_once

CONFIGS = REPO / "docs" / "bench" / "weighting_configs"
OUT = REPO / "docs" / "bench" / "weighting_accuracy.json"
WEIGHTINGS = ("none", "fisher", "activation")
EVALUATED = ("fisher", "activation")
BUDGETS = ("2.1", "2.3", "2.5", "2.7", "3")
#: cell -> (its run folder under runs/rounding/s<seed>, the rounding it is served with)
CELLS = {
    "fp-gptq": ("fp", "gptq"),
    "fp-nearest": ("fp", "nearest"),
    "coalora-frozen-gptq-distill": ("coalora-frozen-gptq-distill", "gptq"),
    "shared-trainset-gptq-distill": ("shared-trainset-gptq-distill", "gptq"),
}


def config_files() -> list[Path]:
    files = [CONFIGS / f"{w}_{b}bits.json" for w in EVALUATED for b in BUDGETS]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SystemExit(
            f"missing qconfig files {missing} in {CONFIGS}; write them with "
            "`python benchmarks/error_weighting.py --configs-dir docs/bench/weighting_configs`"
        )
    return files


def checkpoint(seed: int, run: str) -> Path:
    found = sorted((REPO / "runs" / "rounding" / f"s{seed}" / run).glob("*/version_*/checkpoints/last.ckpt"))
    if not found:
        raise SystemExit(
            f"no last.ckpt for {run} at seed {seed}; train it with benchmarks/rounding_regime.py"
        )
    return found[-1]


def unweighted(seed: int, cell: str) -> list[dict]:
    """The cell's budget rows from ``rounding_regime.py``'s evaluation of the same checkpoint: ``none``."""
    rows = []
    for path in sorted((REPO / "runs" / "rounding" / f"s{seed}" / cell).glob("eval*/eval.json")):
        for row in json.loads(path.read_text())["results"]:
            if row["kind"] in ("budget", "own") and f"{float(row['label']):g}" in BUDGETS:
                budget = f"{float(row['label']):g}"
                rows.append(
                    {
                        "cell": cell,
                        "seed": seed,
                        "weighting": "none",
                        "budget": budget,
                        "accuracy": row["accuracy"],
                    }
                )
    if len(rows) != len(BUDGETS):
        raise SystemExit(
            f"{cell} at seed {seed} has no budget evaluation; run benchmarks/rounding_regime.py first"
        )
    return rows


def evaluate(seed: int, cell: str, files: list[Path]) -> list[dict]:
    run, rounding = CELLS[cell]
    ckpt = checkpoint(seed, run)
    folder = REPO / "runs" / "weighting" / f"s{seed}" / cell
    flags = ["--precision", "32", "--rounding", rounding, "--qconfig", *map(str, files)]

    def go() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[eval] s{seed} {cell}", flush=True)
        command = [sys.executable, "-m", "coalora.cli", "evaluate", "--ckpt", str(ckpt), "--out", str(folder)]
        with (folder.parent / f"{cell}.log").open("w") as log:
            done = subprocess.run([*command, *flags], cwd=REPO, env=_env(), stdout=log, stderr=log)
        if done.returncode != 0:
            raise SystemExit(
                f"evaluating {cell} at seed {seed} failed; see {folder.parent / (cell + '.log')}"
            )

    rows = unweighted(seed, cell)
    for row in evaluate_once(folder, str(ckpt), flags, go):
        if row["kind"] != "qconfig":
            continue
        weighting, budget = row["label"].removesuffix("bits").split("_")
        rows.append(
            {
                "cell": cell,
                "seed": seed,
                "weighting": weighting,
                "budget": budget,
                "accuracy": row["accuracy"],
            }
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per cell and weighting: mean ± std over seeds of the per-seed mean over the budgets, the per-budget
    means, and each weighting minus ``none`` as a per-seed paired difference."""

    def seed_means(cell: str, weighting: str) -> dict[int, float]:
        out = {}
        for seed in sorted({r["seed"] for r in rows}):
            found = [
                r["accuracy"]
                for r in rows
                if (r["cell"], r["seed"], r["weighting"]) == (cell, seed, weighting)
            ]
            if len(found) == len(BUDGETS):
                out[seed] = 100 * statistics.fmean(found)
        return out

    def mean_std(values: list[float]) -> list[float]:
        return [
            round(statistics.fmean(values), 2),
            round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        ]

    summary: dict = {}
    for cell in dict.fromkeys(r["cell"] for r in rows):
        entry: dict = {}
        base = seed_means(cell, "none")
        for weighting in WEIGHTINGS:
            means = seed_means(cell, weighting)
            if not means:
                continue
            per_budget = {
                b: mean_std(
                    [
                        100 * r["accuracy"]
                        for r in rows
                        if (r["cell"], r["weighting"], r["budget"]) == (cell, weighting, b)
                    ]
                )
                for b in BUDGETS
            }
            entry[weighting] = {
                "seeds": len(means),
                "mean_over_budgets": mean_std(list(means.values())),
                "per_budget": per_budget,
            }
            paired = [means[s] - base[s] for s in means if s in base]
            if weighting != "none" and paired:
                entry[weighting]["minus_none"] = mean_std(paired)
        summary[cell] = entry
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=["fp-gptq"])
    args = parser.parse_args(argv)
    files = config_files()
    old = json.loads(OUT.read_text())["rows"] if OUT.is_file() else []
    rows: list[dict] = []
    for seed in args.seeds:
        for cell in args.cells:
            rows += evaluate(seed, cell, files)
            fresh = {(r["cell"], r["seed"]) for r in rows}
            everything = [r for r in old if (r["cell"], r["seed"]) not in fresh] + rows
            report = {
                "command": "python benchmarks/weighting_accuracy.py " + " ".join(sys.argv[1:]),
                "configs": str(CONFIGS.relative_to(REPO)),
                "precision": "fp32",
                "summary": summarise(everything),
                "rows": everything,
            }
            OUT.write_text(
                json.dumps(report, indent=1) + "\n"
            )  # after every evaluation: partial results survive
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
