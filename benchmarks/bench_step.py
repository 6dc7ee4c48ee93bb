"""Training-step cost of CoA-LoRA against plain LoRA on one fixed quantized model, side by side.

CoA-LoRA runs K configurations per step (switching quantized weights and calling the mapper each time);
the target is ≤ 1.15 × K × a QLoRA step. Steps are interleaved (A, B, C, A, B, C, ...) so that machine noise
hits every method alike; medians are reported. The quantized-weight cache is warmed first (steady state);
the cold cost of a configuration's first use is reported separately.

    python benchmarks/bench_step.py [--steps 12] [--precision 32|bf16]
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

from common import sst2_batch, step_settings, write_result

from coalora.pretrained import DEFAULT_MODEL, load_tokenizer
from coalora.tasks.classification import ClassificationTask


def train_step(
    module: ClassificationTask, optimizer, batch: dict, configs: list, per_config: bool = True
) -> float:
    """One optimiser step over the mean loss of ``configs``; returns its wall time. ``per_config``: one
    backward per configuration, as the task trains by default (``backward_per_config``); else one
    backward of the summed losses (all graphs alive, the behaviour before issue #13)."""
    start = time.perf_counter()
    if per_config:
        for config in configs:
            (module.batch_loss(batch, config) / len(configs)).backward()
    else:
        (sum(module.batch_loss(batch, c) for c in configs) / len(configs)).backward()
    torch.nn.utils.clip_grad_norm_(module.model.trainable_parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--precision", choices=("32", "bf16"), default="bf16")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = sst2_batch(load_tokenizer(DEFAULT_MODEL), args.batch_size, args.length)
    qlora = ClassificationTask(method="qlora", train_budget=3.0, rank=args.rank)
    coalora = ClassificationTask(method="coalora", rank=args.rank)
    runs = {"qlora": (qlora, 1), "coalora_k1": (coalora, 1), "coalora_k2": (coalora, 2)}
    optimizers = {m: torch.optim.AdamW(m.model.trainable_parameters(), lr=1e-4) for m in (qlora, coalora)}

    cold = []
    for config in coalora.train_configs:  # warm the cache: every training configuration quantized once
        start = time.perf_counter()
        coalora.model.set_config(config)
        cold.append(time.perf_counter() - start)
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        for module, k in runs.values():  # one untimed warm-up step each
            train_step(module, optimizers[module], batch, step_configs(module, k, generator))
        for _ in range(args.steps):
            for name, (module, k) in runs.items():
                times[name].append(
                    train_step(module, optimizers[module], batch, step_configs(module, k, generator))
                )
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        **step_settings(args),
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "ratio_coalora_k1_to_qlora": round(median["coalora_k1"] / median["qlora"], 3),
        "ratio_coalora_k2_to_2x_qlora": round(median["coalora_k2"] / (2 * median["qlora"]), 3),
        "target_ratio": 1.15,
        "cold_config_switch_s": {"median": round(statistics.median(cold), 4), "max": round(max(cold), 4)},
        "quant_cache_entries": len(coalora.model.cache),
        "train_configs": len(coalora.train_configs),
    }
    write_result(f"step_{args.precision}", result)


def step_configs(module: ClassificationTask, k: int, generator: torch.Generator) -> list:
    """The configurations of one step: K random training ones for CoA-LoRA, the method's own otherwise."""
    if module.hparams.method == "fp":
        return [None]
    if module.hparams.method != "coalora":
        return [module.train_configs[0]]
    picks = torch.randperm(len(module.train_configs), generator=generator)[:k]
    return [module.train_configs[int(i)] for i in picks]


if __name__ == "__main__":
    main()
