"""The blocked codebook families: absmax blocks rounded to a fixed codebook, scales double-quantized.

``nf`` (NormalFloat, SPEC §2.3 item 5) and ``int`` (the symmetric uniform grid of the paper's Table 4) differ
only in their codebook, so one class serves both: the option schema, cost and part schema come from
:mod:`~coalora.quant.families.blocked_schema`, the kernels from :mod:`coalora.quant.quantizer` and
:mod:`coalora.quant.error_table`, which look the codebook up by name in the registry (so they never
import this module; the ``coalora.quant`` package does, which registers ``nf`` and ``int``). A new
codebook is one :class:`BlockedCodebookFamily` and one ``register_family`` call.

NormalFloat is written by hand because bitsandbytes ships only NF4 (and only for CUDA); the 2/3/8-bit
NormalFloat grids exist in no maintained library.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch

from coalora.errors import CoaloraError
from coalora.quant import dequantize, quantizer
from coalora.quant.families import PartSpec, register_family
from coalora.quant.families import blocked_schema as schema
from coalora.quant.options import OPTION_SPACE, QuantOption
from coalora.quant.quantizer import PackedTensor

#: Probability of the outermost NormalFloat quantile (QLoRA's offset); it maps to +1 after normalising.
NF_DELTA = 0.9677083


def normal_float_levels(bits: int) -> tuple[float, ...]:
    """NormalFloat levels: normal quantiles, asymmetric so that 0 is a level, scaled to [-1, 1]."""
    half = 2 ** (bits - 1)
    positive_p = torch.linspace(NF_DELTA, 0.5, half + 1, dtype=torch.float64)[:-1]
    negative_p = torch.linspace(NF_DELTA, 0.5, half, dtype=torch.float64)[:-1]
    positive = torch.special.ndtri(positive_p)
    negative = -torch.special.ndtri(negative_p)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return tuple((levels / levels.abs().max()).tolist())


def symmetric_int_levels(bits: int) -> tuple[float, ...]:
    """k / (2^(bits-1) - 1) for |k| up to that: uniform, symmetric, 2^bits - 1 levels."""
    top = 2 ** (bits - 1) - 1
    return tuple(k / top for k in range(-top, top + 1))


class BlockedCodebookFamily:
    """A code family of the blocked, double-quantized scheme over the codebook ``levels(bits)`` gives.

    ``levels`` must return, for each code width of the schema, at most ``2**bits`` sorted values in
    [-1, 1] (checked once per width); they are cached, so it may be slow.
    """

    field_choices: dict[str, tuple] = schema.FIELD_CHOICES
    part_names: tuple[str, ...] = schema.PART_NAMES
    trains = True
    gptq_rounding = True

    def __init__(self, name: str, levels: Callable[[int], Sequence[float]], description: str = "") -> None:
        self.name = name
        self.description = description
        self._levels_of = levels
        self._levels = cache(self._checked_levels)

    def __repr__(self) -> str:
        return f"BlockedCodebookFamily({self.name!r})"

    # -- option schema and encoding ------------------------------------------------------------------------
    @property
    def field_names(self) -> tuple[str, ...]:
        return schema.FIELD_NAMES

    @property
    def field_sizes(self) -> tuple[int, ...]:
        return schema.FIELD_SIZES

    @property
    def option_space(self) -> tuple[QuantOption, ...]:
        return OPTION_SPACE

    def encode(self, option: QuantOption) -> tuple[int, ...]:
        """Each field's index in its choice list (what the mapper embeds and the search moves)."""
        return option.indices

    def decode(self, indices: Sequence[int]) -> QuantOption:
        return QuantOption.from_indices(list(indices))

    def option_from_dict(self, data: Any, where: str = "option") -> QuantOption:
        return QuantOption.from_dict(data, where)  # it checks that data is a mapping itself

    def allowed(self, option: QuantOption, row_length: int) -> bool:
        """Every option codes any matrix (blocks run over the flattened weights, the last one padded)."""
        return True

    # -- cost and stored parts -----------------------------------------------------------------------------
    def bits_per_weight(self, option: QuantOption) -> float:
        return schema.option_bits(option)

    def bits_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return schema.bits_from_indices(indices)

    def part_schema(self, option: QuantOption, numel: int) -> dict[str, PartSpec]:
        return schema.part_schema(option, numel)

    def from_parts(
        self, shape: tuple[int, ...], option: QuantOption, parts: dict[str, torch.Tensor]
    ) -> PackedTensor:
        return PackedTensor(shape=tuple(shape), option=option, family=self.name, **parts)

    # -- codebook --------------------------------------------------------------------------------------------
    def levels(self, bits: int) -> tuple[float, ...]:
        """The sorted levels of ``bits``-bit codes (cached)."""
        return self._levels(bits)

    def codebook(self, bits: int) -> torch.Tensor:
        """Sorted float32 levels in [-1, 1] for ``bits``-bit codes."""
        return torch.tensor(self._levels(bits), dtype=torch.float32)

    def _checked_levels(self, bits: int) -> tuple[float, ...]:
        levels = tuple(float(v) for v in self._levels_of(bits))
        ordered = all(a < b for a, b in itertools.pairwise(levels))
        if not 1 < len(levels) <= 2**bits or not ordered or not all(-1.0 <= v <= 1.0 for v in levels):
            raise CoaloraError(
                f"code family '{self.name}' gives {len(levels)} levels for {bits} bits; a codebook needs "
                f"2 to {2**bits} increasing values in [-1, 1]"
            )
        return levels

    # -- kernels ---------------------------------------------------------------------------------------------
    def quantize(
        self, weight: torch.Tensor, option: QuantOption, absmax: torch.Tensor | None = None
    ) -> PackedTensor:
        return quantizer.blocked_quantize(weight, option, self.name, absmax)

    def fake_quantize(
        self, weight: torch.Tensor, option: QuantOption, absmax: torch.Tensor | None = None
    ) -> torch.Tensor:
        return quantizer.blocked_fake_quantize(weight, option, self.name, absmax)

    def quantize_both(
        self, weight: torch.Tensor, option: QuantOption, absmax: torch.Tensor | None = None
    ) -> tuple[PackedTensor, torch.Tensor]:
        return quantizer.blocked_quantize_both(weight, option, self.name, absmax)

    def dequantize(self, packed: PackedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize.blocked_dequantize(packed, out)

    def error_table(
        self,
        weights: dict[str, torch.Tensor],
        options: Sequence[QuantOption],
        fisher: dict[str, torch.Tensor] | None = None,
        hessians: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from coalora.quant.error_table import blocked_error_table  # not needed to serve: imported here

        return blocked_error_table(weights, options, self.name, fisher, hessians)


NF = BlockedCodebookFamily("nf", normal_float_levels, "NormalFloat: normal quantiles (QLoRA's NF4 at 4 bits)")
INT = BlockedCodebookFamily("int", symmetric_int_levels, "symmetric integer: a uniform grid with 0")

#: the built-in families, registered in this order when this module is first imported
BUILTIN_FAMILIES: tuple[BlockedCodebookFamily, ...] = (NF, INT)
for _family in BUILTIN_FAMILIES:
    register_family(_family)
