"""Cost of the quantizer on all 36 MiniLM target matrices: the fast path of issue #13 against the earlier
exact search (``old_*`` below, today's code before #13, kept verbatim) and a plain absmax int4 round trip.

All run on the same tensors in one process. Every round runs each job as a triple, old then new then the
baseline, so that machine noise (the machine is shared) hits the three alike; medians over the rounds are
reported, and each job's ratios are ratios of medians from its own triples (the fastest round of each is
given too: under load, the closest to an idle machine). The baseline is the least a block-wise 4-bit
round trip costs in torch (block absmax, scale, round, clamp, multiply): no double quantization, no
NormalFloat lookup. A job is one pass over the 36 matrices, keeping every result, as a
configuration switch does: ``fake_quantize`` (the dequantized fp32 weight), ``quantize`` (the packed
form) and, for NF4 with double quantization, ``quantize`` + ``dequantize``. Before timing, the new path is
checked bit for bit against the old one on every matrix and timed option (``bit_identical``).

    python benchmarks/bench_quantizer.py [--rounds 11] [--threads 2 1]
"""

from __future__ import annotations

import argparse
import math
import os
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
from coalora.quant.codebooks import codebook
from coalora.quant.options import NF4_DOUBLE_QUANT, TORCH_DTYPES, QuantOption
from coalora.quant.quantizer import PackedTensor, fake_quantize, quantize
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


# ---- the quantizer before issue #13 (coalora/quant/quantizer.py and codebooks.py), for the old timings ----


def old_pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-x.numel()) % multiple
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


_OLD_TABLES: dict[tuple[int, str], tuple[float, torch.Tensor, torch.Tensor]] = {}


def old_nearest_tables(bits: int, family: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    if (bits, family) not in _OLD_TABLES:
        levels = codebook(bits, family).double()
        mids = (levels[1:] + levels[:-1]) / 2
        gap = float((mids[1:] - mids[:-1]).min()) if len(mids) > 1 else 2.0
        bins = 1 << max(1, math.ceil(math.log2(4.0 / gap)))
        while True:
            edges = torch.arange(bins + 1, dtype=torch.float64) * (2.0 / bins) - 1.0
            if (mids.unsqueeze(1) - edges.unsqueeze(0)).abs().min() > 1e-5:
                break
            bins += 1
        lut = torch.searchsorted(mids, edges[:-1]).to(torch.int32)
        mids_ext = torch.cat([mids.float(), torch.tensor([float("inf")])])
        _OLD_TABLES[bits, family] = (bins / 2.0, lut, mids_ext)
    return _OLD_TABLES[bits, family]


def old_nearest_codes(x: torch.Tensor, bits: int, family: str = "nf") -> torch.Tensor:
    half_bins, lut, mids_ext = old_nearest_tables(bits, family)
    bins = ((x + 1.0) * half_bins).clamp_(0, 2 * half_bins - 1).to(torch.int32)
    code = lut.index_select(0, bins.view(-1)).view(x.shape)
    return code + (x > mids_ext.index_select(0, code.view(-1)).view(x.shape))


def old_scale_step(scale2: torch.Tensor, levels: int, n_blocks: int, block2: int) -> torch.Tensor:
    return (scale2.to(torch.float32) / levels).repeat_interleave(block2)[:n_blocks]


def old_quantize_parts(weight: torch.Tensor, option: QuantOption, family: str) -> tuple[torch.Tensor, ...]:
    """(codes, scale codes, scale2, offset, scales), as ``_quantize_parts`` computed them."""
    flat = old_pad_to(weight.detach().reshape(-1).to(torch.float32), option.block)
    blocks = flat.view(-1, option.block)
    absmax = blocks.abs().amax(dim=1)
    levels = 2**option.scale_bits - 1
    offset = absmax.min()
    shifted = absmax - offset
    scale2 = old_pad_to(shifted, option.block2).view(-1, option.block2).amax(dim=1)
    scale2 = scale2.to(TORCH_DTYPES[option.scale2_dtype])
    step = old_scale_step(scale2, levels, absmax.numel(), option.block2)
    scale_codes = torch.where(step > 0, torch.round(shifted / step.clamp_min(1e-30)), 0).clamp_(0, levels)
    scales = scale_codes * step + offset
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = old_nearest_codes(blocks / safe.unsqueeze(1), option.bits, family).view(-1)
    return codes, scale_codes.to(torch.int32), scale2, offset.to(torch.float32), scales


def old_fake_quantize(weight: torch.Tensor, option: QuantOption, family: str = "nf") -> torch.Tensor:
    codes, _, _, _, scales = old_quantize_parts(weight, option, family)
    levels = codebook(option.bits, family)
    values = levels.index_select(0, codes).view(-1, option.block) * scales.unsqueeze(1)
    return values.view(-1)[: weight.numel()].view(weight.shape)


def old_pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    count = values.numel()
    flat = values.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    groups = old_pad_to(flat, 8).view(-1, 8)
    shifts = bits * torch.arange(8, dtype=torch.int64)
    words = (groups << shifts).sum(dim=1, keepdim=True)
    byte_shifts = 8 * torch.arange(bits, dtype=torch.int64)
    stream = ((words >> byte_shifts) & 0xFF).reshape(-1)
    return stream[: math.ceil(count * bits / 8)].to(torch.uint8)


def old_unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    flat = packed.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat[:count]
    groups = old_pad_to(flat, bits).view(-1, bits)
    byte_shifts = 8 * torch.arange(bits, dtype=torch.int64)
    words = (groups << byte_shifts).sum(dim=1, keepdim=True)
    shifts = bits * torch.arange(8, dtype=torch.int64)
    return ((words >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


def old_quantize(weight: torch.Tensor, option: QuantOption, family: str = "nf") -> PackedTensor:
    codes, scale_codes, scale2, offset, _ = old_quantize_parts(weight, option, family)
    return PackedTensor(
        shape=tuple(weight.shape),
        option=option,
        family=family,
        codes=old_pack_bits(codes, option.bits),
        scale_codes=old_pack_bits(scale_codes, option.scale_bits),
        scale2=scale2,
        offset=offset.reshape(()),
    )


def old_dequantize(packed: PackedTensor) -> torch.Tensor:
    option = packed.option
    n_padded = packed.n_blocks * option.block
    codes = old_unpack_bits(packed.codes, option.bits, n_padded)
    scale_codes = old_unpack_bits(packed.scale_codes, option.scale_bits, packed.n_blocks).to(torch.float32)
    step = old_scale_step(packed.scale2, 2**option.scale_bits - 1, packed.n_blocks, option.block2)
    scales = scale_codes * step + packed.offset
    levels = codebook(option.bits, packed.family)
    values = levels.index_select(0, codes).view(-1, option.block) * scales.unsqueeze(1)
    return values.view(-1)[: packed.numel].view(packed.shape)


# ---- the measurement ----


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def bit_identical(weights: list[torch.Tensor]) -> bool:
    """New and old agree bit for bit: packed bytes, second-level scales, offsets, dequantized weights."""
    for option in OPTIONS.values():
        for w in weights:
            new, old = quantize(w, option), old_quantize(w, option)
            parts = [(new.codes, old.codes), (new.scale_codes, old.scale_codes), (new.scale2, old.scale2)]
            parts += [(new.offset, old.offset), (fake_quantize(w, option), old_fake_quantize(w, option))]
            parts += [(new.dequantize(), old_dequantize(old))]
            if not all(_same_bits(a, b) for a, b in parts):
                return False
    return True


def jobs(weights: list[torch.Tensor]) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (old, new): each one pass over all the matrices, keeping every result."""
    table: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
    for name, o in OPTIONS.items():
        table[f"fake_quantize.{name}"] = (
            lambda o=o: [old_fake_quantize(w, o) for w in weights],
            lambda o=o: [fake_quantize(w, o) for w in weights],
        )
        table[f"quantize.{name}"] = (
            lambda o=o: [old_quantize(w, o) for w in weights],
            lambda o=o: [quantize(w, o) for w in weights],
        )
    table["quantize_dequantize.nf4_double_quant"] = (
        lambda: [old_dequantize(old_quantize(w, NF4_DOUBLE_QUANT)) for w in weights],
        lambda: [quantize(w, NF4_DOUBLE_QUANT).dequantize() for w in weights],
    )
    return table


def timed(job: Callable[[], object]) -> float:
    start = time.perf_counter()
    job()
    return time.perf_counter() - start


def measure(weights: list[torch.Tensor], rounds: int) -> dict:
    """Medians (ms) of old, new and the baseline, and their ratios, over interleaved triples."""
    table = jobs(weights)
    baseline = lambda: [absmax_int4(w) for w in weights]  # noqa: E731
    for old, new in table.values():  # warm-up: codebooks, lookup tables, allocator
        old(), new(), baseline()
    times = {name: ([], [], []) for name in table}
    for _ in range(rounds):
        for name, (old, new) in table.items():
            for samples, job in zip(times[name], (old, new, baseline)):
                samples.append(timed(job))
    result: dict = {}
    for name, samples in times.items():
        old_ms, new_ms, base_ms = (statistics.median(s) * 1000 for s in samples)
        best_old, best_new, best_base = (min(s) * 1000 for s in samples)
        result[name] = {
            "old_ms": round(old_ms, 1),
            "new_ms": round(new_ms, 1),
            "torch_absmax_int4_ms": round(base_ms, 1),
            "new_over_old": round(new_ms / old_ms, 3),
            "new_over_torch_absmax_int4": round(new_ms / base_ms, 2),
            "old_over_torch_absmax_int4": round(old_ms / base_ms, 2),
            "best_of_rounds_ms": {
                "old": round(best_old, 1),
                "new": round(best_new, 1),
                "int4": round(best_base, 1),
            },
            "best_new_over_torch_absmax_int4": round(best_new / best_base, 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = parser.parse_args()
    with quiet_transformers():
        model = load_classifier(DEFAULT_MODEL, num_labels=2)
    weights = [w.detach() for w in target_weights(model, discover_targets(model)).values()]
    shapes: dict[str, int] = {}
    for w in weights:
        shapes["x".join(map(str, w.shape))] = shapes.get("x".join(map(str, w.shape)), 0) + 1
    result: dict = {
        "command": "python benchmarks/bench_quantizer.py " + " ".join(sys.argv[1:]),
        "matrices": len(weights),
        "shapes": shapes,
        "weights": sum(w.numel() for w in weights),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "bit_identical": bit_identical(weights),
        "machine": {"cpus": os.cpu_count(), "load_avg_before": os.getloadavg()},
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        result[f"threads_{threads}"] = measure(weights, args.rounds)
    result["machine"]["load_avg_after"] = os.getloadavg()
    write_result("quantizer", result)


if __name__ == "__main__":
    main()
