"""GPTQ rounding (coalora/quant/gptq.py) on MiniLM's 36 target matrices against round-to-nearest.

Calibration statistics are built elsewhere (issue #24 item 1), so each input site gets a synthetic
second moment H = XᵀX/n from random correlated activations: a low-rank shared part plus noise, with
log-normal per-feature scales (a few features much larger than the rest, as in real transformers).
q, k and v read one input, so a layer has four sites: q/k/v, attention output, FFN in, FFN out.

Measured at ``--threads`` (2) torch threads; every round runs every job once, in turn, and medians over
the rounds are reported with the fastest round and the process's CPU time (the machine is shared):

* ``factors_of_all_sites_ms``: :func:`feedback_factor` of the 24 sites, once per site and reused by every
  configuration: float32 (the default), float64, and float32 with its factorisations on all threads;
* ``timings``, per configuration, with the factors given: ``gptq_quantize_many`` over the 36 matrices
  (stacked), RTN ``quantize`` of the same, ``gptq_fake_quantize_many``; for nf3 also GPTQ one matrix at a
  time (given its factor, or its Hessian: ``gptq_quantize`` factorises it on every call) and variants of
  the method: other ``block_columns``, other sub-batches, no sub-batch, every product on all threads;
* ``error_ratio_gptq_over_rtn``: the activation-weighted error tr(E H Eᵀ), E = W − Q, summed over the 36
  matrices, GPTQ over RTN (and the median of the per-matrix ratios), per configuration; the same with
  float64 factors; and with other scales (same format): each block's absmax times 0.95 ... 0.7 before
  its double quantization, against RTN with the usual scales.

    python benchmarks/bench_gptq.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result

from coalora.pretrained import DEFAULT_MODEL, load_classifier
from coalora.quant import gptq, quantizer
from coalora.quant.gptq import feedback_factor, gptq_fake_quantize_many, gptq_quantize, gptq_quantize_many
from coalora.quant.options import OPTION_SPACE, QuantOption
from coalora.quant.quantizer import fake_quantize, quantize
from coalora.quant.targets import TargetMatrix, discover_targets, target_weights
from coalora.utils import quiet_transformers

SHARED_INPUT = ("query", "key", "value", "q_proj", "k_proj", "v_proj")


def site_of(target: TargetMatrix) -> str:
    """Matrices reading the same input share a site (and so a Hessian and a factor)."""
    if target.module_type.rsplit(".", 1)[-1] in SHARED_INPUT:
        return f"{target.block_index}.qkv"
    return f"{target.block_index}.{target.module_type}"


def synthetic_hessian(width: int, generator: torch.Generator, samples: int = 4096) -> torch.Tensor:
    """H = XᵀX/n of random correlated activations: rank-32 shared part + noise, log-normal feature scales."""
    shared = torch.randn(samples, 32, generator=generator) @ torch.randn(32, width, generator=generator)
    x = shared / 32**0.5 + 0.3 * torch.randn(samples, width, generator=generator)
    x = x * torch.exp(0.7 * torch.randn(width, generator=generator))
    return x.t() @ x / samples


def weighted_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    e = (weight - quantized).double()
    return float(((e @ hessian.double()) * e).sum())


def configurations(n: int) -> dict[str, list[QuantOption]]:
    """Uniform configurations at each bits, and one mixed (random options, seed 0)."""
    uniform = {f"nf{b}": QuantOption(b, 8, "fp32", 64, 256) for b in (2, 3, 4, 8)}
    table = {name: [option] * n for name, option in uniform.items()}
    table["nf3_s4_fp16_32_64"] = [QuantOption(3, 4, "fp16", 32, 64)] * n
    table["nf2_s2_bf16_16_16"] = [QuantOption(2, 2, "bf16", 16, 16)] * n
    rng = random.Random(0)
    table["mixed_random"] = [rng.choice(OPTION_SPACE) for _ in range(n)]
    return table


def timed(jobs: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Wall time (median and fastest round) and the process's CPU time (median), in ms, of each job.
    Every round runs every job once, in turn, so that the shared machine's noise hits them alike."""
    wall: dict[str, list[float]] = {name: [] for name in jobs}
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            job()
            wall[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return {
        name: {
            "median_ms": round(statistics.median(wall[name]), 1),
            "fastest_ms": round(min(wall[name]), 1),
            "cpu_median_ms": round(statistics.median(cpu[name]), 1),
        }
        for name in jobs
    }


def patched(name: str, value: object, job: Callable[[], object]) -> Callable[[], object]:
    """``job`` run with ``coalora.quant.gptq.<name>`` set to ``value`` (a variant of the method)."""

    def run() -> object:
        before = getattr(gptq, name)
        setattr(gptq, name, value)
        try:
            return job()
        finally:
            setattr(gptq, name, before)

    return run


def clipped_scales(alpha: float, job: Callable[[], object]) -> Callable[[], object]:
    """``job`` with every block's absmax times ``alpha`` before its double quantization: other scales, in
    the same format (a weight beyond its scale rounds to the end level). Patches what gptq.py calls."""

    class Clipped:
        @staticmethod
        def of(weight: torch.Tensor, option: QuantOption) -> quantizer.BlockedWeight:
            blocks = quantizer.BlockedWeight.of(weight, option).blocks
            absmax = blocks.float().abs().amax(dim=1) * alpha
            return quantizer.BlockedWeight(blocks, *quantizer.double_quantize_scales(absmax, option))

    return patched("BlockedWeight", Clipped, job)


def error_ratio(weights, options, hessians, gptq_values) -> dict[str, float]:
    rtn = [fake_quantize(w, o) for w, o in zip(weights, options, strict=True)]
    g = sum(weighted_error(w, q, h) for w, q, h in zip(weights, gptq_values, hessians, strict=True))
    r = sum(weighted_error(w, q, h) for w, q, h in zip(weights, rtn, hessians, strict=True))
    per = [
        weighted_error(w, q, h) / weighted_error(w, p, h)
        for w, q, p, h in zip(weights, gptq_values, rtn, hessians, strict=True)
    ]
    return {"sum_ratio": round(g / r, 4), "per_matrix_median": round(statistics.median(per), 4)}


def timing_jobs(weights, options, factors, hessians, variants: bool) -> dict[str, Callable[[], object]]:
    """One configuration's jobs: the default call, RTN, and (if ``variants``) variants of the method."""

    def many(block_columns: int = gptq.BLOCK_COLUMNS) -> Callable[[], object]:
        return lambda: gptq_quantize_many(weights, options, "nf", factors, block_columns)

    jobs = {
        "gptq_quantize_many": many(),
        "rtn_quantize": lambda: [quantize(w, o) for w, o in zip(weights, options, strict=True)],
        "gptq_fake_quantize_many": lambda: gptq_fake_quantize_many(weights, options, "nf", factors),
    }
    if not variants:
        return jobs
    return jobs | {
        "one_matrix_at_a_time": lambda: [
            gptq_quantize_many([w], [o], "nf", [f]) for w, o, f in zip(weights, options, factors, strict=True)
        ],
        "gptq_quantize_with_its_hessian_each": lambda: [
            gptq_quantize(w, o, "nf", h) for w, o, h in zip(weights, options, hessians, strict=True)
        ],
        "block_columns_16": many(16),
        "block_columns_32": many(32),
        "block_columns_64": many(64),
        "sub_batch_8": patched("SUB_BATCH", 8, many()),
        "no_sub_batch": patched("SUB_BATCH", 1 << 30, many()),
        "everything_on_all_threads": patched("PARALLEL_MIN_MACS", 0, many()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with quiet_transformers():
        model = load_classifier(DEFAULT_MODEL, num_labels=2)
    targets = discover_targets(model)
    weights = [w.detach().float().contiguous() for w in target_weights(model, targets).values()]
    generator = torch.Generator().manual_seed(0)
    sites = {site_of(t): t.in_features for t in targets}
    site_h = {s: synthetic_hessian(width, generator) for s, width in sites.items()}
    hessians = [site_h[site_of(t)] for t in targets]
    load_before = os.getloadavg()

    site_u = {s: feedback_factor(h) for s, h in site_h.items()}
    site_u64 = {s: feedback_factor(h, dtype=torch.float64) for s, h in site_h.items()}
    factors = [site_u[site_of(t)] for t in targets]
    factors64 = [site_u64[site_of(t)] for t in targets]
    factor_jobs = {
        "float32": lambda: [feedback_factor(h) for h in site_h.values()],
        "float64": lambda: [feedback_factor(h, dtype=torch.float64) for h in site_h.values()],
        "float32_all_threads": patched(
            "PARALLEL_MIN_MACS", 0, lambda: [feedback_factor(h) for h in site_h.values()]
        ),
    }
    result: dict = {
        "command": f"python benchmarks/bench_gptq.py --rounds {args.rounds} --threads {args.threads}",
        "model": DEFAULT_MODEL,
        "matrices": len(weights),
        "sites": len(sites),
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "factors_of_all_sites_ms": timed(factor_jobs, args.rounds),
    }
    configs = configurations(len(weights))
    result["error_ratio_gptq_over_rtn"] = {
        name: error_ratio(
            weights, options, hessians, gptq_fake_quantize_many(weights, options, "nf", factors)
        )
        for name, options in configs.items()
    }
    result["error_ratio_with_float64_factors"] = {
        name: error_ratio(
            weights, configs[name], hessians, gptq_fake_quantize_many(weights, configs[name], "nf", factors64)
        )
        for name in ("nf2", "nf3", "mixed_random")
    }
    result["error_ratio_with_clipped_scales"] = {
        name: {
            str(alpha): error_ratio(
                weights,
                configs[name],
                hessians,
                clipped_scales(
                    alpha, lambda n=name: gptq_fake_quantize_many(weights, configs[n], "nf", factors)
                )(),
            )["sum_ratio"]
            for alpha in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
        }
        for name in ("nf2", "nf3", "nf4")
    }
    result["timings"] = {
        name: timed(timing_jobs(weights, configs[name], factors, hessians, name == "nf3"), args.rounds)
        for name in ("nf3", "mixed_random")
    }
    load_after = os.getloadavg()
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": load_after}
    write_result("gptq", result)


if __name__ == "__main__":
    main()
