"""A memory-bounded LRU cache of quantized weights keyed by (matrix, option), dense or packed.

Configurations share most of their options, so a switch usually re-quantizes only a few matrices.

What an entry holds (``mode``):

- ``dense``: the dequantized weight, ready to use; a hit costs nothing. 4 bytes a weight in fp32: MiniLM's
  50 training configurations take about 500 MB, RoBERTa-Large's about 1.2 GB each, a 7B model's 26 GB.
- ``packed``: the packed codes, scale codes and second-level scales (:class:`PackedTensor`, the
  artifact's form; for ``gguf``, the matrix's llama.cpp block bytes: ``bits/8`` bytes a weight plus the
  scales); a hit dequantizes, bit for bit what ``fake_quantize`` gives, so training is unchanged. The
  dense weight exists only while its configuration is active (one configuration's worth at a time), at
  the cost of a dequantization per activation, i.e. per configuration of a step.
- ``auto`` (the default): dense while the entries fit ``max_bytes``; on the first entry that would not
  fit, the cache empties and holds packed entries from then on (evicting least recently used ones
  when even those exceed ``max_bytes``). A training set that fits pays nothing; one that does not is
  held packed rather than re-quantized on every switch.

Entries are quantized by the cache's :class:`~coalora.quant.rounding.Rounder` (round-to-nearest, or GPTQ
rounding with the model's calibration statistics): a (matrix, option) is rounded once, whichever way.
The form an entry is held in is chosen before it is quantized (``auto`` goes packed as soon as the
entries to add would overflow the bound), so none is quantized twice. ``keep_codes`` makes dense entries
carry their packed form too (counted in the bound): an export of a configuration switched to before
reuses them (:meth:`QuantCache.packed_form`). ``dense_dtype`` holds dense entries in the compute dtype
(bf16 under bf16 autocast): the cast autocast would otherwise make of every entry on every forward is made
once, to the same bits, at half the bytes. Each matrix's block absmax, the same for every option of one
block size, is kept per (matrix, block size) in :class:`AbsmaxStore` and survives :meth:`QuantCache.clear`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch

from coalora.errors import CoaloraError
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import PackedTensor, block_absmax
from coalora.quant.rounding import Rounder

CacheMode = Literal["auto", "dense", "packed"]
CACHE_MODES: tuple[str, ...] = ("auto", "dense", "packed")


@dataclass
class CodedDense:
    """A dense entry with the packed form it was dequantized from (``keep_codes``)."""

    dense: torch.Tensor
    packed: PackedTensor


Entry = torch.Tensor | PackedTensor | CodedDense


def _nbytes(entry: Entry) -> int:
    if isinstance(entry, CodedDense):
        return _nbytes(entry.dense) + entry.packed.nbytes
    if isinstance(entry, torch.Tensor):
        return entry.numel() * entry.element_size()
    return entry.nbytes  # a family's packed form (PackedTensor, or gguf's block bytes)


class AbsmaxStore:
    """Block absmax per (matrix, block size), bounded in bytes (least recently used go first).

    An entry holds the weight tensor it was computed from and that tensor's version counter, and serves
    a later weight only if it is the same memory, shape, strides, dtype and device at the same version
    (an in-place change bumps it); holding the tensor keeps its memory from going to another tensor.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int], tuple[torch.Tensor, int, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def get(self, name: str, weight: torch.Tensor, block: int) -> torch.Tensor:
        key, version = (name, block), _version(weight)
        held = self._entries.get(key)
        if held is not None and held[1] == version and _same_memory(held[0], weight):
            self._entries.move_to_end(key)
            return held[2]
        if held is not None:
            del self._entries[key]
            self._bytes -= held[2].numel() * 4
        absmax = block_absmax(weight, block)
        while self._entries and self._bytes + absmax.numel() * 4 > self.max_bytes:
            self._bytes -= self._entries.popitem(last=False)[1][2].numel() * 4
        if version is not None and absmax.numel() * 4 <= self.max_bytes:
            self._entries[key] = (weight.detach(), version, absmax)
            self._bytes += absmax.numel() * 4
        return absmax

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _version(weight: torch.Tensor) -> int | None:
    """The tensor's version counter (in-place changes bump it); None for tensors without one."""
    try:
        return getattr(weight, "_version", None)
    except RuntimeError:  # an inference-mode tensor keeps no version: never reuse its absmax
        return None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    same = a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device
    return same and a.shape == b.shape and a.stride() == b.stride()


class QuantCache:
    """LRU cache of quantized weights keyed by (matrix, option), bounded in bytes; see the module doc."""

    def __init__(
        self,
        max_bytes: int,
        family: str = "nf",
        mode: CacheMode = "auto",
        rounder: Rounder | None = None,
        keep_codes: bool = False,
        absmax: AbsmaxStore | None = None,
        dense_dtype: torch.dtype | None = None,
    ) -> None:
        """``rounder`` (default: round-to-nearest in ``family``) chooses every entry's codes; ``absmax``: a
        store to share (default: a new one bounded to an eighth of ``max_bytes``); ``dense_dtype``: what
        dense weights are held and handed out in (default: the weight's own dtype)."""
        if mode not in CACHE_MODES:
            raise CoaloraError(f"quant cache mode must be one of {', '.join(CACHE_MODES)}, got '{mode}'")
        self.max_bytes = max_bytes
        self.rounder = Rounder("nearest", family) if rounder is None else rounder
        self.family = self.rounder.family
        self.mode = mode
        self.keep_codes = keep_codes
        self.dense_dtype = dense_dtype
        #: threads that quantize a configuration's missing matrices side by side where the compiled pass
        #: runs (:class:`~coalora.deploy.adaptive.AdaptiveModel` sets its own; training keeps one)
        self.threads = 1
        self.absmax = AbsmaxStore(max_bytes // 8) if absmax is None else absmax
        #: whether entries are held packed now (``auto`` turns this on at its first overflow)
        self.packed = mode == "packed"
        self._entries: OrderedDict[tuple[str, QuantOption], Entry] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0
        self._prefetched: set[tuple[str, QuantOption]] = set()  # filled by prefetch, not yet got

    def renewed(
        self,
        mode: CacheMode | None = None,
        rounder: Rounder | None = None,
        dense_dtype: torch.dtype | str | None = "same",
    ) -> QuantCache:
        """An empty cache with this one's bound, code keeping, threads and absmax store, in ``mode``, with
        ``rounder`` and ``dense_dtype`` (defaults: this one's)."""
        mode, rounder = self.mode if mode is None else mode, self.rounder if rounder is None else rounder
        dtype = self.dense_dtype if isinstance(dense_dtype, str) else dense_dtype
        cache = QuantCache(self.max_bytes, self.family, mode, rounder, self.keep_codes, self.absmax, dtype)
        cache.threads = self.threads
        return cache

    def get(self, name: str, option: QuantOption, weight: torch.Tensor) -> torch.Tensor:
        """The quantized-then-dequantized ``weight`` of matrix ``name`` at ``option``, in its dtype."""
        key = (name, option)
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            if key in self._prefetched:  # counted as a miss when prefetched
                self._prefetched.discard(key)
            else:
                self.hits += 1
            return self._dense(cached, self._dtype(weight))
        return self._dense(self._fill([(name, option, weight)])[0], self._dtype(weight))

    def _dtype(self, weight: torch.Tensor) -> torch.dtype:
        return weight.dtype if self.dense_dtype is None else self.dense_dtype

    def packed_form(self, name: str, option: QuantOption) -> PackedTensor | None:
        """The packed form held for (``name``, ``option``), if any: a packed entry, or a dense one's codes."""
        entry = self._entries.get((name, option))
        if isinstance(entry, CodedDense):
            return entry.packed
        return None if entry is None or isinstance(entry, torch.Tensor) else entry

    def prefetch(self, items: list[tuple[str, QuantOption, torch.Tensor]]) -> None:
        """Quantize the missing ``(name, option, weight)`` entries together: GPTQ rounds the matrices of
        one input width in one pass of column steps, so a configuration costs about what one matrix
        does; round-to-nearest spreads them over :attr:`threads` threads where the compiled pass
        runs (it lets go of the GIL). Otherwise :meth:`get` quantizes them one by one."""
        missing = list({(n, o): (n, o, w) for n, o, w in items if (n, o) not in self._entries}.values())
        spread = self.threads > 1 and self.rounder.parallel(missing[0][2]) if missing else False
        if len(missing) >= 2 and (self.rounder.method != "nearest" or spread):
            self._fill(missing)
            self._prefetched = {(n, o) for n, o, _ in missing}

    def _fill(self, items: list[tuple[str, QuantOption, torch.Tensor]]) -> list[Entry]:
        """Quantize ``items`` once each, in the form the cache holds them, store them; returns them."""
        if not self.packed and self.mode == "auto":
            adding = sum(w.numel() * self._dtype(w).itemsize for _, _, w in items)
            if self.keep_codes:
                adding += sum(math.ceil(o.storage_bits * w.numel() / 8) for _, o, w in items)
            if self._bytes + adding > self.max_bytes:
                self.clear()  # the dense entries do not fit: hold every entry packed from now on
                self.packed = True
        names = [name for name, _, _ in items]
        options = [option for _, option, _ in items]
        weights = [weight for _, _, weight in items]
        absmax = None
        # the blocked families share each block size's absmax between options; gguf types scale themselves
        if self.rounder.method == "nearest" and all(isinstance(o, QuantOption) for o in options):
            absmax = [self.absmax.get(n, w, o.block) for n, o, w in items]
        keep = self.packed or self.keep_codes
        forms = self.rounder.forms_many(names, weights, options, keep, not self.packed, absmax, self.threads)
        entries: list[Entry] = []
        for (name, option, weight), (packed, dense) in zip(items, forms, strict=True):
            self.misses += 1
            entry: Entry
            if self.packed:
                assert packed is not None
                entry = packed
            else:
                assert dense is not None
                dense = dense.to(self._dtype(weight))
                entry = dense if packed is None else CodedDense(dense, packed)
            entries.append(entry)
            self._store((name, option), entry)
        return entries

    def _store(self, key: tuple[str, QuantOption], entry: Entry) -> None:
        """Hold a fresh entry within the bound, evicting the least recently used ones for it."""
        size = _nbytes(entry)
        while self._entries and self._bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= _nbytes(evicted)
        if size <= self.max_bytes:
            self._entries[key] = entry
            self._bytes += size

    @staticmethod
    def _dense(entry: Entry, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(entry, CodedDense):
            return entry.dense
        return entry if isinstance(entry, torch.Tensor) else entry.dequantize().to(dtype)

    def clear(self) -> None:
        """Drop every quantized entry (the absmax store stays: it checks its weights itself)."""
        self._entries.clear()
        self._prefetched.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached entries (dense weights, or packed codes and scales)."""
        return self._bytes
