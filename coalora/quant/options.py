"""Quantization options: the five fields of one matrix's setting, the 432-option space and storage cost.

SPEC §2.1/§2.2. An option is frozen and hashable so it can key caches (quantized weights, error tables).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from functools import cached_property

from coalora.errors import CoaloraError

# The schema lives with the family that owns it; these names stay importable from here.
from coalora.quant.families.blocked_schema import (
    BITS_CHOICES,
    BLOCK2_CHOICES,
    BLOCK_CHOICES,
    DTYPE_BITS,
    FIELD_CHOICES,
    FIELD_NAMES,
    FIELD_SIZES,
    SCALE2_DTYPE_CHOICES,
    SCALE_BITS_CHOICES,
    TORCH_DTYPES,
    option_bits,
)

__all__ = [
    "BITS_CHOICES",
    "BLOCK2_CHOICES",
    "BLOCK_CHOICES",
    "DTYPE_BITS",
    "FIELD_CHOICES",
    "FIELD_NAMES",
    "FIELD_SIZES",
    "NF4_DOUBLE_QUANT",
    "OPTION_SPACE",
    "SCALE2_DTYPE_CHOICES",
    "SCALE_BITS_CHOICES",
    "TORCH_DTYPES",
    "QuantOption",
]


@dataclass(frozen=True, order=True)
class QuantOption:
    """How one weight matrix is quantized: NormalFloat bits, scale bits, second-level dtype, block sizes."""

    bits: int = 4
    scale_bits: int = 8
    scale2_dtype: str = "fp32"
    block: int = 64
    block2: int = 256

    def __post_init__(self) -> None:
        for name, choices in FIELD_CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                allowed = ", ".join(str(c) for c in choices)
                raise CoaloraError(
                    f"option field '{name}' = {value!r} is outside the space; use one of: {allowed}"
                )

    @property
    def storage_bits(self) -> float:
        """Bits per weight: codes + first-level scales + second-level scales (SPEC §2.2), from the family
        schema's one formula (:func:`~coalora.quant.families.blocked_schema.storage_cost`)."""
        return option_bits(self)

    @cached_property
    def indices(self) -> tuple[int, int, int, int, int]:
        """Position of each field's value in its choice list (the search's integer encoding)."""
        return tuple(FIELD_CHOICES[n].index(getattr(self, n)) for n in FIELD_NAMES)  # type: ignore[return-value]

    @classmethod
    def from_indices(cls, indices: tuple[int, ...] | list[int]) -> QuantOption:
        return cls(**{n: FIELD_CHOICES[n][int(i)] for n, i in zip(FIELD_NAMES, indices, strict=True)})

    @classmethod
    def from_dict(cls, data: dict, where: str = "option") -> QuantOption:
        """Build from a JSON mapping, with one-line errors for unknown or missing fields."""
        if not isinstance(data, dict):
            raise CoaloraError(
                f"{where} must be a mapping of {', '.join(FIELD_NAMES)}; got {type(data).__name__}"
            )
        unknown = sorted(set(data) - set(FIELD_NAMES))
        if unknown:
            raise CoaloraError(
                f"{where} has unknown field(s) {unknown}; allowed fields: {', '.join(FIELD_NAMES)}"
            )
        missing = [n for n in FIELD_NAMES if n not in data]
        if missing:
            raise CoaloraError(
                f"{where} is missing field(s) {missing}; every option needs {', '.join(FIELD_NAMES)}"
            )
        try:
            return cls(**data)
        except CoaloraError as err:
            raise CoaloraError(f"{where}: {err}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        """Compact label, e.g. ``nf4/s8/fp32/64/256``."""
        return f"b{self.bits}/s{self.scale_bits}/{self.scale2_dtype}/{self.block}/{self.block2}"


#: The paper's search space in a fixed order: 4 * 4 * 3 * 3 * 3 = 432 options.
OPTION_SPACE: tuple[QuantOption, ...] = tuple(
    QuantOption(*values) for values in itertools.product(*FIELD_CHOICES.values())
)
#: QLoRA's NF4 with double quantization: 4.126953125 bits per weight.
NF4_DOUBLE_QUANT = QuantOption(4, 8, "fp32", 64, 256)

assert [f.name for f in fields(QuantOption)] == list(FIELD_NAMES)
