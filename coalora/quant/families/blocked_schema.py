"""The option schema of the blocked, double-quantized families (``nf``, ``int``): fields, cost, parts.

SPEC §2.1-§2.3. Everything here is a pure function of the five field values, so :class:`~coalora.quant.
options.QuantOption` (the scalar form) and the search's (..., 5) index tensors (the vectorised form) take
their bits per weight from the one :func:`storage_cost` below, and the artifact's part schema sits beside it
where a test can hold them to each other. It imports no other coalora module: the option module imports it.
"""

from __future__ import annotations

from typing import Any

import torch

from coalora.quant.families import PartSpec

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
#: Number of values each field can take, in FIELD_NAMES order (the search normalises indices by these).
FIELD_SIZES: tuple[int, ...] = tuple(len(c) for c in FIELD_CHOICES.values())

TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_BITS: dict[str, int] = {"bf16": 16, "fp16": 16, "fp32": 32}

#: names of a packed matrix's parts, in the order artifacts store them
PART_NAMES: tuple[str, ...] = ("codes", "scale_codes", "scale2", "offset")


def field_number(name: str, value: Any) -> float:
    """The number a field's value enters the cost with: a dtype by its bit width, the others as they are."""
    return float(DTYPE_BITS[value]) if name == "scale2_dtype" else float(value)


def storage_cost(bits: Any, scale_bits: Any, scale2_bits: Any, block: Any, block2: Any) -> Any:
    """Bits per weight: codes + first-level scales + second-level scales (SPEC §2.2).

    The one definition of the cost: called with floats for one option and with float64 tensors for a batch
    of encodings (the same operations in the same order, so both round alike).
    """
    return bits + scale_bits / block + scale2_bits / (block * block2)


def option_bits(option: Any) -> float:
    """:func:`storage_cost` of an option (anything with the five fields as attributes)."""
    return storage_cost(*(field_number(n, getattr(option, n)) for n in FIELD_NAMES))


#: per field, the number of each choice in index order: indices select from these, then storage_cost
FIELD_NUMBERS: tuple[tuple[float, ...], ...] = tuple(
    tuple(field_number(n, v) for v in FIELD_CHOICES[n]) for n in FIELD_NAMES
)


def bits_from_indices(indices: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`option_bits` for (..., 5) integer field indices (float64)."""
    indices = indices.long()
    numbers = (
        torch.tensor(table, dtype=torch.float64, device=indices.device)[indices[..., i]]
        for i, table in enumerate(FIELD_NUMBERS)
    )
    return storage_cost(*numbers)


def part_schema(option: Any, numel: int) -> dict[str, PartSpec]:
    """Dtype and element count of each tensor the quantizer stores for ``numel`` weights under ``option``.

    Codes and scale codes are bit streams in whole bytes; ``scale2`` holds one value per group of
    ``block2`` blocks; ``offset`` is one float32 per matrix (the 32 bits :func:`storage_cost` leaves out).
    """
    blocks = -(-numel // option.block)
    return {
        "codes": PartSpec(torch.uint8, -(-blocks * option.block * option.bits // 8)),
        "scale_codes": PartSpec(torch.uint8, -(-blocks * option.scale_bits // 8)),
        "scale2": PartSpec(TORCH_DTYPES[option.scale2_dtype], -(-blocks // option.block2), exact_dtype=True),
        "offset": PartSpec(torch.float32, 1, exact_dtype=True),
    }
