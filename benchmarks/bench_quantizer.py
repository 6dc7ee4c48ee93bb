"""Cost of the quantizer on all 36 MiniLM target matrices, against a plain torch absmax int4 round trip.

Both run on the same tensors in the same process, interleaved round by round so that machine noise hits
them alike; medians are reported. The baseline is the least a block-wise 4-bit round trip costs in torch
(block absmax, scale, round, clamp, multiply): no double quantization, no NormalFloat lookup. Packed
``quantize`` + ``dequantize`` (real bit packing) is timed for NF4 with double quantization.

    python benchmarks/bench_quantizer.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result

from coalora.pretrained import DEFAULT_MODEL, load_classifier
from coalora.quant.options import NF4_DOUBLE_QUANT, QuantOption
from coalora.quant.quantizer import fake_quantize, quantize
from coalora.quant.targets import discover_targets, target_weights
from coalora.utils import quiet_transformers

OPTIONS = {
    "nf4_double_quant": NF4_DOUBLE_QUANT,
    "nf2_s2_bf16_16_16": QuantOption(2, 2, "bf16", 16, 16),
    "nf3_s4_fp16_32_64": QuantOption(3, 4, "fp16", 32, 64),
    "nf8_s8_fp32_64_256": QuantOption(8, 8, "fp32", 64, 256),
}


def absmax_int4(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Plain block-wise symmetric int4 round trip (levels -7..7), the baseline."""
    blocks = weight.reshape(-1, block)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7
    return (torch.round(blocks / scale).clamp_(-7, 7) * scale).view(weight.shape)


def packed_round_trip(weight: torch.Tensor) -> torch.Tensor:
    return quantize(weight, NF4_DOUBLE_QUANT).dequantize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with quiet_transformers():
        model = load_classifier(DEFAULT_MODEL, num_labels=2)
    weights = list(target_weights(model, discover_targets(model)).values())

    jobs = {name: (lambda o=o: [fake_quantize(w, o) for w in weights]) for name, o in OPTIONS.items()}
    jobs["torch_absmax_int4"] = lambda: [absmax_int4(w) for w in weights]
    jobs["packed_nf4_quantize_dequantize"] = lambda: [packed_round_trip(w) for w in weights]
    result: dict = {
        "matrices": len(weights),
        "weights": sum(w.numel() for w in weights),
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
    }
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for job in jobs.values():  # warm-up: codebooks, lookup tables, allocator
            job()
        for _ in range(args.rounds):
            for name, job in jobs.items():
                start = time.perf_counter()
                job()
                times[name].append(time.perf_counter() - start)
        ms = {name: round(statistics.median(t) * 1000, 1) for name, t in times.items()}
        base = ms["torch_absmax_int4"]
        result[f"threads_{threads}"] = {
            "median_ms": ms,
            "ratio_to_torch_absmax_int4": {
                n: round(v / base, 2) for n, v in ms.items() if n != "torch_absmax_int4"
            },
        }
    write_result("quantizer", result)


if __name__ == "__main__":
    main()
