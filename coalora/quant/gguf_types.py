"""llama.cpp's quantization types (GGUF tensor types): block geometry, bytes and bits per weight.

A ``gguf`` option is one of these types per matrix. The numbers here are llama.cpp's own (``ggml-common.h``
block structs, ``ggml_type_size`` / ``ggml_blck_size``), so a storage budget counted with
:attr:`GGUFType.bits_per_weight` is the budget a ``.gguf`` file really spends: scales, mins and super-block
fp16 factors all included (Q2_K is 84 bytes per 256 weights = 2.625 bits, not 2).

K-quants pack 256 weights per super-block, so a row (llama.cpp quantizes along ``ne[0]``, the input
dimension: the last dimension of a torch ``[out, in]`` weight) must be a multiple of 256. llama-quantize
silently swaps such a tensor to a 32-weight type; here the swap is the caller's decision, so
:func:`check_row_length` refuses with the type llama.cpp would fall back to. The kernels live in
:mod:`coalora.quant.gguf_kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

from coalora.errors import CoaloraError

#: weights per K-quant super-block (llama.cpp's ``QK_K``)
QK_K = 256
#: weights per block of the legacy 32-weight types (``QK4_0`` = ``QK5_0`` = ``QK8_0`` = 32)
QK_32 = 32


@dataclass(frozen=True)
class GGUFType:
    """One llama.cpp block type: how many weights a block holds and how many bytes it takes."""

    name: str
    #: the ``ggml_type`` enum value (``gguf.GGMLQuantizationType``), the id written in a ``.gguf`` header
    ggml_id: int
    #: weights per block (32, or 256 for K-quants)
    block_size: int
    #: bytes per block, every field included
    type_size: int
    #: the 32-weight type llama-quantize substitutes when a row is not a multiple of 256 (K-quants only)
    fallback: str | None = None

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight as llama.cpp counts them: whole block bytes over block weights."""
        return self.type_size * 8 / self.block_size

    @property
    def is_k_quant(self) -> bool:
        """Whether this is a 256-weight super-block type (needs rows that are multiples of 256)."""
        return self.block_size == QK_K

    def row_bytes(self, row_length: int) -> int:
        """Bytes one row of ``row_length`` weights takes (the row must already be checked)."""
        return row_length // self.block_size * self.type_size

    def __str__(self) -> str:
        return self.name


# Q2_K and Q3_K fall back to IQ4_NL in llama-quantize; IQ4_NL (a non-linear 4.5-bit grid) is not
# implemented here, so they fall back to Q4_0, which costs the same 4.5 bits per weight.
_TYPES = (
    GGUFType("Q4_0", 2, QK_32, 2 + 16),
    GGUFType("Q4_1", 3, QK_32, 2 + 2 + 16),
    GGUFType("Q5_0", 6, QK_32, 2 + 4 + 16),
    GGUFType("Q5_1", 7, QK_32, 2 + 2 + 4 + 16),
    GGUFType("Q8_0", 8, QK_32, 2 + 32),
    GGUFType("Q2_K", 10, QK_K, 16 + 64 + 2 + 2, fallback="Q4_0"),
    GGUFType("Q3_K", 11, QK_K, 32 + 64 + 12 + 2, fallback="Q4_0"),
    GGUFType("Q4_K", 12, QK_K, 2 + 2 + 12 + 128, fallback="Q5_0"),
    GGUFType("Q5_K", 13, QK_K, 2 + 2 + 12 + 32 + 128, fallback="Q5_1"),
    GGUFType("Q6_K", 14, QK_K, 128 + 64 + 16 + 2, fallback="Q8_0"),
)

#: name -> type, the legacy 32-weight types first, then the K-quants by increasing bits
GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in _TYPES}


def gguf_type(kind: str | GGUFType) -> GGUFType:
    """The type named ``kind`` (case-insensitive), with a one-line error listing the known ones."""
    if isinstance(kind, GGUFType):
        return kind
    found = GGUF_TYPES.get(str(kind).upper())
    if found is None:
        raise CoaloraError(f"unknown GGUF type '{kind}'; use one of: {', '.join(GGUF_TYPES)}")
    return found


def row_length_error(kind: str | GGUFType, row_length: int) -> str | None:
    """Why ``kind`` cannot quantize rows of ``row_length`` weights, with what to use instead; None if it can.

    Kept apart from :func:`check_row_length` so an allocator can filter its candidates without catching.
    """
    t = gguf_type(kind)
    if row_length > 0 and row_length % t.block_size == 0:
        return None
    if t.is_k_quant and row_length > 0 and row_length % QK_32 == 0:
        return (
            f"GGUF type {t.name} needs rows whose length is a multiple of {QK_K}, got {row_length}; "
            f"use {t.fallback} for this matrix (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 need multiples of {QK_32})"
        )
    return (
        f"GGUF type {t.name} needs rows whose length is a multiple of {t.block_size}, got {row_length}; "
        f"no GGUF block type fits it, keep this matrix in F16"
    )


def check_row_length(kind: str | GGUFType, row_length: int) -> GGUFType:
    """The type, after refusing (one-line :class:`CoaloraError`) a row length its blocks do not tile."""
    message = row_length_error(kind, row_length)
    if message is not None:
        raise CoaloraError(message)
    return gguf_type(kind)


def allowed_types(row_length: int) -> tuple[GGUFType, ...]:
    """The types that can quantize rows of ``row_length`` weights (K-quants only for multiples of 256)."""
    return tuple(t for t in _TYPES if row_length_error(t, row_length) is None)
