"""The paper's comparison (SPEC §7, Table 2) on MiniLM / SST-2, in one resumable command.

Trains fp-LoRA, QLoRA and LQ-LoRA per configuration (the four budgets), Shared-LoRA, and CoA-LoRA with the
search, with a frozen set and with random extension — same epochs, batch, rank, lr and seed — then evaluates
every run at 2.5/3.0/3.5/4.0 bits (CoA-LoRA also at random unseen configurations over 2.25-7 bits).

    python benchmarks/compare_methods.py --quick     # ≤ 15 min on a 2-core CPU (small slices)
    python benchmarks/compare_methods.py             # the full comparison (≤ 90 min)
    python benchmarks/compare_methods.py --regime lowbit   # 2.1-3.0 bits, 3 seeds: lowbit_regime.py

Each training run lives in runs/compare[-quick]/<run>/ and is skipped when its done.json exists, so an
interrupted comparison resumes where it stopped. Outputs: docs/bench/compare[_quick].json, a markdown
table (docs/bench/compare[_quick].md) and the plot (docs/bench/compare[_quick].png).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from eval_reuse import evaluate_once

from coalora.eval.hypervolume import hypervolume
from coalora.eval.report import plot
from coalora.eval.results import EvalResult

BUDGETS = (2.5, 3.0, 3.5, 4.0)
DEFAULT_SEED = 42
BASE = "configs/sst2_minilm.yaml"


def planned_runs() -> list[tuple[str, list[str]]]:
    """(run name, extra config flags) for every training run."""
    runs: list[tuple[str, list[str]]] = [("fp", ["--config", "configs/baselines/fp.yaml"])]
    for method in ("qlora", "lqlora"):
        for budget in BUDGETS:
            flags = ["--config", f"configs/baselines/{method}.yaml", "--model.train_budget", str(budget)]
            runs.append((f"{method}@{budget}", flags))
    runs.append(("shared", ["--config", "configs/baselines/shared.yaml"]))
    runs.append(("coalora-search", []))
    runs.append(("coalora-frozen", ["--config", "configs/ablations/frozen.yaml"]))
    runs.append(("coalora-random", ["--config", "configs/ablations/random.yaml"]))
    return runs


def settings(quick: bool) -> dict:
    if quick:
        return {"epochs": 1, "train_limit": 640, "eval_limit": 256, "random": 6, "search_size": 64}
    return {"epochs": 2, "train_limit": None, "eval_limit": None, "random": 20, "search_size": 256}


def _env() -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("GLUE_DIR", str(REPO.parent / "shared" / "data"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train(name: str, flags: list[str], root: Path, cfg: dict, seed: int) -> dict:
    """Train one run (or reuse it); returns its done.json record."""
    folder = root / name.replace("@", "_")
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "coalora.cli",
        "fit",
        "--config",
        BASE,
        *flags,
        "--trainer.max_epochs",
        str(cfg["epochs"]),
        "--trainer.check_val_every_n_epoch",
        str(cfg["epochs"]),
        "--trainer.default_root_dir",
        str(folder),
        "--trainer.logger.init_args.save_dir",
        str(folder),
        "--trainer.enable_progress_bar",
        "false",
        "--seed_everything",
        str(seed),
        "--model.seed",
        str(seed),
        "--data.search_size",
        str(cfg["search_size"]),
    ]
    if cfg["train_limit"]:
        command += ["--data.train_limit", str(cfg["train_limit"])]
    if cfg["eval_limit"]:
        command += ["--data.eval_limit", str(cfg["eval_limit"])]
    print(f"[train] {name}", flush=True)
    start = time.perf_counter()
    with (folder / "train.log").open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives this child's own CPU seconds: on a shared machine they compare where wall time does not
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"training {name} failed (exit {process.returncode}); see {folder / 'train.log'}")
    ckpt = sorted(folder.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    cpu = round(usage.ru_utime + usage.ru_stime, 1)
    record = {"name": name, "ckpt": str(ckpt), "train_seconds": round(seconds, 1), "cpu_seconds": cpu}
    done.write_text(json.dumps(record))
    return record


def evaluate(record: dict, root: Path, cfg: dict) -> list[dict]:
    """The regime's evaluation of one run: budgets (the run's own), plus random ones for CoA-LoRA."""
    random = cfg["random"] if record["name"].startswith("coalora") else 0
    extra = ["--random", str(random)]
    if cfg["eval_limit"]:
        extra += ["--eval-limit", str(cfg["eval_limit"])]
    return evaluate_with(record, root, extra)


def evaluate_with(record: dict, root: Path, extra: list[str]) -> list[dict]:
    """``coalora evaluate`` of a run's checkpoint with ``extra`` flags (bf16 unless they say otherwise), or
    its earlier result when that was written under the same flags, checkpoint and qconfig files."""
    folder = root / record["name"].replace("@", "_") / "eval"
    flags = ["--precision", "bf16", *extra]

    def run() -> None:
        command = [sys.executable, "-m", "coalora.cli", "evaluate", "--ckpt", record["ckpt"]]
        command += ["--out", str(folder), *flags]
        print(f"[eval] {record['name']}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder.parent / "eval.log").open("w") as log:
            result = subprocess.run(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise SystemExit(f"evaluating {record['name']} failed; see {folder.parent / 'eval.log'}")

    rows = evaluate_once(folder, record["ckpt"], flags, run)
    for row in rows:
        row["run"] = record["name"]
    return rows


def table2(rows: list[dict], records: dict[str, dict]) -> dict[str, dict]:
    """The paper's Table 2 columns per method: hypervolume, mean gap to QLoRA, total training time."""

    def at_budgets(prefix: str) -> dict[str, float]:
        found = {}
        for row in rows:
            if row["run"].split("@")[0] == prefix and row["kind"] in ("budget", "own", "fp"):
                found[row["label"]] = row["accuracy"]
        return found

    qlora = at_budgets("qlora")
    methods = ["fp", "qlora", "lqlora", "shared", "coalora-search", "coalora-frozen", "coalora-random"]
    summary = {}
    for method in methods:
        per_budget = at_budgets(method)
        if not per_budget:
            continue
        points = [
            (r["accuracy"], r["avg_bits"])
            for r in rows
            if r["run"].split("@")[0] == method and r["kind"] in ("budget", "own")
        ]
        gaps = [100 * (per_budget[b] - qlora[b]) for b in per_budget if b in qlora]
        seconds = sum(rec["train_seconds"] for name, rec in records.items() if name.split("@")[0] == method)
        summary[method] = {
            "configs_trained_for": {"qlora": 4, "lqlora": 4, "fp": "fp only (ceiling)"}.get(method, "any"),
            "accuracy_at": {b: round(v, 4) for b, v in sorted(per_budget.items())},
            "mean_accuracy": round(sum(per_budget.values()) / len(per_budget), 4),
            "hypervolume": round(hypervolume(points), 4) if method != "fp" else None,
            "mean_gap_to_qlora_points": round(sum(gaps) / len(gaps), 2)
            if gaps and method != "qlora"
            else None,
            "train_minutes_to_serve_4": round(seconds / 60, 1),
        }
    return summary


def markdown(summary: dict[str, dict], cfg: dict) -> str:
    budgets = [f"{b:.1f}" for b in BUDGETS]
    lines = [
        "| method | trained for | "
        + " | ".join(f"acc@{b}" for b in budgets)
        + " | mean | hypervolume | gap to QLoRA (points) | train min to serve 4 |",
        "| --- " * (6 + len(budgets)) + "|",
    ]
    for method, s in summary.items():
        accs = [
            f"{s['accuracy_at'].get(b, s['accuracy_at'].get('fp', float('nan'))) * 100:.2f}" for b in budgets
        ]
        lines.append(
            f"| {method} | {s['configs_trained_for']} | "
            + " | ".join(accs)
            + f" | {s['mean_accuracy'] * 100:.2f} | {_dash(s['hypervolume'])} | "
            + f"{_dash(s['mean_gap_to_qlora_points'])} | "
            + f"{s['train_minutes_to_serve_4']} |"
        )
    return "\n".join(lines) + "\n"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def unseen_summary(rows: list[dict]) -> dict[str, dict]:
    """CoA-LoRA variants at the random unseen configurations: mean, worst and hypervolume, and the points."""
    out = {}
    for method in ("coalora-search", "coalora-frozen", "coalora-random"):
        mine = [r for r in rows if r["run"] == method and r["kind"] == "random"]
        budgets = [r for r in rows if r["run"] == method and r["kind"] == "budget"]
        if mine:
            accuracies = [r["accuracy"] for r in mine]
            every = [(r["accuracy"], r["avg_bits"]) for r in mine + budgets]
            out[method] = {
                "mean_accuracy": round(sum(accuracies) / len(mine), 4),
                "min_accuracy": round(min(accuracies), 4),
                "hypervolume_with_budgets": round(hypervolume(every), 4),
                "points": [(round(r["avg_bits"], 3), round(r["accuracy"], 4)) for r in mine],
            }
    return out


def unseen_markdown(summary: dict[str, dict], unseen: dict[str, dict]) -> str:
    """Issue #4's ablation table: the three CoA-LoRA variants at unseen configurations."""
    lines = [
        "| variant | mean acc, 4 budgets | mean acc, random unseen | worst random | HV, all points |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, found in unseen.items():
        budgets, mean, worst = summary[method]["mean_accuracy"], found["mean_accuracy"], found["min_accuracy"]
        hv = found["hypervolume_with_budgets"]
        lines.append(f"| {method} | {budgets * 100:.2f} | {mean * 100:.2f} | {worst * 100:.2f} | {hv} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small slices: ≤ 15 min on a 2-core CPU")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--only", nargs="*", default=None, help="run only these runs (names as in the plan)")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument(
        "--regime", choices=("paper", "lowbit"), default="paper", help="lowbit: 2.1-3.0 bits, 3 seeds"
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="lowbit: seeds (default 42 43 44)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="lowbit: recompute summary, bars, table and plot from docs/bench/lowbit.json's rows; no runs",
    )
    args = parser.parse_args()
    if args.regime == "lowbit":
        import lowbit_regime

        if args.report_only:
            lowbit_regime.report_only()
        else:
            lowbit_regime.main(args.seeds or list(lowbit_regime.SEEDS), args.only)
        return
    if args.report_only:
        parser.error("--report-only is for --regime lowbit")
    cfg = settings(args.quick)
    suffix = "_quick" if args.quick else ""
    if args.epochs is not None and args.epochs != cfg["epochs"]:
        cfg["epochs"] = args.epochs
        suffix += f"_e{args.epochs}"
    if args.seed != DEFAULT_SEED:  # another seed is another set of runs, never a reuse of these
        suffix += f"_s{args.seed}"
    root = REPO / "runs" / f"compare{suffix.replace('_', '-')}"
    start = time.perf_counter()
    records, rows = {}, []
    for name, flags in planned_runs():
        if args.only and name not in args.only:
            continue
        records[name] = train(name, flags, root, cfg, args.seed)
        rows += evaluate(records[name], root, cfg)
    summary = table2(rows, records)
    result = {
        "machine": f"{os.cpu_count()} CPU cores (this repo's dev machine); see docs/results.md",
        "command": "python benchmarks/compare_methods.py " + " ".join(sys.argv[1:]),
        "settings": cfg,
        "table2": summary,
        "unseen_random": unseen_summary(rows),
        # completed runs are reused, so this invocation's wall time can be far below the work it reports
        "this_invocation_minutes": round((time.perf_counter() - start) / 60, 1),
        "training_minutes_all_runs": round(sum(r["train_seconds"] for r in records.values()) / 60, 1),
        "rows": rows,
    }
    out = REPO / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compare{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    unseen = result["unseen_random"]
    tables = markdown(summary, cfg) + ("\n" + unseen_markdown(summary, unseen) if unseen else "")
    (out / f"compare{suffix}.md").write_text(tables)
    plot(
        [
            EvalResult(
                r["run"],
                r["method"],
                r["label"],
                r["kind"],
                r["avg_bits"],
                r["seen"],
                {"accuracy": r["accuracy"]},
            )
            for r in rows
        ],
        "sst2",
        out / f"compare{suffix}.png",
    )
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    print(tables)


if __name__ == "__main__":
    main()
