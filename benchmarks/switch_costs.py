"""The three costs of a cold switch that were not the quantizer's pass (issue #25 part 2), each measured
against what replaced it, on MiniLM's 36 target matrices:

- ``memory``: cold switches (``AdaptiveModel``, 2 threads) in a process with glibc's defaults
  (``COALORA_KEEP_FREED_MEMORY=0``) and in one that keeps freed buffers (each a fresh subprocess: the
  setting is process-wide), with the minor page faults a switch;
- ``threads``: the compiled ``quantize_both`` of every target at one option (freed buffers kept, as in
  ``AdaptiveModel``), on one thread, on two
  threads with one pool task per matrix (before), and in two balanced shares (``rounding._map``, now);
- ``fold``: B + B·D for every target, one float64 product per layer (before) against ``fold_all``.

    python benchmarks/switch_costs.py [--rounds 15]

Medians over the rounds, jobs alternated; writes docs/bench/switch_costs.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

SHAPES = [(384, 384)] * 24 + [(1536, 384)] * 6 + [(384, 1536)] * 6  # MiniLM's targets


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def memory_probe(keep: bool, rounds: int) -> dict:
    """In this (fresh) process: cold switches of MiniLM (nothing quantized cached) at 2 threads over the
    evaluation configurations, with glibc's defaults or with freed buffers kept; minor faults a switch."""
    import os

    os.environ["COALORA_KEEP_FREED_MEMORY"] = "1" if keep else "0"
    from coalora.deploy.adaptive import AdaptiveModel
    from coalora.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    module = ClassificationTask(rank=16, alpha=32.0, train_budgets=[]).eval()
    served = AdaptiveModel(module, threads=2)
    configs = list(module.eval_configs.values())
    times, faults = [], []
    for index in range(rounds + 1):
        for config in configs:
            module.model.set_config(None)
            module.model.cache.clear()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            served.adapt(config)
            seconds = time.perf_counter() - start
            if index:  # round 0 warms up
                times.append(seconds)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    kept = os.environ["COALORA_KEEP_FREED_MEMORY"] == "1"
    return {"kept": kept, "median_ms": _ms(statistics.median(times)), "faults": statistics.median(faults)}


def memory(rounds: int) -> dict:
    result: dict = {}
    for label in ("glibc_defaults", "kept", "glibc_defaults", "kept"):  # alternated, last pair kept
        command = [sys.executable, __file__, "--probe", label, "--rounds", str(rounds)]
        result[label] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return result


def threads(rounds: int) -> dict:
    from coalora.deploy.memory import keep_freed_memory
    from coalora.quant.options import NF4_DOUBLE_QUANT
    from coalora.quant.quantizer import block_absmax, compiled, quantize_both
    from coalora.quant.rounding import _map

    keep_freed_memory()  # as AdaptiveModel runs (run after the memory probes, in their own processes)
    torch.set_num_threads(1)
    weights = [torch.randn(shape) for shape in SHAPES]
    absmax = [block_absmax(w, NF4_DOUBLE_QUANT.block) for w in weights]

    def one(i: int) -> object:
        return quantize_both(weights[i], NF4_DOUBLE_QUANT, "nf", absmax[i])

    pool = ThreadPoolExecutor(2)
    costs = [w.numel() for w in weights]
    jobs = {
        "one_thread": lambda: [one(i) for i in range(len(weights))],
        "two_threads_task_per_matrix": lambda: list(pool.map(one, range(len(weights)))),
        "two_threads_two_shares": lambda: _map(one, len(weights), 2, costs),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():
        job()
    for index in range(rounds):
        names = list(jobs)[index % 3 :] + list(jobs)[: index % 3]
        for name in names:
            start = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - start)
    return {"compiled_pass": compiled(weights[0])} | {
        name: _ms(statistics.median(found)) for name, found in times.items()
    }


def fold(rounds: int) -> dict:
    from torch import nn

    from coalora.nn.lora import LoRALinear, fold_all

    torch.manual_seed(0)
    torch.set_num_threads(1)
    layers = [LoRALinear(nn.Linear(i, o), rank=16, alpha=32) for o, i in SHAPES]
    for layer in layers:
        nn.init.normal_(layer.lora_B, std=0.02)
    adjustments = [0.05 * torch.randn(16, 16) for _ in layers]

    def float64_each() -> list[torch.Tensor]:
        out = []
        for layer, d in zip(layers, adjustments, strict=True):
            b = layer.lora_B.detach().double()
            out.append((b + b @ d.double()).float())
        return out

    jobs = {"float64_per_layer": float64_each, "fold_all": lambda: fold_all(layers, adjustments)}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    with torch.no_grad():
        for index in range(rounds):
            for name in list(jobs)[index % 2 :] + list(jobs)[: index % 2]:
                start = time.perf_counter()
                jobs[name]()
                times[name].append(time.perf_counter() - start)
        worst = max((a - b).abs().max().item() for a, b in zip(fold_all(layers, adjustments), float64_each()))
    return {name: _ms(statistics.median(found)) for name, found in times.items()} | {
        "max_abs_difference": worst
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--probe", choices=["glibc_defaults", "kept"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.probe == "kept", args.rounds)))
        return
    from common import write_result

    result = {
        "command": "python benchmarks/switch_costs.py " + " ".join(sys.argv[1:]),
        "memory": memory(args.rounds),
        "threads": threads(args.rounds),
        "fold": fold(args.rounds),
    }
    write_result("switch_costs", result)


if __name__ == "__main__":
    main()
