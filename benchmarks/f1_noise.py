"""How noisy is the search's f1 against the differences it acts on (issue #25, part 3)?

    python benchmarks/f1_noise.py --run runs/search_cost/s42/coalora-search [--configs 40]

Takes a finished search run (its ``last.ckpt`` and ``search_archive.json``), scores archive configurations
with per-sentence losses on the run's own search split (the same sentences the callback scored), and
reports:

- ``repeat_max_abs``: the same configuration scored twice (eval mode, fixed batches): f1 is deterministic.
- ``sampling_std``: the bootstrap std of f1 over resamples of the search sentences (1,000 draws), i.e. how
  much f1 would move on another 256 sentences from the same data.
- The differences the segment filter acts on: for configurations in the same segment (40 segments of
  avg_bits), |f1(a) − f1(b)| and its paired bootstrap std (same resampled sentences for both); the share
  of pairs whose sign is stable (|Δ| > 2 paired std).
- The first half of the split against all of it: Spearman correlation of f1 across configurations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result

from coalora.quant.qconfig import QConfig
from coalora.search.scoring import eval_mode
from coalora.tasks.checkpoint import load_task

DRAWS = 1000


def per_sentence_losses(module, config: QConfig, batches: list[dict]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for batch in batches:
            logits = module(batch, config)
            out.append(F.cross_entropy(logits.float(), batch["labels"], reduction="none"))
    return torch.cat(out).double()


def ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished training run's folder")
    parser.add_argument("--configs", type=int, default=40, help="archive configurations to score")
    args = parser.parse_args()
    run = Path(args.run)
    ckpt = sorted(run.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    archive = json.loads(next(run.rglob("search_archive.json")).read_text())
    module = load_task(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    data = module.data_module(**saved)
    data.setup("fit")
    batches = list(data.search_dataloader(batch_size=32))
    entries = sorted(archive["entries"], key=lambda e: e["f2"])[: args.configs]
    configs = [QConfig.from_json(e["qconfig"]) for e in entries]
    bits = torch.tensor([e["f2"] for e in entries], dtype=torch.float64)
    with eval_mode(module):
        losses = torch.stack([per_sentence_losses(module, c, batches) for c in configs])  # (C, N)
        repeat = per_sentence_losses(module, configs[0], batches)
    n = losses.shape[1]
    f1 = losses.mean(1)
    draws = torch.randint(0, n, (DRAWS, n), generator=torch.Generator().manual_seed(0))
    boot = losses[:, draws].mean(-1)  # (C, DRAWS)
    low, high = 2.25, 7.15
    segment = ((bits - low) / ((high - low) / 40)).floor().clamp(0, 39)
    pairs = [(i, j) for i, j in itertools.combinations(range(len(configs)), 2) if segment[i] == segment[j]]
    diffs = [abs(float(f1[i] - f1[j])) for i, j in pairs]
    paired_std = [float((boot[i] - boot[j]).std()) for i, j in pairs]
    stable = [d > 2 * s for d, s in zip(diffs, paired_std, strict=True)]
    half = losses[:, : n // 2].mean(1)
    result = {
        "run": str(run),
        "checkpoint": str(ckpt),
        "search_sentences": n,
        "configs_scored": len(configs),
        "repeat_max_abs": float((repeat - losses[0]).abs().max()),
        "f1_range": [round(float(f1.min()), 5), round(float(f1.max()), 5)],
        "f1_std_across_configs": round(float(f1.std()), 5),
        "sampling_std_median": round(statistics.median(boot.std(1).tolist()), 5),
        "same_segment_pairs": len(pairs),
        "same_segment_abs_diff_median": round(statistics.median(diffs), 5) if diffs else None,
        "same_segment_paired_std_median": round(statistics.median(paired_std), 5) if pairs else None,
        "same_segment_sign_stable_share": round(sum(stable) / len(stable), 3) if stable else None,
        "spearman_first_half_vs_whole": round(spearman(half, f1), 3),
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "command": "python benchmarks/f1_noise.py " + " ".join(sys.argv[1:]),
    }
    write_result("f1_noise", result)


if __name__ == "__main__":
    main()
