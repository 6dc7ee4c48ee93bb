"""A memory-bounded LRU cache of dequantized weights keyed by (matrix, option).

Configurations share most of their options, so a switch usually re-quantizes only a few matrices.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from coalora.quant.options import QuantOption
from coalora.quant.quantizer import fake_quantize


class QuantCache:
    """LRU cache of dequantized weights keyed by (matrix, option), bounded in bytes."""

    def __init__(self, max_bytes: int, family: str = "nf") -> None:
        self.max_bytes = max_bytes
        self.family = family
        self._entries: OrderedDict[tuple[str, QuantOption], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, name: str, option: QuantOption, weight: torch.Tensor) -> torch.Tensor:
        key = (name, option)
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return cached
        self.misses += 1
        value = fake_quantize(weight, option, self.family).to(weight.dtype)
        size = value.numel() * value.element_size()
        while self._entries and self._bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()
        if size <= self.max_bytes:
            self._entries[key] = value
            self._bytes += size
        return value

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached dequantized weights."""
        return self._bytes
