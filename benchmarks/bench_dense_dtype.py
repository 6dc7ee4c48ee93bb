"""Dense cache entries in the compute dtype (issue #25, part 3): step time and bytes of MiniLM's training
configurations held dense in fp32 (autocast casts every entry to bf16 on every forward) against held in
bf16 (cast once), side by side in one run, under bf16 autocast.

Two CoA-LoRA tasks of the shipped settings (rank 16, K = 2), both ``quant_cache_mode: dense``; one keeps
the weights' dtype, one ``set_dense_dtype(bfloat16)`` (what ``setup`` does under ``bf16-mixed``). Each
warms its cache with every training configuration, then their optimiser steps alternate on one SST-2 batch
with the same configuration draws; medians. The first timed step's losses must be equal bit for bit.

    python benchmarks/bench_dense_dtype.py [--steps 8] [--batch-size 32] [--length 64]

On a CPU without native bf16 (AVX2 only) every bf16 matmul is emulated and a step is many times its fp32
cost, so the cast saved is a small share there; a GPU or an AMX CPU shows it larger.
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

DTYPES = {"fp32_entries": None, "bf16_entries": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    args.precision = "bf16"
    start = time.perf_counter()
    tasks = {}
    for name, dtype in DTYPES.items():
        torch.manual_seed(0)
        task = ClassificationTask(
            rank=args.rank, alpha=2.0 * args.rank, quant_cache_mode="dense", lora_dropout=0.0
        )
        task.model.set_dense_dtype(dtype)
        tasks[name] = task.eval()  # no dropout: the two tasks' losses compare bit for bit
    optimizers = {n: torch.optim.AdamW(t.model.trainable_parameters(), lr=1e-4) for n, t in tasks.items()}
    batch = sst2_batch(load_tokenizer(DEFAULT_MODEL), args.batch_size, args.length)
    configs = tasks["fp32_entries"].train_configs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for task in tasks.values():
            for config in configs:
                task.model.set_config(config)
        losses = {n: float(t.batch_loss(batch, configs[0]).detach()) for n, t in tasks.items()}
        # the work a bf16 entry saves: autocast casting one configuration's fp32 weights on every forward
        wide = [layer.active_weight for layer in tasks["fp32_entries"].model.layers]
        casts = []
        for _ in range(9):
            begin = time.perf_counter()
            for weight in wide:
                weight.to(torch.bfloat16)
            casts.append(time.perf_counter() - begin)
        times: dict[str, list[float]] = {name: [] for name in tasks}
        generator = torch.Generator().manual_seed(0)
        for step in range(args.steps + 1):  # step 0: untimed warm-up (optimiser state)
            picks = torch.randperm(len(configs), generator=generator)[:2].tolist()
            order = list(tasks.items()) if step % 2 else list(reversed(tasks.items()))
            for name, task in order:
                seconds = train_step(task, optimizers[name], batch, [task.train_configs[i] for i in picks])
                if step:
                    times[name].append(seconds)
    median = {name: statistics.median(found) if found else None for name, found in times.items()}
    pairs = [b / a for a, b in zip(times["fp32_entries"], times["bf16_entries"], strict=True)]
    caches = {name: task.model.cache for name, task in tasks.items()}
    result = {
        **step_settings(args),
        "training_configurations": len(configs),
        "cache_mb": {name: round(cache.nbytes / 2**20, 1) for name, cache in caches.items()},
        "loss_equal_bit_for_bit": losses["fp32_entries"] == losses["bf16_entries"],
        "cast_ms_per_configuration_forward": round(1000 * statistics.median(casts), 2),
        "median_step_s": median,
        "step_times_s": {name: [round(s, 3) for s in found] for name, found in times.items()},
        "bf16_step_over_fp32_per_pair": [round(r, 3) for r in pairs],
        "bf16_step_over_fp32_median_pair": round(statistics.median(pairs), 3) if pairs else None,
        "bars": {
            "cache_half_the_bytes": caches["bf16_entries"].nbytes * 2 == caches["fp32_entries"].nbytes,
            "step_no_slower_median_pair": statistics.median(pairs) <= 1.0 if pairs else None,
        },
        "wall_s": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/bench_dense_dtype.py " + " ".join(sys.argv[1:]),
    }
    write_result("dense_dtype", result)


if __name__ == "__main__":
    main()
