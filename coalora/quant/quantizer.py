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

Fused (issue #25): on CPU the per-weight pass runs as one compiled loop where the machine can build it
(:mod:`coalora.quant.fused`: the weights are read once, codes and dequantized values come out together);
the numpy path above is its fallback and gives the same bits. :func:`block_absmax` is what every option of
one block size starts from, so callers quantizing a matrix at many options compute it once.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy
import torch

from coalora.quant.codebooks import (
    CODE_FAMILIES,
    Array,
    NearestLookup,
    SearchScratch,
    pack_bits,
    pack_codes,
    unpack_bits,
    uses_numpy,
)
from coalora.quant.families import get_family
from coalora.quant.options import QuantOption
from coalora.quant.scales import RowScaler, double_quantize_scales, pad_to, row_max

if TYPE_CHECKING:
    from coalora.quant import fused

#: Weights per chunk on CPU: a chunk's scratch buffers (~16 bytes a weight) stay in cache, and per-op
#: dispatch (a few microseconds) stays a small share. Other devices take a whole matrix at once.
CPU_CHUNK = 1 << 18


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
        row_max(magnitudes, absmax[start:stop])
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
    def of(weight: torch.Tensor, option: QuantOption, absmax: torch.Tensor | None = None) -> BlockedWeight:
        """``absmax``: :func:`block_absmax` of the weight at ``option.block``, if the caller has it."""
        blocks = pad_to(weight.detach().reshape(-1), option.block).view(-1, option.block)
        found = _absmax(blocks) if absmax is None else absmax
        return BlockedWeight(blocks, *double_quantize_scales(found, option))

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


def block_absmax(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Max |w| of each block of ``block`` weights (float32, the last block zero-padded): the same for every
    option of that block size, so a caller quantizing one matrix at several options computes it once and
    passes it as ``absmax`` to :func:`quantize`, :func:`fake_quantize` or :func:`quantize_both`."""
    kernel = _kernel(weight)
    if kernel is not None:
        found = kernel.absmax(_flat32(weight), block)
        if bool(torch.isfinite(found).all()):  # else the numpy path, which handles what is not finite its way
            return found
    return _absmax(pad_to(weight.detach().reshape(-1), block).view(-1, block))


def _kernel(weight: torch.Tensor) -> fused.Kernel | None:
    return compiled_kernel(weight.device)


def compiled_kernel(device: torch.device, build: bool = True) -> fused.Kernel | None:
    """The compiled passes (quantize, dequantize), where they run: on CPU, with the numpy path on, once
    built (``build=False``: only if already built here; see :func:`coalora.quant.fused.kernel`)."""
    from coalora.quant import fused  # imported on first use: reading an artifact does not need it

    return fused.kernel(_agrees, build) if fused.ENABLED and uses_numpy(device) else None


def compiled(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is quantized by the compiled pass (:mod:`coalora.quant.fused`)."""
    return _kernel(weight) is not None


def _flat32(weight: torch.Tensor) -> torch.Tensor:
    """The weights as the numpy path reads them: flat and float32 (other dtypes convert exactly first)."""
    return weight.detach().reshape(-1).to(torch.float32).contiguous()


def _fused(
    weight: torch.Tensor, option: QuantOption, family: str, absmax: torch.Tensor | None, dense: bool
) -> tuple[PackedTensor, torch.Tensor | None] | None:
    """The packed form (and the dequantized weight if ``dense``) from the compiled pass; None where it
    does not run (then the numpy path does). The build check (:func:`_agrees`) covers the built-in
    codebooks only, so a registered family's codebook takes the numpy path."""
    kernel = _kernel(weight) if family in CODE_FAMILIES else None
    parts = None if kernel is None else kernel.quantize(_flat32(weight), absmax, option, family, dense)
    if parts is None:
        return None
    codes, scale_codes, scale2, offset, values = parts
    packed = PackedTensor(tuple(weight.shape), option, family, codes, scale_codes, scale2, offset)
    return packed, None if values is None else values.view(weight.shape)


def fake_quantize(
    weight: torch.Tensor, option: QuantOption, family: str = "nf", absmax: torch.Tensor | None = None
) -> torch.Tensor:
    """The dequantized weight under ``option``: what a deployed model computes with.

    Returns a float32 tensor of ``weight``'s shape on its device. ``absmax``: :func:`block_absmax`.
    Dispatched through the named code family (:func:`~coalora.quant.families.get_family`).
    """
    return get_family(family).fake_quantize(weight, option, absmax)


def blocked_fake_quantize(
    weight: torch.Tensor, option: QuantOption, family: str, absmax: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`fake_quantize` of the blocked codebook families (``family`` names the codebook)."""
    fast = _fused(weight, option, family, absmax, dense=True)
    if fast is None or fast[1] is None:
        return _numpy_fake_quantize(weight, option, family, absmax)
    return fast[1]


def _numpy_fake_quantize(
    weight: torch.Tensor, option: QuantOption, family: str, absmax: torch.Tensor | None
) -> torch.Tensor:
    blocked = BlockedWeight.of(weight, option, absmax)
    lookup = NearestLookup.build(option.bits, family, weight.device)
    out = torch.empty(blocked.blocks.shape, dtype=torch.float32, device=weight.device)
    scale = RowScaler(out, blocked.scales)
    for start, stop, work in blocked.normalised():
        lookup.levels_into(out[start:stop].numel(), out[start:stop].view(-1), work.search)
        scale(start, stop)
    return out.view(-1)[: weight.numel()].view(weight.shape)


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

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors by part name, in the family's part-schema order (what artifacts hold)."""
        return {name: getattr(self, name) for name in get_family(self.family).part_names}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

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
        return get_family(self.family).dequantize(self, out)


def quantize(
    weight: torch.Tensor, option: QuantOption, family: str = "nf", absmax: torch.Tensor | None = None
) -> PackedTensor:
    """Quantize ``weight`` into its packed, deployable form (``absmax``: :func:`block_absmax`), through
    the named code family."""
    return get_family(family).quantize(weight, option, absmax)


def blocked_quantize(
    weight: torch.Tensor, option: QuantOption, family: str, absmax: torch.Tensor | None = None
) -> PackedTensor:
    """:func:`quantize` of the blocked codebook families (``family`` names the codebook)."""
    fast = _fused(weight, option, family, absmax, dense=False)
    return _numpy_quantize(weight, option, family, absmax) if fast is None else fast[0]


def quantize_both(
    weight: torch.Tensor, option: QuantOption, family: str = "nf", absmax: torch.Tensor | None = None
) -> tuple[PackedTensor, torch.Tensor]:
    """:func:`quantize` and :func:`fake_quantize` of ``weight`` from one pass, through the named family."""
    return get_family(family).quantize_both(weight, option, absmax)


def blocked_quantize_both(
    weight: torch.Tensor, option: QuantOption, family: str, absmax: torch.Tensor | None = None
) -> tuple[PackedTensor, torch.Tensor]:
    """:func:`quantize_both` of the blocked codebook families: the compiled pass writes codes and values
    together; elsewhere the packed form is dequantized (bit for bit the same)."""
    fast = _fused(weight, option, family, absmax, dense=True)
    if fast is not None and fast[1] is not None:
        return fast[0], fast[1]
    packed = _numpy_quantize(weight, option, family, absmax)
    return packed, packed.dequantize()


def _numpy_quantize(
    weight: torch.Tensor, option: QuantOption, family: str, absmax: torch.Tensor | None
) -> PackedTensor:
    blocked = BlockedWeight.of(weight, option, absmax)
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


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _agrees(kernel: fused.Kernel) -> bool:
    """Whether a freshly built kernel gives the numpy path's bits for every pass it has (each bit width,
    block size and family, with a partial last block): checked once per build, before it is kept."""
    weight = torch.randn(37, 61, generator=torch.Generator().manual_seed(0)) * 0.05
    for k, (bits, block, family) in enumerate(itertools.product((2, 3, 4, 8), (16, 32, 64), CODE_FAMILIES)):
        option = QuantOption(
            bits, (2, 3, 4, 8)[k % 4], ("bf16", "fp16", "fp32")[k % 3], block, (16, 64, 256)[k % 3]
        )
        parts = kernel.quantize(weight.reshape(-1), None, option, family, dense=True)
        expected = _numpy_quantize(weight, option, family, None)
        wanted = [expected.codes, expected.scale_codes, expected.scale2, expected.offset]
        wanted.append(_numpy_fake_quantize(weight, option, family, None).reshape(-1))
        if parts is None or not all(
            a is not None and _same(a, b) for a, b in zip(parts, wanted, strict=True)
        ):
            return False
        packed = PackedTensor(tuple(weight.shape), option, family, *parts[:4])
        out = torch.empty(packed.n_blocks, option.block)
        scales = packed.scales().contiguous()
        kernel.dequantize(
            packed.codes, bits, NearestLookup.build(bits, family, weight.device).levels, scales, out
        )
        if not _same(out.view(-1)[: weight.numel()], wanted[4]):
            return False
    return True
