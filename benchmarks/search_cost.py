"""What the configuration search adds to training (issue #25, part 3), measured side by side.

    python benchmarks/search_cost.py --seed 42            # the three runs at once, one thread each
    python benchmarks/search_cost.py --collect            # rebuild docs/bench/search_cost.json

The low-bit regime's setting (``lowbit_regime.py``: 100 steps on 3,200 SST-2 sentences, a round every 25
steps, f1 on the whole 256-sentence search split), fp32. Three runs of one seed start together, each on one
thread, so that they share the machine alike: ``coalora-frozen`` (the set never changes; it scores its set
each round so that fronts compare), ``coalora-search`` (``rescore: relevant``, the default: the set, the
front and the new candidates) and ``search-rescore-all`` (every round rescores the whole archive, as before).
Reported per run: wall time, the rounds' seconds and how many configurations each scored, the final
training set's mean f1 and the archive's hypervolume in the last round. Runs: ``runs/search_cost/s<seed>``.

The two searches' final training sets are also scored by one model (``--cross-score``: the rescore-all
run's last checkpoint, whole search split), so that the sets compare on equal terms: mean f1, and the
hypervolume of each set under a shared reference point.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import write_result
from compare_methods import REPO, train
from lowbit_regime import SETTINGS

LOWBIT = Path("benchmarks") / "lowbit"
CELLS = {
    "coalora-frozen": ["--config", str(LOWBIT / "frozen.yaml")],
    "coalora-search": ["--config", str(LOWBIT / "search.yaml")],
    "search-rescore-all": ["--config", str(LOWBIT / "search_rescore_all.yaml")],
}
FP32 = ["--trainer.precision", "32-true", "--trainer.limit_val_batches", "0"]
ROOT = REPO / "runs" / "search_cost"
#: resamples of the search sentences for the hypervolume difference's std (each recomputes two fronts)
HYPERVOLUME_DRAWS = 200


def run(seed: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # each run on one thread: three share two cores alike
    root = ROOT / f"s{seed}"
    with ThreadPoolExecutor(len(CELLS)) as pool:
        jobs = [pool.submit(train, n, [*f, *FP32], root, SETTINGS, seed) for n, f in CELLS.items()]
        for job in jobs:
            job.result()


def summary(folder: Path) -> dict:
    """One finished run's wall time, rounds and final set, from done.json, metrics.csv and the archive."""
    record = json.loads((folder / "done.json").read_text())
    metrics = max(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    rounds: list[dict] = []
    for row in csv.DictReader(metrics.open()):
        search = {k: v for k, v in row.items() if k.startswith("search/")}
        # the epoch's end logs the last round's values once more: keep each round once
        if row.get("search/round_seconds") and (not rounds or search != rounds[-1]):
            rounds.append(search)
    newest = max(folder.rglob("search_archive.json"), key=lambda p: p.stat().st_mtime)
    archive = json.loads(newest.read_text())
    final = [e["f1"] for e in archive["entries"] if e["training"]]
    round_s = [float(r["search/round_seconds"]) for r in rounds]
    return {
        "train_seconds": record["train_seconds"],
        "cpu_seconds": record.get("cpu_seconds") or _polled_cpu(folder),
        "rounds": len(rounds),
        "round_seconds": [round(s, 1) for s in round_s],
        "steps_seconds": round(record["train_seconds"] - sum(round_s), 1),
        "scored_per_round": [int(float(r["search/scored_configs"] or "nan")) for r in rounds]
        if rounds and "search/scored_configs" in rounds[0]
        else None,
        "archive_size": [int(float(r["search/archive_size"])) for r in rounds],
        "final_set_size": len(final),
        "final_set_mean_f1": round(statistics.fmean(final), 5),
        "last_hypervolume": archive["hypervolume"],
    }


def cross_score(seed: int) -> dict:
    """Both searches' final training sets scored by the rescore-all run's last checkpoint, sentence by
    sentence, so that the difference of their mean f1 comes with its paired bootstrap std over resampled
    search sentences (the noise of the scoring split; seeds give the noise of training)."""
    import torch
    from f1_noise import DRAWS, per_sentence_losses

    from callbacks.pareto_search import ParetoConfigSearch
    from coalora.quant.qconfig import QConfig
    from coalora.search.pareto import hypervolume, reference_point
    from coalora.search.scoring import eval_mode
    from coalora.tasks.checkpoint import load_task

    root = ROOT / f"s{seed}"
    ckpt = next((root / "search-rescore-all").rglob("last.ckpt"))
    module = load_task(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    data = module.data_module(**saved)
    data.setup("fit")

    class Run:  # what _search_batches reads of a trainer
        datamodule = data

    batches = ParetoConfigSearch()._search_batches(Run(), module)
    points, per_sentence, losses = {}, {}, {}
    for cell in ("coalora-search", "search-rescore-all"):
        archive = json.loads(next((root / cell).rglob("search_archive.json")).read_text())
        entries = [e for e in archive["entries"] if e["training"]]
        with eval_mode(module):
            losses[cell] = torch.stack(
                [per_sentence_losses(module, QConfig.from_json(e["qconfig"]), batches) for e in entries]
            )  # (configurations, sentences)
        per_sentence[cell] = losses[cell].mean(0)  # the set's mean f1, sentence by sentence
        f1 = losses[cell].mean(1)
        points[cell] = torch.tensor([[float(a), e["f2"]] for a, e in zip(f1, entries, strict=True)])
    ref = reference_point(torch.cat(list(points.values())))
    gap = per_sentence["coalora-search"] - per_sentence["search-rescore-all"]
    draws = torch.randint(0, len(gap), (DRAWS, len(gap)), generator=torch.Generator().manual_seed(0))
    volume_gaps = []  # the hypervolume difference under the same resamples (f2 is exact; ref fixed)
    for draw in draws[:HYPERVOLUME_DRAWS]:
        resampled = {
            cell: torch.stack([losses[cell][:, draw].mean(1), points[cell][:, 1]], dim=-1) for cell in points
        }
        volume_gaps.append(
            hypervolume(resampled["coalora-search"], ref) - hypervolume(resampled["search-rescore-all"], ref)
        )
    return {
        "model": str(ckpt),
        **{
            cell: {
                "set_size": len(y),
                "mean_f1": round(float(y[:, 0].mean()), 5),
                "mean_bits": round(float(y[:, 1].mean()), 3),
                "hypervolume": round(hypervolume(y, ref), 5),
            }
            for cell, y in points.items()
        },
        "mean_f1_relevant_minus_all": round(float(gap.mean()), 5),
        "paired_bootstrap_std": round(float(gap[draws].mean(-1).std()), 5),
        "hypervolume_relevant_minus_all": round(
            hypervolume(points["coalora-search"], ref) - hypervolume(points["search-rescore-all"], ref), 5
        ),
        "hypervolume_paired_bootstrap_std": round(statistics.stdev(volume_gaps), 5),
        "search_sentences": len(gap),
    }


def _polled_cpu(folder: Path) -> float | None:
    """CPU seconds of a run recorded before train() kept them: the last /proc poll of its process."""
    polled = ROOT / "cpu_poll.json"
    if not polled.is_file():
        return None
    return json.loads(polled.read_text()).get(str(folder), {}).get("cpu_seconds")


def collect() -> dict:
    """Every finished seed here, plus the committed JSON's seeds whose runs are not on this machine (runs
    are never committed: a later session must not drop an earlier one's rows)."""
    committed = REPO / "docs" / "bench" / "search_cost.json"
    seeds = json.loads(committed.read_text()).get("seeds", {}) if committed.is_file() else {}
    for folder in sorted(ROOT.glob("s*")):
        cells = {name: summary(folder / name) for name in CELLS if (folder / name / "done.json").is_file()}
        if "coalora-frozen" in cells:
            frozen = cells["coalora-frozen"]["train_seconds"]
            frozen_cpu = cells["coalora-frozen"]["cpu_seconds"]
            for cell in cells.values():
                cell["wall_vs_frozen"] = round(cell["train_seconds"] / frozen, 3)
                if frozen_cpu and cell["cpu_seconds"]:
                    cell["cpu_vs_frozen"] = round(cell["cpu_seconds"] / frozen_cpu, 3)
        cross = folder / "cross_score.json"
        if cross.is_file():
            cells["cross_score"] = json.loads(cross.read_text())
        seeds[folder.name] = cells
    seeds = dict(sorted(seeds.items()))
    return {
        "command": "python benchmarks/search_cost.py --seed 42 (43, 44: the same with --seed)",
        "setting": "low-bit regime, fp32, 100 steps, rounds at steps 25/50/75, 3 runs at once, 1 thread each",
        "machine": {"cpus": os.cpu_count(), "load_avg_at_collect": os.getloadavg()},
        "seeds": seeds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--collect", action="store_true", help="only rebuild the JSON from finished runs")
    parser.add_argument("--cross-score", action="store_true", help="score both final sets by one model")
    args = parser.parse_args()
    if not args.collect:
        run(args.seed)
    if args.cross_score or not args.collect:
        result = cross_score(args.seed)
        (ROOT / f"s{args.seed}" / "cross_score.json").write_text(json.dumps(result, indent=1) + "\n")
    write_result("search_cost", collect())


if __name__ == "__main__":
    main()
