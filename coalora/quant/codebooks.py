"""Codebook search and bit packing: the value grids that normalised weights are rounded to, and their codes.

The grids themselves belong to the code families (:mod:`coalora.quant.families`; NormalFloat and the
symmetric integer grid in :mod:`~coalora.quant.families.blocked_codebook`). :class:`NearestLookup` finds
each value's nearest level exactly (``bucketize`` over the midpoints) without a binary search; the
quantizer runs it chunk by chunk. Codes
are stored as a little-endian bit stream (:func:`pack_bits`), packed eight to an int64 word at a time.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeAlias

import numpy
import torch

from coalora.errors import CoaloraError
from coalora.quant.families import BUILTIN_NAMES, get_family

#: A torch.Tensor or a numpy.ndarray: helpers taking it use only what both have (views, slices, in-place
#: operators), so one body serves the torch path and CPU's numpy path; all arguments of one call are one kind.
Array: TypeAlias = Any

#: the built-in family names (registered families may add more: :func:`coalora.quant.families.family_names`)
CODE_FAMILIES: tuple[str, ...] = BUILTIN_NAMES


def codebook(bits: int, family: str = "nf") -> torch.Tensor:
    """Sorted float32 levels in [-1, 1] for ``bits``-bit codes of the named family (``nf``, ``int``, or one
    registered with :func:`coalora.quant.families.register_family`)."""
    return get_family(family).codebook(bits)


#: Codebooks with at most this many midpoints are searched by one compare per midpoint, which is cheaper
#: than a lookup's two gathers up to about seven compares (each compare-and-add is ~1/6 of a gather).
COMPARE_MAX_MIDPOINTS = 7

#: On CPU the elementwise steps run in numpy, on views of the same buffers: numpy never opens an OpenMP
#: region (torch opens one for every op over 32768 elements, and with another process on the other core
#: each can wait a whole scheduler slice, ~8 ms here), its compares are ~4x faster and its calls cheaper.
#: False runs the torch ops every other device runs; tests use it to check that path on CPU.
NUMPY_ON_CPU = True


@dataclass
class NumpyViews:
    """numpy views of a :class:`SearchScratch`'s buffers (made once: ``Tensor.numpy()`` costs 3 calls)."""

    x: numpy.ndarray
    position: numpy.ndarray
    index: numpy.ndarray
    above: numpy.ndarray
    codes: numpy.ndarray


@dataclass
class SearchScratch:
    """The buffers one :class:`NearestLookup` call works in, reused from chunk to chunk: the values to
    search go in ``x``; ``arrays`` are their numpy views when the CPU path runs in numpy."""

    x: torch.Tensor  # float32: the values to search
    position: torch.Tensor  # float32: bin positions, then the bins' midpoints
    index: torch.Tensor  # int32: bin numbers
    above: torch.Tensor  # bool: above the bin's midpoint
    codes: torch.Tensor  # uint8: codes
    arrays: NumpyViews | None

    @staticmethod
    def new(n: int, device: torch.device) -> SearchScratch:
        dtypes = (torch.float32, torch.float32, torch.int32, torch.bool, torch.uint8)
        x, position, index, above, codes = (torch.empty(n, dtype=d, device=device) for d in dtypes)
        buffers = (x, position, index, above, codes)
        arrays = NumpyViews(*(t.numpy() for t in buffers)) if uses_numpy(device) else None
        return SearchScratch(*buffers, arrays)


def uses_numpy(device: torch.device) -> bool:
    """Whether work on ``device`` runs its elementwise steps in numpy (see :data:`NUMPY_ON_CPU`)."""
    return device.type == "cpu" and NUMPY_ON_CPU


@dataclass(frozen=True)
class NearestLookup:
    """Exact nearest-level search without a binary search: ``bucketize(x, midpoints)``, ties going down.

    Small codebooks (up to :data:`COMPARE_MAX_MIDPOINTS` midpoints) count the midpoints below each value,
    one compare each. Larger ones use a uniform grid of bins over [-1, 1], checked to hold at most one
    midpoint per bin with every midpoint over 1e-5 from a bin edge: a value's level is ``lower[bin]`` (the
    midpoints below the bin) plus one if it is above the bin's own midpoint (``midpoint[bin]``, +inf if
    none). A value whose bin float rounding moves across an edge lands in a neighbour bin with the same
    answer (no midpoint is that close to an edge); values outside [-1, 1] land in the end bins, whose
    answers are the end levels; a value equal to a midpoint is not above it. The integer family's
    midpoints are uniform, so with one bin per midpoint ``lower`` is the bin number (``None``) and codes
    need one gather, not two. ``value[2 * bin + above]`` is the level, so dequantizing needs no code.
    """

    levels: torch.Tensor  # the codebook, float32
    thresholds: tuple[float, ...]  # the float32 midpoints, when compared one by one; else ()
    half_bins: float = 0.0
    last_bin: int = 0
    lower: torch.Tensor | None = None  # (bins,) uint8 midpoints below each bin's left edge; None: the bin
    midpoint: torch.Tensor | None = None  # (bins,) float32: the one midpoint inside the bin, else +inf
    value: torch.Tensor | None = None  # (2 * bins,) float32: level at 2 * bin, and at 2 * bin + 1 if above

    @staticmethod
    @cache
    def build(bits: int, family: str, device: torch.device) -> NearestLookup:
        """The search for one codebook on one device (cached: built once per process)."""
        levels = codebook(bits, family).double()
        mids = (levels[1:] + levels[:-1]) / 2  # as float32 below: the thresholds the search compares with
        if len(mids) <= COMPARE_MAX_MIDPOINTS:
            return NearestLookup(levels.float().to(device), tuple(mids.float().tolist()))
        gap = float((mids[1:] - mids[:-1]).min())
        power = 1 << math.ceil(math.log2(4.0 / gap))
        for bins in [len(mids), *range(power, 8 * power)]:  # one bin per midpoint if that works
            edges = torch.arange(bins + 1, dtype=torch.float64) * (2.0 / bins) - 1.0
            below = torch.searchsorted(mids, edges[:-1])
            held = torch.searchsorted(mids, edges[1:]) - below
            if held.max() <= 1 and (mids.unsqueeze(1) - edges).abs().min() > 1e-5:
                break
        else:
            raise CoaloraError(f"no lookup grid found for the {bits}-bit {family} codebook")
        thresholds = torch.cat([mids.float(), torch.tensor([math.inf])])
        pairs = torch.stack([below, (below + 1).clamp_max(len(mids))], dim=1).view(-1)
        return NearestLookup(
            levels=levels.float().to(device),
            thresholds=(),
            half_bins=bins / 2.0,
            last_bin=bins - 1,
            lower=None if torch.equal(below, torch.arange(bins)) else below.to(device, torch.uint8),
            midpoint=torch.where(held > 0, thresholds[below], math.inf).to(device),
            value=levels.float()[pairs].to(device),
        )

    def codes_into(self, n: int, scratch: SearchScratch) -> torch.Tensor:
        """The nearest level's index of each of the ``n`` values in ``scratch.x``: ``scratch.codes[:n]``."""
        codes, arrays = scratch.codes[:n], scratch.arrays
        if self.thresholds:
            self._count_into(n, scratch)
            return codes
        index = self._bins_into(n, scratch)
        if self.lower is not None:
            torch.index_select(self.lower, 0, index, out=codes)
        elif arrays is not None:
            numpy.copyto(arrays.codes[:n], arrays.index[:n], casting="unsafe")
        else:
            codes.copy_(index)
        if arrays is not None:
            numpy.add(arrays.codes[:n], arrays.above[:n], out=arrays.codes[:n])
        else:
            codes.add_(scratch.above[:n])
        return codes

    def levels_into(self, n: int, out: torch.Tensor, scratch: SearchScratch) -> None:
        """Write the nearest level (float32) of each of the ``n`` values in ``scratch.x`` to ``out``."""
        arrays, index = scratch.arrays, scratch.index[:n]
        if self.thresholds:
            codes = self.codes_into(n, scratch)
            if arrays is not None:
                numpy.copyto(arrays.index[:n], arrays.codes[:n])
            else:
                index.copy_(codes)
            torch.index_select(self.levels, 0, index, out=out)
            return
        assert self.value is not None
        self._bins_into(n, scratch)
        if arrays is not None:
            numpy.add(arrays.index[:n], arrays.index[:n], out=arrays.index[:n])
            numpy.add(arrays.index[:n], arrays.above[:n], out=arrays.index[:n])
        else:
            index.add_(index).add_(scratch.above[:n])
        torch.index_select(self.value, 0, index, out=out)

    def _count_into(self, n: int, scratch: SearchScratch) -> None:
        """``scratch.codes[:n]`` = how many thresholds lie strictly below each value."""
        first, *rest = self.thresholds
        if scratch.arrays is None:
            x, above, codes = scratch.x[:n], scratch.above[:n], scratch.codes[:n]
            torch.gt(x, first, out=codes)
            for t in rest:
                codes.add_(torch.gt(x, t, out=above))
            return
        values, flags, counts = scratch.arrays.x[:n], scratch.arrays.above[:n], scratch.arrays.codes[:n]
        numpy.greater(values, numpy.float32(first), out=counts.view(bool))
        for t in rest:
            numpy.add(counts, numpy.greater(values, numpy.float32(t), out=flags), out=counts)

    def _bins_into(self, n: int, scratch: SearchScratch) -> torch.Tensor:
        """Each value's bin (int32, in ``scratch.index``) and whether it is above the bin's midpoint
        (``scratch.above``); ``scratch.position`` is left holding the bins' midpoints."""
        assert self.midpoint is not None
        index, arrays = scratch.index[:n], scratch.arrays
        if arrays is None:
            x, position, above = scratch.x[:n], scratch.position[:n], scratch.above[:n]
            torch.mul(x, self.half_bins, out=position).add_(self.half_bins).clamp_(0, self.last_bin)
            index.copy_(position)  # truncation: the bin number
            torch.index_select(self.midpoint, 0, index, out=position)
            torch.gt(x, position, out=above)
            return index
        values, positions = arrays.x[:n], arrays.position[:n]
        numpy.multiply(values, numpy.float32(self.half_bins), out=positions)
        numpy.add(positions, numpy.float32(self.half_bins), out=positions)
        numpy.clip(positions, 0, self.last_bin, out=positions)
        numpy.copyto(arrays.index[:n], positions, casting="unsafe")  # truncation: the bin number
        torch.index_select(self.midpoint, 0, index, out=scratch.position[:n])
        numpy.greater(values, positions, out=arrays.above[:n])
        return index


def nearest_codes(x: torch.Tensor, bits: int, family: str = "nf") -> torch.Tensor:
    """Index (int32) of the level nearest to each value of ``x`` (values outside [-1, 1] clamp to the ends).

    Equal to ``torch.bucketize(x, midpoints)``; ties go to the lower level.
    """
    n = x.numel()
    scratch = SearchScratch.new(n, x.device)
    scratch.x.copy_(x.detach().reshape(-1))
    codes = NearestLookup.build(bits, family, x.device).codes_into(n, scratch)
    return codes.to(torch.int32).view(x.shape)


@dataclass(frozen=True)
class _WordPlan:
    """How eight one-per-byte codes in an int64 word become ``bits`` packed bytes, and back.

    Step k merges the two halves of every lane of ``2 * half`` bits: the upper half's field (``field``
    bits at its bottom) moves down next to the lower half's, so the fields double and the lanes double.
    After the last step each lane of ``lane_bytes`` bytes holds ``per_lane`` packed bytes at its bottom, in
    the stream order (code i's bit j is stream bit i*bits + j, byte k holds stream bits 8k..8k+7).
    """

    steps: tuple[tuple[int, int, int, int], ...]  # (shift, low mask, moved mask, high mask)
    lane_bytes: int
    per_lane: int

    @staticmethod
    @cache
    def of(bits: int) -> _WordPlan:
        if sys.byteorder != "little":  # the words are read as bytes, least significant first
            raise CoaloraError("bit packing needs a little-endian machine")
        steps = []
        field, half = bits, 8
        while field % 8:
            ones = (1 << field) - 1
            low = sum(ones << k for k in range(0, 64, 2 * half))
            steps.append((half - field, low, low << field, low << half))
            field, half = 2 * field, 2 * half
        return _WordPlan(tuple(steps), half // 8, field // 8)


#: signed integers by byte width, for torch tensors (True) and numpy arrays (False)
_INTS: dict[bool, dict[int, Any]] = {
    True: {2: torch.int16, 4: torch.int32, 8: torch.int64},
    False: {2: numpy.int16, 4: numpy.int32, 8: numpy.int64},
}


def pack_codes(codes: Array, bits: int, out: Array, scratch: Array) -> None:
    """Pack uint8 ``codes`` (a multiple of 8 of them, below 2**bits; overwritten) into ``out``, in the
    stream of :func:`pack_bits`. For callers that pack chunk by chunk into buffers they keep.

    All torch tensors or all numpy arrays; ``scratch``: int64, at least ``len(codes) // 8`` long.
    """
    if bits == 8:
        out[...] = codes
        return
    plan, ints = _WordPlan.of(bits), _INTS[isinstance(codes, torch.Tensor)]
    words, moved = codes.view(ints[8]), scratch[: len(codes) // 8]
    for shift, low, moved_mask, _ in plan.steps:
        moved[...] = words
        moved >>= shift
        moved &= moved_mask
        words &= low
        words |= moved
    if plan.per_lane == 1:  # one byte per lane: a narrowing copy keeps each lane's low byte
        out[...] = codes.view(ints[plan.lane_bytes])
    else:
        out.reshape(-1, plan.per_lane)[...] = codes.reshape(-1, plan.lane_bytes)[:, : plan.per_lane]


def unpack_codes(packed: Array, bits: int, codes: Array, scratch: Array) -> None:
    """Inverse of :func:`pack_codes`: fill uint8 ``codes`` (a multiple of 8) from ``bits``-bit ``packed``."""
    if bits == 8:
        codes[...] = packed
        return
    plan, ints = _WordPlan.of(bits), _INTS[isinstance(codes, torch.Tensor)]
    if plan.per_lane == 1:  # a widening copy puts each byte at the bottom of its lane
        codes.view(ints[plan.lane_bytes])[...] = packed
    else:
        lanes = codes.reshape(-1, plan.lane_bytes)
        lanes[:, plan.per_lane :] = 0
        lanes[:, : plan.per_lane] = packed.reshape(-1, plan.per_lane)
    words, moved = codes.view(ints[8]), scratch[: len(codes) // 8]
    for shift, low, _, high in reversed(plan.steps):
        moved[...] = words
        moved <<= shift
        moved &= high
        words &= low
        words |= moved


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below 2**bits into a little-endian bit stream of uint8.

    Value i's bit j is stream bit i*bits + j; byte k holds stream bits 8k..8k+7 (the layout of every
    artifact so far). Eight values fill exactly ``bits`` bytes: they are packed inside one int64 word by
    a few shifts and masks over all words at once, with no loop over values.
    """
    count = values.numel()
    codes = torch.zeros(-(-count // 8) * 8, dtype=torch.uint8, device=values.device)
    codes[:count] = values.reshape(-1)  # a copy: pack_codes overwrites it
    out = torch.empty(len(codes) * bits // 8, dtype=torch.uint8, device=values.device)
    pack_codes(codes, bits, out, torch.empty(len(codes) // 8, dtype=torch.int64, device=values.device))
    return out[: math.ceil(count * bits / 8)]


def unpack_bits(
    packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` integers, as ``dtype`` (int64 unless asked)."""
    n = -(-count // 8) * 8
    stream = torch.zeros(n * bits // 8, dtype=torch.uint8, device=packed.device)
    flat = packed.reshape(-1)[: len(stream)]
    stream[: len(flat)] = flat
    codes = torch.empty(n, dtype=torch.uint8, device=packed.device)
    unpack_codes(stream, bits, codes, torch.empty(n // 8, dtype=torch.int64, device=packed.device))
    return codes[:count].to(dtype)
