"""The packed training cache (issue #13, item 4): bytes and step time of MiniLM's 50 training
configurations held packed against held dequantized, side by side in one run.

Two CoA-LoRA tasks of the shipped settings (rank 16, K = 2, bf16 autocast), one with
``quant_cache_mode: dense`` and one with ``packed``; each warms its cache with every training configuration,
then their optimiser steps are interleaved (dense, packed, dense, ...) on one SST-2 batch with the same
configuration draws; medians. The cache bytes are the tensors it holds (exact, not RSS).

    python benchmarks/bench_packed_cache.py [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_step import train_step
from common import sst2_batch, step_settings, write_result

from coalora.pretrained import DEFAULT_MODEL, load_tokenizer
from coalora.tasks.classification import ClassificationTask

MODES = ("dense", "packed")
BAR_MB = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--precision", choices=("32", "bf16"), default="bf16")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    tasks = {
        mode: ClassificationTask(rank=args.rank, alpha=2.0 * args.rank, quant_cache_mode=mode).train()
        for mode in MODES
    }
    optimizers = {m: torch.optim.AdamW(t.model.trainable_parameters(), lr=1e-4) for m, t in tasks.items()}
    batch = sst2_batch(load_tokenizer(DEFAULT_MODEL), args.batch_size, args.length)
    warm_s = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        for mode, task in tasks.items():
            begin = time.perf_counter()
            for config in task.train_configs:
                task.model.set_config(config)
            warm_s[mode] = time.perf_counter() - begin
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        generator = torch.Generator().manual_seed(0)
        for step in range(args.steps + 1):  # step 0: untimed warm-up (optimiser state)
            picks = torch.randperm(len(tasks["dense"].train_configs), generator=generator)[:2].tolist()
            for mode, task in tasks.items():  # the same two configurations for both (the same allocation)
                seconds = train_step(task, optimizers[mode], batch, [task.train_configs[i] for i in picks])
                if step:
                    times[mode].append(seconds)
    median = {mode: statistics.median(found) for mode, found in times.items()}
    caches = {mode: task.model.cache for mode, task in tasks.items()}
    packed_mb = caches["packed"].nbytes / 2**20
    result = {
        **step_settings(args),
        "training_configurations": len(tasks["dense"].train_configs),
        "cache_mb": {mode: round(cache.nbytes / 2**20, 1) for mode, cache in caches.items()},
        "cache_entries": {mode: len(cache) for mode, cache in caches.items()},
        "warm_all_configurations_s": {mode: round(s, 2) for mode, s in warm_s.items()},
        "median_step_s": {mode: round(s, 4) for mode, s in median.items()},
        "packed_step_over_dense": round(median["packed"] / median["dense"], 3),
        "bar_cache_mb": {"value": round(packed_mb, 1), "limit": BAR_MB, "met": packed_mb <= BAR_MB},
        "wall_s": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/bench_packed_cache.py " + " ".join(sys.argv[1:]),
    }
    write_result("packed_cache", result)


if __name__ == "__main__":
    main()
