"""A memory-bounded LRU cache of quantized weights keyed by (matrix, option), dense or packed.

Configurations share most of their options, so a switch usually re-quantizes only a few matrices.

What an entry holds (``mode``):

- ``dense``: the dequantized weight, ready to use; a hit costs nothing. 4 bytes a weight in fp32: MiniLM's
  50 training configurations take about 500 MB, RoBERTa-Large's about 1.2 GB each, a 7B model's 26 GB.
- ``packed``: the packed codes, scale codes and second-level scales (:class:`PackedTensor`, the
  artifact's form: ``bits/8`` bytes a weight plus the scales); a hit dequantizes, bit for bit what
  ``fake_quantize`` gives, so training is unchanged. The dense weight exists only while its
  configuration is active (one configuration's worth at a time), at the cost of a dequantization per
  activation, i.e. per configuration of a step.
- ``auto`` (the default): dense while the entries fit ``max_bytes``; on the first entry that would not
  fit, the cache empties and holds packed entries from then on (evicting least recently used ones
  when even those exceed ``max_bytes``). A training set that fits pays nothing; one that does not is
  held packed rather than re-quantized on every switch.

Entries are quantized by the cache's :class:`~coalora.quant.rounding.Rounder` (round-to-nearest, or GPTQ
rounding with the model's calibration statistics): a (matrix, option) is rounded once, whichever way.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch

from coalora.errors import CoaloraError
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import PackedTensor
from coalora.quant.rounding import Rounder

CacheMode = Literal["auto", "dense", "packed"]
CACHE_MODES: tuple[str, ...] = ("auto", "dense", "packed")


def _nbytes(entry: torch.Tensor | PackedTensor) -> int:
    if isinstance(entry, PackedTensor):
        return entry.nbytes
    return entry.numel() * entry.element_size()


class QuantCache:
    """LRU cache of quantized weights keyed by (matrix, option), bounded in bytes; see the module doc."""

    def __init__(
        self, max_bytes: int, family: str = "nf", mode: CacheMode = "auto", rounder: Rounder | None = None
    ) -> None:
        """``rounder`` (default: round-to-nearest in ``family``) chooses every entry's codes."""
        if mode not in CACHE_MODES:
            raise CoaloraError(f"quant cache mode must be one of {', '.join(CACHE_MODES)}, got '{mode}'")
        self.max_bytes = max_bytes
        self.rounder = Rounder("nearest", family) if rounder is None else rounder
        self.family = self.rounder.family
        self.mode = mode
        #: whether entries are held packed now (``auto`` turns this on at its first overflow)
        self.packed = mode == "packed"
        self._entries: OrderedDict[tuple[str, QuantOption], torch.Tensor | PackedTensor] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, name: str, option: QuantOption, weight: torch.Tensor) -> torch.Tensor:
        """The quantized-then-dequantized ``weight`` of matrix ``name`` at ``option``, in its dtype."""
        key = (name, option)
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._dense(cached, weight.dtype)
        self.misses += 1
        entry = self._store(key, self._quantized(name, weight, option), weight)
        return self._dense(entry, weight.dtype)

    def prefetch(self, items: list[tuple[str, QuantOption, torch.Tensor]]) -> None:
        """Quantize the missing ``(name, option, weight)`` entries together: GPTQ rounds the matrices of
        one input width in one pass of column steps, so a configuration costs about what one matrix
        does. Round-to-nearest gains nothing from it and goes entry by entry through :meth:`get`."""
        missing = list({(n, o): (n, o, w) for n, o, w in items if (n, o) not in self._entries}.values())
        if self.rounder.method == "nearest" or len(missing) < 2:
            return
        names, options, weights = (list(column) for column in zip(*missing, strict=True))
        if self.packed:
            entries: list = self.rounder.packed_many(names, weights, options)
        else:
            dense = self.rounder.dense_many(names, weights, options)
            entries = [d.to(w.dtype) for d, w in zip(dense, weights, strict=True)]
        for name, option, weight, entry in zip(names, options, weights, entries, strict=True):
            self.misses += 1
            self._store((name, option), entry, weight)

    def _store(
        self, key: tuple[str, QuantOption], entry: torch.Tensor | PackedTensor, weight: torch.Tensor
    ) -> torch.Tensor | PackedTensor:
        """Hold a fresh entry within the bound (``auto`` turns packed at its first overflow); returns it."""
        if not self.packed and self.mode == "auto" and self._bytes + _nbytes(entry) > self.max_bytes:
            self.clear()  # the dense entries do not fit: hold every entry packed from now on
            self.packed = True
            entry = self._quantized(key[0], weight, key[1])
        size = _nbytes(entry)
        while self._entries and self._bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= _nbytes(evicted)
        if size <= self.max_bytes:
            self._entries[key] = entry
            self._bytes += size
        return entry

    def _quantized(self, name: str, weight: torch.Tensor, option: QuantOption) -> torch.Tensor | PackedTensor:
        if self.packed:
            return self.rounder.packed(name, weight, option)
        return self.rounder.dense(name, weight, option).to(weight.dtype)

    @staticmethod
    def _dense(entry: torch.Tensor | PackedTensor, dtype: torch.dtype) -> torch.Tensor:
        return entry.dequantize().to(dtype) if isinstance(entry, PackedTensor) else entry

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached entries (dense weights, or packed codes and scales)."""
        return self._bytes
