"""Step time and memory of fp-LoRA, QLoRA and CoA-LoRA (K = 1, 2); quantizer and adaptation latency.

Everything is measured side by side in one run, and reported as ratios, because this machine is shared:

- step time: the methods' optimiser steps interleaved (fp, QLoRA, K=1, K=2, K=2 summed, fp, ...) on one
  SST-2 batch; medians. Ratios: QLoRA / fp, CoA-LoRA K=1 / QLoRA, K=2 / (2 × QLoRA), and K=2 with one
  backward per configuration (the default) / K=2 with one backward of the summed losses (issue #13).
- memory: each method in a fresh subprocess, one after another. ``resident_mb`` is the process once the
  module is built and its quantized-weight cache is warm (libraries, weights, cache); ``step_peak_mb`` is
  the highest RSS over the following steps (Linux VmHWM, reset with /proc/self/clear_refs just before
  them), so ``step_peak_over_resident_mb`` is what training adds: activations, gradients, optimiser state.
- quantizer: fake-quantizing all 36 MiniLM targets with NF4 + double quantization against a plain torch
  absmax int4 round trip on the same tensors.
- adaptation: configuration -> ready model, cold (nothing cached) and warm, and the mapper alone; also as a
  fraction of one QLoRA step, since that is what a new configuration costs QLoRA per step of retraining.

On CPU, quantization is simulated (weights are held dequantized, as in the paper's code and QLoRA's compute
path), so QLoRA and CoA-LoRA hold *more* memory than fp-LoRA here, not less; the packed sizes a deployment
holds are in ``bench_adapt``'s artifact table.

    python benchmarks/throughput.py [--steps 8] [--precision bf16|32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_adapt import adapt_latency
from bench_quantizer import absmax_int4
from bench_step import step_configs, train_step
from common import sst2_batch, step_settings, write_result
from proc_memory import reset_peak, status_kb

from coalora.pretrained import DEFAULT_MODEL, load_tokenizer
from coalora.quant.options import NF4_DOUBLE_QUANT
from coalora.quant.quantizer import fake_quantize
from coalora.tasks.classification import ClassificationTask

# name -> (method, configurations per step, one backward per configuration)
RUNS: dict[str, tuple[str, int, bool]] = {
    "fp": ("fp", 1, True),
    "qlora": ("qlora", 1, True),
    "coalora_k1": ("coalora", 1, True),
    "coalora_k2": ("coalora", 2, True),
    "coalora_k2_summed": ("coalora", 2, False),  # one backward of the summed losses (before issue #13)
}


def build(method: str, rank: int) -> ClassificationTask:
    """A module as the shipped SST-2 config trains it; QLoRA at 3.0 bits."""
    budget = {"train_budget": 3.0} if method == "qlora" else {}
    module = ClassificationTask(method=method, rank=rank, alpha=2.0 * rank, **budget)
    return module.train()


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def _rss_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    return status_kb((field,))[field] / 1024


def memory_of(name: str, args: argparse.Namespace) -> dict:
    """Peak memory of one method's training steps, measured in this (fresh) process."""
    method, k, per_config = RUNS[name]
    torch.manual_seed(0)
    module = build(method, args.rank)
    batch = sst2_batch(load_tokenizer(DEFAULT_MODEL), args.batch_size, args.length)
    optimizer = torch.optim.AdamW(module.model.trainable_parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    with _autocast(args.precision):
        if method == "coalora":  # steady state: every training configuration quantized once
            for config in module.train_configs:
                module.model.set_config(config)
        resident = _rss_mb("VmRSS")
        reset_peak()  # VmHWM from the current RSS
        for _ in range(args.memory_steps):  # the first step also creates the optimiser state
            train_step(module, optimizer, batch, step_configs(module, k, generator), per_config)
        peak = _rss_mb("VmHWM")
    return {
        "resident_mb": round(resident, 1),
        "step_peak_mb": round(peak, 1),
        "step_peak_over_resident_mb": round(peak - resident, 1),
        "quant_cache_mb": round(module.model.cache.nbytes / 2**20, 1),
        "trainable_mb": round(sum(p.numel() * 4 for p in module.model.trainable_parameters()) / 2**20, 2),
    }


def _memory_in_subprocess(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--memory-of", name, "--rank", str(args.rank)]
    command += ["--batch-size", str(args.batch_size), "--length", str(args.length)]
    command += ["--precision", args.precision, "--memory-steps", str(args.memory_steps)]
    done = subprocess.run(
        command, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
    )
    if done.returncode != 0:
        raise SystemExit(f"memory run for {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_times(args: argparse.Namespace, batch: dict) -> tuple[dict[str, float], ClassificationTask]:
    """Median step time per method, steps interleaved so that machine noise hits all alike."""
    torch.manual_seed(0)
    modules = {method: build(method, args.rank) for method in ("fp", "qlora", "coalora")}
    optimizers = {
        m: torch.optim.AdamW(mod.model.trainable_parameters(), lr=1e-4) for m, mod in modules.items()
    }
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in RUNS}
    with _autocast(args.precision):
        for config in modules["coalora"].train_configs:  # warm the quantized-weight cache
            modules["coalora"].model.set_config(config)
        for step in range(args.steps + 1):  # step 0 is an untimed warm-up
            for name, (method, k, per_config) in RUNS.items():
                module = modules[method]
                configs = step_configs(module, k, generator)
                seconds = train_step(module, optimizers[method], batch, configs, per_config)
                if step:
                    times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}, modules["coalora"]


def quantizer_latency(module: ClassificationTask, rounds: int) -> dict:
    """All target matrices through NF4 double quantization against a plain absmax int4 round trip."""
    weights = [layer.weight.detach() for layer in module.model.layers]
    jobs = {
        "nf4_double_quant": lambda: [fake_quantize(w, NF4_DOUBLE_QUANT) for w in weights],
        "torch_absmax_int4": lambda: [absmax_int4(w) for w in weights],
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():
        job()
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    return {
        "matrices": len(weights),
        "median_ms": {k: round(v, 1) for k, v in ms.items()},
        "ratio_nf4_dq_to_absmax_int4": round(ms["nf4_double_quant"] / ms["torch_absmax_int4"], 2),
    }


def _progress(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per method in the memory runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--precision", choices=("32", "bf16"), default="bf16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the latency measurements")
    parser.add_argument("--memory-of", choices=tuple(RUNS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args)))
        return

    start = time.perf_counter()
    memory = {}
    for name in RUNS:
        memory[name] = _memory_in_subprocess(name, args)
        _progress(f"memory {name}: {memory[name]}", start)
    batch = sst2_batch(load_tokenizer(DEFAULT_MODEL), args.batch_size, args.length)
    median, coalora = step_times(args, batch)
    _progress(f"step times: {median}", start)
    coalora.eval()
    quantizer = quantizer_latency(coalora, args.reps * 2)
    adapt = adapt_latency(coalora, args.reps)
    _progress("latency done", start)
    qlora_step_ms = median["qlora"] * 1000
    result = {
        **step_settings(args),
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "step_ratios": {
            "qlora_to_fp": round(median["qlora"] / median["fp"], 3),
            "coalora_k1_to_qlora": round(median["coalora_k1"] / median["qlora"], 3),
            "coalora_k2_to_2x_qlora": round(median["coalora_k2"] / (2 * median["qlora"]), 3),
            "coalora_k2_to_fp": round(median["coalora_k2"] / median["fp"], 3),
            "coalora_k2_to_k2_summed": round(median["coalora_k2"] / median["coalora_k2_summed"], 3),
        },
        "memory": memory,
        "k2_step_peak_to_k1": round(
            memory["coalora_k2"]["step_peak_over_resident_mb"]
            / memory["coalora_k1"]["step_peak_over_resident_mb"],
            3,
        ),
        "memory_ratios": {
            name: round(memory[name]["step_peak_mb"] / memory["qlora"]["step_peak_mb"], 3) for name in RUNS
        },
        "quantizer": quantizer,
        "adapt": adapt,
        "cold_adapt_in_qlora_steps": round(adapt["cold_ms"]["median"] / qlora_step_ms, 3),
        "warm_adapt_in_qlora_steps": round(adapt["warm_ms"]["median"] / qlora_step_ms, 4),
        "wall_s": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
    }
    write_result(f"throughput_{args.precision}", result)


if __name__ == "__main__":
    main()
