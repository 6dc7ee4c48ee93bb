"""The low-bit regime (issue #11): where configurations matter, 3 seeds, mean ± std per cell.

    python benchmarks/compare_methods.py --regime lowbit                     # every method, seeds 42 43 44
    python benchmarks/compare_methods.py --regime lowbit --seeds 42 --only coalora-search shared-trainset

Evaluation configurations: the budgets 2.1/2.3/2.5/2.7/3.0 bits, allocated without a solver time limit
(none is on the training grid 2.25, 2.35, ...), and 20 random configurations over 2.1-3.5 bits drawn once
from a fixed seed and kept in ``benchmarks/lowbit/random/`` (the same files for every method and seed).
Every method is evaluated on all 872 GLUE dev sentences at every configuration it can serve, from its
``last.ckpt`` (nothing is selected on dev). Methods: fp-LoRA, QLoRA per budget, Shared-LoRA on the
evaluation budgets, Shared-LoRA on CoA-LoRA's training set (CoA-LoRA with the mapper off, frozen set: the
control of the frozen-set runs, not of the search's), CoA-LoRA with the search, a frozen set and random
extension, and CoA-LoRA with the search plus two changes tried to reach the bars (``coalora-sandwich``:
distillation from full precision in every step, and one configuration per step drawn under 3 bits), and the
frozen set with the mapper at 10x the adapter's learning rate (``coalora-mapper-lr``);
``sandwich-mapper-off`` is the sandwich run with the mapper switched off, so the sandwich's gain can be
split into distillation and mapper; ``coalora-k4`` is the frozen set with K = 4 configurations per step,
``k4-mapper-off`` its control; ``search-mapper-off`` and ``random-mapper-off`` are the search's and the
random extension's controls. The mapper's gain is reported only against a run's exact control
(``MAPPER_CONTROLS``).
All runs: the same training sentences, one epoch, batch 32, rank 16, lr 5e-4, bf16 (the K = 4 pair fp32).

    python benchmarks/compare_methods.py --regime lowbit --report-only   # re-summarise the stored rows

Runs live in ``runs/lowbit/s<seed>/<run>/`` and are skipped once their ``done.json`` exists, so the regime
runs in parts. Outputs: ``docs/bench/lowbit.{json,md,png}``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

from compare_methods import REPO, evaluate_with, train
from lowbit_report import markdown, plot

BUDGETS = (2.1, 2.3, 2.5, 2.7, 3.0)
RANDOM_RANGE = (2.1, 3.5)
RANDOM_COUNT = 20
RANDOM_SEED = 2026
SEEDS = (42, 43, 44)
HERE = REPO / "benchmarks" / "lowbit"
SETTINGS = {"epochs": 1, "train_limit": 3200, "eval_limit": None, "search_size": 256}
# The mapper's gain is reported only for a run with its exact control: the same flags and training recipe
# with the mapper off (prefix of the bar keys: (the run with the mapper, its control)). shared-trainset is
# the frozen set with the mapper off, so it controls coalora-frozen and coalora-mapper-lr (MAPPER_ONLY_FLAGS
# act on the mapper's parameters alone, and a task without a mapper refuses them). Set against other runs,
# e.g. the search against shared-trainset, the training sets differ too: that is reported under a name
# saying so ("..._vs_frozen_mapper_off_..."), never as a mapper gain.
MAPPER_CONTROLS = {
    "search": ("coalora-search", "search-mapper-off"),
    "frozen": ("coalora-frozen", "shared-trainset"),
    "random": ("coalora-random", "random-mapper-off"),
    "mapper_lr": ("coalora-mapper-lr", "shared-trainset"),
    "sandwich": ("coalora-sandwich", "sandwich-mapper-off"),
    "k4": ("coalora-k4", "k4-mapper-off"),
}
MAPPER_ONLY_FLAGS = ("--model.mapper_lr",)
DEFAULT, FROZEN_MAPPER_OFF = "coalora-search", "shared-trainset"
BUDGET_FLAG = "[" + ", ".join(str(b) for b in BUDGETS) + "]"
FP32 = ["--trainer.precision", "32-true"]  # a run with these flags is evaluated in fp32 too


def planned_runs() -> list[tuple[str, list[str]]]:
    """(run name, extra flags); every run is evaluated at the low-bit budgets, none validates during fit."""
    common = ["--model.eval_budgets", BUDGET_FLAG, "--trainer.limit_val_batches", "0"]
    lowbit = str(HERE.relative_to(REPO))
    runs = [("fp", ["--config", "configs/baselines/fp.yaml"])]
    for budget in BUDGETS:
        runs.append(
            (
                f"qlora@{budget}",
                ["--config", "configs/baselines/qlora.yaml", "--model.train_budget", str(budget)],
            )
        )
    runs.append(("shared", ["--config", "configs/baselines/shared.yaml"]))
    runs.append(("shared-trainset", ["--config", f"{lowbit}/frozen.yaml", "--model.use_mapper", "false"]))
    for mode in ("search", "frozen", "random"):
        runs.append((f"coalora-{mode}", ["--config", f"{lowbit}/{mode}.yaml"]))
    # the exact controls of the search (the shipped default: issue #11's first bar needs it) and of the
    # random extension: the same set rule with the mapper off. The search then scores and picks its set
    # with the mapper-less model, as a user switching the mapper off would get
    for mode in ("search", "random"):
        runs.append(
            (f"{mode}-mapper-off", ["--config", f"{lowbit}/{mode}.yaml", "--model.use_mapper", "false"])
        )
    # the attempt to reach the bars: the sandwich rule's distillation from full precision, and one of the
    # K configurations of every step drawn under 3 bits (budget-stratified sampling)
    sandwich = ["--model.distill_weight", "1.0", "--model.low_bit_draw", "3.0"]
    runs.append(("coalora-sandwich", ["--config", f"{lowbit}/search.yaml", *sandwich]))
    # the second attempt: the frozen set with the mapper at 10x the adapter's learning rate (chosen before
    # any run, not tuned): B starts at zero, so the mapper's gradient (through B) is tiny for most of a
    # 100-step run; against shared-trainset it isolates the mapper exactly as coalora-frozen does
    runs.append(("coalora-mapper-lr", ["--config", f"{lowbit}/frozen.yaml", "--model.mapper_lr", "5e-3"]))
    # the sandwich's own control: identical flags with the mapper off, so coalora-sandwich minus it is what
    # the mapper adds once distillation and the low-bit draw are in (the sandwich's gain over
    # shared-trainset mixes the two)
    runs.append(
        (
            "sandwich-mapper-off",
            ["--config", f"{lowbit}/search.yaml", *sandwich, "--model.use_mapper", "false"],
        )
    )
    # the third attempt: K = 4 configurations per step (each backward before the next forward) on the
    # frozen set, with its own mapper-off control: more configurations per step give the shared adapter a
    # harder compromise, which is what the mapper is there to relieve. In fp32 (training and evaluation):
    # it first ran on a CPU without native bf16, where bf16 autocast was 22-24x slower than fp32
    k4 = ["--config", f"{lowbit}/frozen.yaml", "--model.configs_per_step", "4", *FP32]
    runs.append(("coalora-k4", k4))
    runs.append(("k4-mapper-off", [*k4, "--model.use_mapper", "false"]))
    return [(name, [*flags, *common]) for name, flags in runs]


def random_configs() -> list[Path]:
    """The 20 random evaluation configurations, made once (a fixed seed) and reused from then on."""
    folder = HERE / "random"
    files = sorted(folder.glob("random-*.json"))
    if len(files) == RANDOM_COUNT:
        return files
    import torch

    from coalora.pretrained import DEFAULT_MODEL, load_classifier
    from coalora.quant.qconfig import ConfigSpace
    from coalora.quant.targets import discover_targets
    from coalora.utils import quiet_transformers

    with quiet_transformers():
        space = ConfigSpace(
            discover_targets(load_classifier(DEFAULT_MODEL, num_labels=2)), model=DEFAULT_MODEL
        )
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    low, high = RANDOM_RANGE
    folder.mkdir(parents=True, exist_ok=True)
    found: list[Path] = []
    while len(found) < RANDOM_COUNT:
        target = low + (high - low) * float(torch.rand(1, generator=generator))
        config = space.random_near(target, generator)
        if low <= space.avg_bits(config) <= high:
            path = folder / f"random-{len(found):02d}.json"
            space.save(config, path)
            found.append(path)
    return found


def run_seed(seed: int, only: list[str] | None) -> list[dict]:
    """Train and evaluate every planned run of one seed; rows of the issue's schema."""
    root = REPO / "runs" / "lowbit" / f"s{seed}"
    randoms = [str(p) for p in random_configs()]
    rows = []
    for name, flags in planned_runs():
        if only and name not in only:
            continue
        record = train(name, flags, root, SETTINGS, seed)
        serves_any = not name.startswith(("fp", "qlora"))
        extra = ["--budgets", *map(str, BUDGETS), "--qconfig", *randoms] if serves_any else []
        if "32-true" in flags:  # evaluated as it was trained (the default evaluation is bf16)
            extra += ["--precision", "32"]
        for row in evaluate_with(record, root, extra):
            kind = (
                "random"
                if row["kind"] == "qconfig"
                else "budget"
                if row["kind"] in ("budget", "own")
                else row["kind"]
            )
            rows.append(
                {
                    "method": name.split("@")[0],
                    "seed": seed,
                    "label": row["label"],
                    "kind": kind,
                    "avg_bits": row["avg_bits"],
                    "seen": row["seen"],
                    "accuracy": row["accuracy"],
                    "train_seconds": record["train_seconds"],
                }
            )
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cells(rows: list[dict]) -> dict[str, dict]:
    """Per method: mean ± std over seeds at each budget, and of the per-seed mean over the random ones."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seeds = sorted({r["seed"] for r in mine})
        entry: dict = {"seeds": seeds, "budget": {}, "random_mean": None, "budget_mean": None}
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
            if per_seed:
                entry[f"{kind}_mean"] = mean_std(per_seed)
        entry["train_minutes_per_seed"] = round(
            statistics.fmean(
                sum({r["label"]: r["train_seconds"] for r in mine if r["seed"] == s}.values())
                if method == "qlora"
                else next(r["train_seconds"] for r in mine if r["seed"] == s)
                for s in seeds
            )
            / 60,
            1,
        )
        out[method] = entry
    return out


Accuracies = dict[int, float]  # per seed: the mean accuracy over a set of configurations


def per_seed(rows: list[dict], method: str, kind: str, label: str | None = None) -> Accuracies:
    """Per seed, the mean accuracy of ``method`` over its rows of ``kind`` (and ``label``, if given)."""
    found: dict[int, list[float]] = {}
    for r in rows:
        if r["method"] == method and r["kind"] == kind and (label is None or r["label"] == label):
            found.setdefault(r["seed"], []).append(r["accuracy"])
    return {s: statistics.fmean(v) for s, v in found.items()}


def gap(a: Accuracies, b: Accuracies) -> list[float] | None:
    """a − b in points, per seed both have: seeds one run lacks are left out, never averaged apart."""
    common = sorted(set(a) & set(b))
    return [100 * (a[s] - b[s]) for s in common] or None


def difference(rows: list[dict], a: str, b: str) -> dict[str, object]:
    """``a`` − ``b``, mean ± std over seeds: on the random configurations, over the budgets, per budget."""
    out: dict[str, object] = {}
    for kind, key in (("random", "random"), ("budget", "budgets")):
        found = gap(per_seed(rows, a, kind), per_seed(rows, b, kind))
        if found:
            out[key] = mean_std(found)
    per_budget = {}
    for label in map(str, BUDGETS):
        found = gap(per_seed(rows, a, "budget", label), per_seed(rows, b, "budget", label))
        if found:
            per_budget[label] = mean_std(found)
    if per_budget:
        out["per_budget"] = per_budget
    return out


def mapper_gains(rows: list[dict]) -> dict[str, object]:
    """The mapper's gain, only for runs with their exact control (MAPPER_CONTROLS): on minus off."""
    out: dict[str, object] = {}
    for prefix, (on, off) in MAPPER_CONTROLS.items():
        for key, value in difference(rows, on, off).items():
            out[f"{prefix}_mapper_gain_{key}_points"] = value
    return out


def bars(rows: list[dict]) -> dict[str, object]:
    """The issue's three bars, each as a difference of per-seed means, with its std over seeds.

    Bar 1 (the mapper) is judged on the default against its own control only; the default against the
    frozen set's mapper-off run is reported under a name that says what it is (set and mapper both differ).
    """
    result: dict[str, object] = {}
    default = difference(rows, *MAPPER_CONTROLS["search"])
    if "random" in default:
        result["bar_mapper_random_met"] = default["random"][0] >= 1.0
    else:
        result["bar_mapper_not_measured"] = f"no rows of {DEFAULT}'s control {MAPPER_CONTROLS['search'][1]}"
    if "per_budget" in default:
        result["bar_mapper_every_budget_met"] = all(m >= 0 for m, _ in default["per_budget"].values())
    qlora_gap = gap(per_seed(rows, DEFAULT, "budget"), per_seed(rows, "qlora", "budget"))
    if qlora_gap:
        result["gap_to_qlora_points"] = mean_std(qlora_gap)
        result["bar_qlora_met"] = statistics.fmean(qlora_gap) >= -0.5
    search_gap = gap(per_seed(rows, DEFAULT, "random"), per_seed(rows, "coalora-frozen", "random"))
    if search_gap:
        result["search_minus_frozen_random_points"] = mean_std(search_gap)
        result["bar_search_met"] = statistics.fmean(search_gap) >= 0
    result.update(mapper_gains(rows))
    crossed = difference(rows, DEFAULT, FROZEN_MAPPER_OFF)  # the search's set and the mapper, together
    for key in ("random", "per_budget"):
        if key in crossed:
            result[f"search_vs_frozen_mapper_off_{key}_points"] = crossed[key]
    fp32 = {name for name, flags in planned_runs() if "32-true" in flags}  # the mapper-off set ran in bf16
    variants = sorted({r["method"] for r in rows if r["method"].startswith("coalora-")} - fp32)
    by_variant = {}
    for method in variants:  # every bf16 CoA-LoRA variant against the frozen set with the mapper off
        found = gap(per_seed(rows, method, "random"), per_seed(rows, FROZEN_MAPPER_OFF, "random"))
        if found:
            by_variant[method] = mean_std(found)
    if by_variant:
        result["variant_vs_frozen_mapper_off_random_points"] = by_variant
    return result


def main(seeds: list[int], only: list[str] | None) -> None:
    """Train and evaluate what is missing, then report every row: this invocation's and the stored ones."""
    rows = []
    for seed in seeds:
        rows += run_seed(seed, only)
    stored = stored_rows()
    done = {(r["method"], r["seed"], r["label"]) for r in rows}  # running in parts: keep the other rows
    rows = [r for r in stored if (r["method"], r["seed"], r["label"]) not in done] + rows
    machine = f"{os.cpu_count()} CPU cores (this repo's dev machine); see docs/results.md"
    report(
        rows,
        {"machine": machine, "command": "python benchmarks/compare_methods.py " + " ".join(sys.argv[1:])},
    )


def stored_rows() -> list[dict]:
    """The rows docs/bench/lowbit.json holds (none before the first run)."""
    previous = REPO / "docs" / "bench" / "lowbit.json"
    return json.loads(previous.read_text())["rows"] if previous.is_file() else []


def report_only() -> None:
    """Summary, bars, table and plot from the stored rows alone: nothing is trained or evaluated (for a
    change in how rows are summarised). The stored run's machine and command are kept."""
    previous = json.loads((REPO / "docs" / "bench" / "lowbit.json").read_text())
    recomputed = "python benchmarks/compare_methods.py " + " ".join(sys.argv[1:])
    header = {"machine": previous["machine"], "command": previous["command"], "reported_by": recomputed}
    report(previous["rows"], header)


def report(rows: list[dict], header: dict[str, str]) -> None:
    """Write docs/bench/lowbit.{json,md,png} for ``rows``; ``header`` says where and how they were made."""
    out = REPO / "docs" / "bench"
    summary = cells(rows)
    bar = bars(rows)
    result = {
        **header,
        "settings": {**SETTINGS, "budgets": BUDGETS, "random": RANDOM_COUNT, "random_range": RANDOM_RANGE},
        "summary": summary,
        "bars": bar,
        "rows": sorted(rows, key=lambda r: (r["method"], r["seed"], r["kind"], r["label"])),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowbit.json").write_text(
        json.dumps(result, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
        + "\n"
    )
    table = markdown(summary, bar, BUDGETS)
    (out / "lowbit.md").write_text(table)
    plot(rows, summary, out / "lowbit.png", BUDGETS)
    print(table)
