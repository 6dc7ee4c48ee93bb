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
from lowbit_regime import BUDGETS, HERE, SETTINGS, mean_std, random_configs

OUT = REPO / "docs" / "bench" / "rounding.json"
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
        record = train(name, [*flags, *COMMON], root, SETTINGS, seed)
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
    """Per method: mean ± std over seeds at each budget, of the per-seed budget mean and random mean."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seeds = sorted({r["seed"] for r in mine})
        entry: dict = {"seeds": seeds, "budget": {}}
        for label in [*map(str, BUDGETS), "fp"]:
            values = [r["accuracy"] for r in mine if r["label"] == label and r["kind"] in ("budget", "fp")]
            if values:
                entry["budget"][label] = mean_std(values)
        for kind in ("budget", "random"):
            per_seed = [
                statistics.fmean(r["accuracy"] for r in mine if r["seed"] == s and r["kind"] == kind)
                for s in seeds
                if any(r["seed"] == s and r["kind"] == kind for r in mine)
            ]
            entry[f"{kind}_mean"] = mean_std(per_seed) if per_seed else None
        out[method] = entry
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
            rows[(cell, seed, row["label"])] = {
                "method": cell.split("@")[0],
                "seed": seed,
                "label": row["label"],
                "kind": kind,
                "avg_bits": row["avg_bits"],
                "rounding": row.get("rounding", "nearest"),
                "accuracy": row["accuracy"],
            }
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--only", nargs="+", default=None, help="cells by method name (qlora: every budget)")
    parser.add_argument("--collect", action="store_true", help="only rebuild the JSON from finished runs")
    args = parser.parse_args(argv)
    if args.collect:
        rows = collected_rows()
        report = {
            "command": "python benchmarks/rounding_regime.py --collect",
            "settings": {**SETTINGS, "precision": "fp32", "budgets": list(BUDGETS), "random": 20},
            "cells": cells(rows),
            "rows": rows,
        }
        OUT.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report["cells"], indent=1))
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
        }
        OUT.write_text(json.dumps(report, indent=1) + "\n")  # after every seed: partial results survive
        print(json.dumps(report["cells"], indent=1), flush=True)


if __name__ == "__main__":
    main()
