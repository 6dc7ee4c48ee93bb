"""Block-wise NormalFloat (or integer) quantization with double-quantized scales, SPEC §2.3.

Written by hand: no maintained library offers 2/3/8-bit NormalFloat with b1-bit first-level scales and a
second level of scales in a chosen dtype. Everything is vectorised over blocks and runs on any device.

Tail handling: a weight count that is not a multiple of the block sizes is padded with zeros. Zeros never
change a block's absmax (|w| >= 0) nor a group's max of (s - o) (>= 0), so padding leaves every real
weight's result unchanged; it only costs the few extra scale slots that a real deployment also stores.

Speed (issue #13): the per-weight work is a chain of short elementwise ops, so on CPU its cost is memory
traffic, fresh allocations and per-op dispatch more than arithmetic. The weights go through in
chunks of :data:`CPU_CHUNK` in scratch buffers each thread keeps (no full-size temporary is allocated and
paged in, and a chunk stays in cache); the nearest level comes from :class:`NearestLookup` (a compare per
midpoint for small codebooks, else a bin index, at most two independent gathers and one compare); codes
are packed eight to an int64 word by a few shifts and masks over all words at once. On CPU the
elementwise steps run in numpy on views of the same buffers (``codebooks.NUMPY_ON_CPU``: one thread, no
OpenMP region to wait in) and torch's reductions run in slices too small to open one. Codes, scale codes,
second-level scales, bytes and dequantized values are bit for bit those of the earlier exact search, which
tests/test_quantizer.py keeps as its oracle (benchmarks/bench_quantizer.py times both).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy
import torch

from coalora.quant.codebooks import (
    Array,
    NearestLookup,
    SearchScratch,
    codebook,
    pack_bits,
    pack_codes,
    unpack_bits,
    unpack_codes,
    uses_numpy,
)
from coalora.quant.options import TORCH_DTYPES, QuantOption

#: Weights per chunk on CPU: a chunk's scratch buffers (~16 bytes a weight) stay in cache, and per-op
#: dispatch (a few microseconds) stays a small share. Other devices take a whole matrix at once.
CPU_CHUNK = 1 << 18
_SERIAL = 32768  # torch runs a CPU op over at least this many elements in an OpenMP region


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-x.numel()) % multiple
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


@dataclass
class _Work:
    """Scratch for one chunk, reused across chunks (and, on CPU, across calls: see :func:`_work`)."""

    search: SearchScratch  # the normalised weights go in search.x, their codes come out in search.codes
    words: torch.Tensor  # int64 scratch for bit packing
    words_array: numpy.ndarray | None  # its numpy view, on the numpy path

    @staticmethod
    def new(n: int, device: torch.device) -> _Work:
        search = SearchScratch.new(n, device)
        words = torch.empty(-(-n // 8), dtype=torch.int64, device=device)
        return _Work(search, words, None if search.arrays is None else words.numpy())

    def packing(self, n: int) -> tuple[Array, Array, Array]:
        """(codes, int32 index buffer, int64 scratch) for ``n`` weights: numpy views on the numpy path."""
        search, arrays = self.search, self.search.arrays
        if arrays is None or self.words_array is None:
            return search.codes[:n], search.index[:n], self.words
        return arrays.codes[:n], arrays.index[:n], self.words_array


_CPU_WORK = threading.local()


def _work(n: int, device: torch.device) -> _Work:
    """Scratch for chunks of ``n`` weights. On CPU each thread keeps one set (~16 bytes a weight of
    :data:`CPU_CHUNK`, ~4 MB): fresh buffers would cost an allocation and page faults on every call, and
    numpy views made once. Other devices get a fresh set for the whole matrix."""
    if device.type != "cpu":
        return _Work.new(n, device)
    work = getattr(_CPU_WORK, "work", None)
    if work is None or work.words.numel() * 8 < n or (work.words_array is not None) != uses_numpy(device):
        work = _CPU_WORK.work = _Work.new(max(n, CPU_CHUNK), device)
    return work


def _chunks(n_blocks: int, block: int, device: torch.device) -> Iterator[tuple[int, int, _Work]]:
    """(first block, end block, scratch) over a matrix's blocks, a chunk at a time."""
    rows = min(n_blocks, max(1, CPU_CHUNK // block) if device.type == "cpu" else n_blocks)
    work = _work(rows * block, device)
    for start in range(0, n_blocks, rows):
        yield start, min(start + rows, n_blocks), work


def double_quantize_scales(absmax: torch.Tensor, option: QuantOption) -> tuple[torch.Tensor, ...]:
    """Second-level quantization of the per-block absmax scales (SPEC §2.3 step 3).

    Returns the scale codes (int32), the second-level scales (in the option's dtype), the offset and the
    dequantized scales (float32). Each block's arithmetic is its group's, broadcast over a (groups, block2)
    view: the values of a per-block ``repeat_interleave`` of the group step, without building it. On CPU
    it runs in numpy: the same float32 operations, rounded alike, on one thread.
    """
    levels, block2, n_blocks = 2**option.scale_bits - 1, option.block2, absmax.numel()
    dtype = TORCH_DTYPES[option.scale2_dtype]
    if not uses_numpy(absmax.device):
        offset = absmax.min()
        shifted = _pad_to(absmax - offset, block2).view(-1, block2)  # zero padding: see the module doc
        scale2 = _row_max(shifted, torch.empty_like(shifted[:, 0])).to(dtype)  # stored in it: round-trip
        step = (scale2.to(torch.float32) / levels).unsqueeze(1)  # zero where a group's range is zero
        codes = torch.round(shifted / step.clamp_min(1e-30)).clamp_(0, levels).mul_(step > 0)  # finite
        scales = (codes * step + offset).view(-1)[:n_blocks]
        return codes.view(-1)[:n_blocks].to(torch.int32), scale2, offset, scales
    values = absmax.detach().numpy()
    low = values.min()
    rows = numpy.zeros((-(-n_blocks // block2), block2), dtype=numpy.float32)
    numpy.subtract(values, low, out=rows.reshape(-1)[:n_blocks])
    scale2 = torch.from_numpy(rows.max(axis=1)).to(dtype)
    step = (scale2.to(torch.float32).numpy() / numpy.float32(levels))[:, None]
    codes_f = numpy.rint(rows / numpy.maximum(step, numpy.float32(1e-30)))
    codes_f = numpy.clip(codes_f, 0, levels, out=codes_f) * (step > 0)
    scales = codes_f * step + low
    codes_i, low_0d = codes_f.reshape(-1)[:n_blocks].astype(numpy.int32), numpy.asarray(low)
    return (
        torch.from_numpy(codes_i),
        scale2,
        torch.from_numpy(low_0d),
        torch.from_numpy(scales.reshape(-1)[:n_blocks]),
    )


def _row_max(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Max of each row, into ``out``. Rows of 16 go through max_pool1d (torch's 16-wide reductions are ~2x
    slower); on CPU, longer rows in slices under :data:`_SERIAL` weights."""
    if rows.shape[1] == 16:
        return out.copy_(torch.nn.functional.max_pool1d(rows.reshape(1, 1, -1), 16).view(-1))
    step = max(1, (_SERIAL - 1) // rows.shape[1]) if rows.device.type == "cpu" else len(rows)
    for start in range(0, len(rows), step):
        torch.amax(rows[start : start + step], dim=1, out=out[start : start + step])
    return out


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Max |w| of each block (float32), a chunk at a time: |w| goes through a cached buffer, so the
    weights are read from memory once and no full-size |w| is allocated."""
    n_blocks, block = blocks.shape
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=blocks.device)
    source = blocks.numpy() if uses_numpy(blocks.device) and blocks.dtype == torch.float32 else None
    for start, stop, work in _chunks(n_blocks, block, blocks.device):
        magnitudes = work.search.x[: (stop - start) * block].view(stop - start, block)
        if source is not None and work.search.arrays is not None:
            numpy.abs(source[start:stop], out=work.search.arrays.x[: magnitudes.numel()].reshape(-1, block))
        elif blocks.dtype == torch.float32:
            torch.abs(blocks[start:stop], out=magnitudes)
        else:  # as the search always took |w| of fp32 weights (exact for bf16/fp16 weights)
            magnitudes.copy_(blocks[start:stop]).abs_()
        _row_max(magnitudes, absmax[start:stop])
    return absmax


@dataclass
class BlockedWeight:
    """A weight cut into blocks with its double-quantized scales: what the per-weight pass needs."""

    blocks: torch.Tensor  # (n_blocks, block) in the weight's own dtype, zero-padded
    scale_codes: torch.Tensor  # (n_blocks,) int32 in [0, 2^scale_bits - 1]
    scale2: torch.Tensor  # (n_groups,) second-level scales, in the option's scale2 dtype
    offset: torch.Tensor  # () float32, min of first-level scales
    scales: torch.Tensor  # (n_blocks,) float32 dequantized first-level scales

    @staticmethod
    def of(weight: torch.Tensor, option: QuantOption) -> BlockedWeight:
        blocks = _pad_to(weight.detach().reshape(-1), option.block).view(-1, option.block)
        return BlockedWeight(blocks, *double_quantize_scales(_absmax(blocks), option))

    def normalised(self) -> Iterator[tuple[int, int, _Work]]:
        """(first block, end block, scratch) chunk by chunk, with the chunk's weights over their scales
        (flat float32) in ``scratch.search.x``. A scale is 0 only if its block is 0: it divides by 1."""
        n_blocks, block = self.blocks.shape
        on_numpy = uses_numpy(self.blocks.device)
        scales: Array = self.scales.numpy() if on_numpy else self.scales
        divisors: Array = (numpy.where if on_numpy else torch.where)(scales > 0, scales, 1.0)[:, None]
        convert = self.blocks.dtype != torch.float32  # then convert first: the search divided fp32 weights
        weights: Array = self.blocks.numpy() if on_numpy and not convert else self.blocks
        for start, stop, work in _chunks(n_blocks, block, self.blocks.device):
            n, rows, arrays = (stop - start) * block, stop - start, work.search.arrays
            x: Array = (
                arrays.x[:n].reshape(rows, block)
                if arrays is not None
                else work.search.x[:n].view(rows, block)
            )
            if convert:
                work.search.x[:n].view(rows, block).copy_(self.blocks[start:stop])
            divide: Any = numpy.divide if arrays is not None else torch.div
            divide(x if convert else weights[start:stop], divisors[start:stop], out=x)
            yield start, stop, work


def fake_quantize(weight: torch.Tensor, option: QuantOption, family: str = "nf") -> torch.Tensor:
    """The dequantized weight under ``option``: what a deployed model computes with.

    Returns a float32 tensor of ``weight``'s shape on its device.
    """
    blocked = BlockedWeight.of(weight, option)
    lookup = NearestLookup.build(option.bits, family, weight.device)
    out = torch.empty(blocked.blocks.shape, dtype=torch.float32, device=weight.device)
    scale = _Scaler(out, blocked.scales)
    for start, stop, work in blocked.normalised():
        lookup.levels_into(out[start:stop].numel(), out[start:stop].view(-1), work.search)
        scale(start, stop)
    return out.view(-1)[: weight.numel()].view(weight.shape)


class _Scaler:
    """Multiplies rows ``start:stop`` of (n_blocks, block) ``values`` by their scales, in place."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values, self.scales = values, scales.unsqueeze(1)
        self.arrays = (values.numpy(), scales.numpy()[:, None]) if uses_numpy(values.device) else None

    def __call__(self, start: int, stop: int) -> None:
        if self.arrays is None:
            self.values[start:stop].mul_(self.scales[start:stop])
        else:
            rows, scales = self.arrays[0][start:stop], self.arrays[1][start:stop]
            numpy.multiply(rows, scales, out=rows)


@dataclass
class PackedTensor:
    """A deployable quantized matrix: bit-packed codes, bit-packed scale codes, second-level scales, offset.

    Its byte size is what ``option.storage_bits`` promises (plus 4 bytes of offset and byte rounding).
    """

    shape: tuple[int, ...]
    option: QuantOption
    family: str
    codes: torch.Tensor  # uint8, bits * n_padded bits
    scale_codes: torch.Tensor  # uint8, scale_bits * n_blocks bits
    scale2: torch.Tensor  # n_groups values in the scale2 dtype
    offset: torch.Tensor  # float32 scalar

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.option.block)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.codes, self.scale_codes, self.scale2, self.offset)
        )

    @property
    def padded_numel(self) -> int:
        """Weights in whole blocks: the size of the buffer :meth:`dequantize` works in."""
        return self.n_blocks * self.option.block

    def scales(self) -> torch.Tensor:
        """The (n_blocks,) float32 first-level scales, as the quantizer dequantized them."""
        option = self.option
        groups = self.scale2.numel()
        codes = unpack_bits(self.scale_codes, option.scale_bits, groups * option.block2, torch.float32)
        step = (self.scale2.to(torch.float32) / (2**option.scale_bits - 1)).unsqueeze(1)
        return (codes.view(groups, -1) * step + self.offset).view(-1)[: self.n_blocks]

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 tensor equal, bit for bit, to ``fake_quantize`` of the original weight.

        ``out``: a contiguous float32 buffer on the codes' device with at least :attr:`padded_numel`
        elements to write into (the result is then a view of it): serving reuses one buffer for every
        layer instead of allocating a fresh weight per call, which the CPU allocator keeps resident.
        """
        option, device = self.option, self.codes.device
        block, bits, n_blocks = option.block, option.bits, self.n_blocks
        levels = NearestLookup.build(bits, self.family, device).levels
        if out is None:
            out = torch.empty(n_blocks, block, dtype=torch.float32, device=device)
        else:
            wrong = out.dtype != torch.float32 or out.device != device or not out.is_contiguous()
            if wrong or out.numel() < self.padded_numel:
                raise ValueError(f"dequantize needs float32 space for {self.padded_numel} values on {device}")
            out = out.reshape(-1)[: self.padded_numel].view(n_blocks, block)
        scale = _Scaler(out, self.scales())
        packed = self.codes.numpy() if uses_numpy(device) else self.codes
        for start, stop, work in _chunks(n_blocks, block, device):
            n, span = (stop - start) * block, slice(start * block * bits // 8, stop * block * bits // 8)
            codes, index, scratch = work.packing(n)
            unpack_codes(packed[span], bits, codes, scratch)
            index[...] = codes
            torch.index_select(levels, 0, work.search.index[:n], out=out[start:stop].view(-1))
            scale(start, stop)
        return out.view(-1)[: self.numel].view(self.shape)


def quantize(weight: torch.Tensor, option: QuantOption, family: str = "nf") -> PackedTensor:
    """Quantize ``weight`` into its packed, deployable form."""
    blocked = BlockedWeight.of(weight, option)
    lookup = NearestLookup.build(option.bits, family, weight.device)
    bits, block = option.bits, option.block
    codes = torch.empty(blocked.blocks.numel() * bits // 8, dtype=torch.uint8, device=weight.device)
    packed = codes.numpy() if uses_numpy(weight.device) else codes
    for start, stop, work in blocked.normalised():
        n, span = (stop - start) * block, slice(start * block * bits // 8, stop * block * bits // 8)
        lookup.codes_into(n, work.search)
        chunk, _, scratch = work.packing(n)
        pack_codes(chunk, bits, packed[span], scratch)
    return PackedTensor(
        shape=tuple(weight.shape),
        option=option,
        family=family,
        codes=codes,
        scale_codes=pack_bits(blocked.scale_codes, option.scale_bits),
        scale2=blocked.scale2,
        offset=blocked.offset.reshape(()),
    )


# ---- Codes chosen by another rounding (coalora/quant/gptq.py), packed as quantize packs its own ----


def packed_with_codes(
    codes: torch.Tensor, shape: tuple[int, ...], option: QuantOption, family: str, blocked: BlockedWeight
) -> PackedTensor:
    """The packed form of ``codes`` (uint8, one per weight, any layout of the weight's shape) with the
    scales of ``blocked`` (``BlockedWeight.of`` the weight): ``quantize``'s bytes and format, other codes.
    The zero padding of the last block gets the code of 0, as in ``quantize``."""
    n, device = blocked.blocks.numel(), codes.device
    flat = torch.empty(n, dtype=torch.uint8, device=device)
    flat[: codes.numel()].view(codes.shape).copy_(codes)
    if codes.numel() < n:
        levels = codebook(option.bits, family).double()
        flat[codes.numel() :] = int(
            torch.bucketize(torch.zeros(()), ((levels[1:] + levels[:-1]) / 2).float())
        )
    packed = torch.empty(n * option.bits // 8, dtype=torch.uint8, device=device)  # n: whole blocks of 16+
    scratch = torch.empty(n // 8, dtype=torch.int64, device=device)
    if uses_numpy(device):  # numpy views: no parallel region
        pack_codes(flat.numpy(), option.bits, packed.numpy(), scratch.numpy())
    else:
        pack_codes(flat, option.bits, packed, scratch)
    scale_codes = pack_bits(blocked.scale_codes, option.scale_bits)
    return PackedTensor(
        shape, option, family, packed, scale_codes, blocked.scale2, blocked.offset.reshape(())
    )
