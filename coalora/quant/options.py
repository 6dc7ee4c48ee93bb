"""Quantization options: the five fields of one matrix's setting, the 432-option space and storage cost.

SPEC §2.1/§2.2. An option is frozen and hashable so it can key caches (quantized weights, error tables).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from functools import cached_property

import torch

from coalora.errors import CoaloraError

BITS_CHOICES: tuple[int, ...] = (2, 3, 4, 8)
SCALE_BITS_CHOICES: tuple[int, ...] = (2, 3, 4, 8)
SCALE2_DTYPE_CHOICES: tuple[str, ...] = ("bf16", "fp16", "fp32")
BLOCK_CHOICES: tuple[int, ...] = (16, 32, 64)
BLOCK2_CHOICES: tuple[int, ...] = (16, 64, 256)

#: field name -> its allowed values, in index order (the order the search encodes them by).
FIELD_CHOICES: dict[str, tuple] = {
    "bits": BITS_CHOICES,
    "scale_bits": SCALE_BITS_CHOICES,
    "scale2_dtype": SCALE2_DTYPE_CHOICES,
    "block": BLOCK_CHOICES,
    "block2": BLOCK2_CHOICES,
}
FIELD_NAMES: tuple[str, ...] = tuple(FIELD_CHOICES)

TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_BITS: dict[str, int] = {"bf16": 16, "fp16": 16, "fp32": 32}


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
        """Bits per weight: codes + first-level scales + second-level scales (SPEC §2.2)."""
        return (
            self.bits
            + self.scale_bits / self.block
            + DTYPE_BITS[self.scale2_dtype] / (self.block * self.block2)
        )

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
#: Number of values each field can take, in FIELD_NAMES order (the search normalises indices by these).
FIELD_SIZES: tuple[int, ...] = tuple(len(c) for c in FIELD_CHOICES.values())

assert [f.name for f in fields(QuantOption)] == list(FIELD_NAMES)
