"""What a quantized-weight cache too small for the training set costs a causal-LM step (issue #12, item 6).

At 7B one configuration's dequantized targets are ~13 GB, so the training set's 50 configurations never
fit and the cache re-quantizes on the weights' device whenever a drawn option was evicted. This measures,
side by side in one run on the tiny LLaMA (``runs/tiny-llama-sst2``, or ``--model``), K = 2 CoA-LoRA
steps with a cache that holds every option against one bounded to a single configuration's bytes:
median step time, cache hits and misses, and the cache's bytes.

    python benchmarks/bench_lm_cache.py        # writes docs/bench/lm_cache.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coalora.tasks.causal_lm import CausalLMTask


def make_task(model: str, cache_gb: float) -> CausalLMTask:
    return CausalLMTask(model_name=model, rank=16, alpha=32.0, quant_cache_gb=cache_gb, configs_per_step=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/tiny-llama-sst2", help="relative to the repository")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = str(REPO / args.model) if not Path(args.model).is_absolute() else args.model
    unbounded = make_task(model, 4.0)
    one_config_gb = 4 * unbounded.model.space.total_numel / 2**30  # fp32 dequantized targets, one config
    tasks = {"unbounded": unbounded, "one_configuration": make_task(model, one_config_gb)}
    ids = torch.randint(5, 4000, (8, 128))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    optimizers = {k: t.configure_optimizers() for k, t in tasks.items()}
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for step in range(args.steps):  # interleaved: both see the same machine load
        for name, task in tasks.items():
            task.train()
            configs = [task.train_configs[(step * 7 + j * 13) % len(task.train_configs)] for j in range(2)]
            start = time.perf_counter()
            loss = sum(task.batch_loss(batch, c) for c in configs) / 2
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            times[name].append(time.perf_counter() - start)
    result = {
        "model": args.model,
        "command": "python benchmarks/bench_lm_cache.py " + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "batch": list(ids.shape),
        "one_configuration_bytes": int(one_config_gb * 2**30),
        "median_step_s": {k: round(statistics.median(v[2:]), 4) for k, v in times.items()},
        "cache": {
            k: {"hits": t.model.cache.hits, "misses": t.model.cache.misses, "bytes": t.model.cache.nbytes}
            for k, t in tasks.items()
        },
    }
    median = result["median_step_s"]
    result["ratio_bounded_to_unbounded"] = round(median["one_configuration"] / median["unbounded"], 3)
    out = REPO / "docs" / "bench" / "lm_cache.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
