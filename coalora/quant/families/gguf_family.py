"""The ``gguf`` code family: one llama.cpp block type per matrix (issue #26 item 2, first step).

An option is a single field, the type's name. Bits per weight are llama.cpp's own count (whole block bytes,
fp16 super-scales and packed sub-scales included, :mod:`coalora.quant.gguf_types`), so a budget spent here
is the budget a ``.gguf`` file spends. Quantize and dequantize are :mod:`coalora.quant.gguf_kernels`, whose
bytes are llama.cpp's block layouts and whose decoder equals llama.cpp's bit for bit; the packed form is
those bytes as one uint8 part.

K-quants tile rows in 256-weight super-blocks, so whether a type fits depends on the matrix's row length
(its last dimension), which an option alone does not know: :meth:`GGUFFamily.allowed` answers it for the
allocator, and :meth:`GGUFFamily.error_table` puts +inf where a type does not fit, so no minimiser can pick
it. The family is registered by importing this module (the ``coalora.quant`` package does). Runs train
with it (``model.code_family: gguf``): :class:`~coalora.quant.qconfig.ConfigSpace` gives each target only the
types its rows allow, the mapper and the search encode an option as its one type index, and artifacts hold
each matrix as its block bytes (one ``blocks`` part). Rounding is llama.cpp's own (``gptq`` is refused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from coalora.errors import CoaloraError
from coalora.quant import gguf_kernels
from coalora.quant.error_table import check_weighting
from coalora.quant.families import PartSpec, register_family
from coalora.quant.gguf_types import GGUF_TYPES, GGUFType, row_length_error

#: the family's types in index order: by bits per weight, a 32-weight type before a K-quant of equal bits,
#: so an option's integer index never decreases as its cost grows
TYPE_NAMES: tuple[str, ...] = tuple(
    t.name for t in sorted(GGUF_TYPES.values(), key=lambda t: (t.bits_per_weight, t.block_size))
)
#: bits per weight in index order: the one table both the scalar and the vectorised cost read
TYPE_BITS: tuple[float, ...] = tuple(GGUF_TYPES[n].bits_per_weight for n in TYPE_NAMES)
_INDEX: dict[str, int] = {name: i for i, name in enumerate(TYPE_NAMES)}
#: the one field of an option and its choices in index order (what the mapper embeds and the search moves)
FIELD_CHOICES: dict[str, tuple] = {"type": TYPE_NAMES}


@dataclass(frozen=True)
class GGUFOption:
    """One llama.cpp block type for a whole matrix; the name is case-insensitive, stored upper-case."""

    type: str

    def __post_init__(self) -> None:
        name = str(self.type).upper()
        if name not in _INDEX:
            raise CoaloraError(f"unknown gguf option type '{self.type}'; use one of: {', '.join(TYPE_NAMES)}")
        object.__setattr__(self, "type", name)

    @property
    def gguf_type(self) -> GGUFType:
        return GGUF_TYPES[self.type]

    @property
    def bits(self) -> float:
        """Bits per weight as llama.cpp counts them."""
        return self.gguf_type.bits_per_weight

    @property
    def storage_bits(self) -> float:
        """:attr:`bits` under the name the blocked options use (what budgets and caches read)."""
        return self.bits

    def to_dict(self) -> dict:
        """The JSON form a qconfig file holds: ``{"type": "Q4_K"}``."""
        return {"type": self.type}

    @classmethod
    def from_dict(cls, data: object, where: str = "option") -> GGUFOption:
        """Build from a qconfig file's ``{"type": ...}`` mapping, with one-line errors."""
        if not isinstance(data, dict) or set(data) != {"type"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise CoaloraError(
                f"{where} must be a mapping with the one field 'type' (a gguf option, e.g. "
                f'{{"type": "Q4_K"}}); got {got}'
            )
        try:
            return cls(str(data["type"]))
        except CoaloraError as err:
            raise CoaloraError(f"{where}: {err}") from None

    @property
    def indices(self) -> tuple[int, ...]:
        return (_INDEX[self.type],)

    def short(self) -> str:
        """The name, as table hashes and logs write an option."""
        return self.type


@dataclass
class GGUFPacked:
    """A matrix in one llama.cpp block type: its rows' block bytes exactly as a ``.gguf`` file holds them."""

    shape: tuple[int, ...]
    option: GGUFOption
    blocks: torch.Tensor  # flat uint8, numel / block_size * type_size bytes
    family: str = "gguf"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def padded_numel(self) -> int:
        """Elements :meth:`dequantize` writes (rows are whole blocks, so no padding)."""
        return self.numel

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors by part name (the family's part-schema order)."""
        return {"blocks": self.blocks}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 weights of :attr:`shape`, as llama.cpp's ``dequantize_row_*`` computes them.

        ``out``: a contiguous float32 buffer of at least :attr:`numel` elements on the bytes' device to
        write into (the result is then a view of it), as :meth:`PackedTensor.dequantize` takes one.
        """
        weights = gguf_kernels.dequantize(self.blocks, self.option.type, self.shape)
        if out is None:
            return weights
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < self.numel:
            raise CoaloraError(
                f"dequantize out= needs a contiguous float32 buffer of at least {self.numel} elements; "
                f"got {out.numel()} {str(out.dtype).removeprefix('torch.')}"
            )
        view = out.view(-1)[: self.numel].view(self.shape)
        view.copy_(weights)
        return view


def _option(option: GGUFOption | str) -> GGUFOption:
    return option if isinstance(option, GGUFOption) else GGUFOption(option)


class GGUFFamily:
    """llama.cpp's block types as a code family (see the module docstring); :data:`GGUF` is the instance."""

    name = "gguf"
    field_choices: dict[str, tuple] = FIELD_CHOICES
    part_names: tuple[str, ...] = ("blocks",)
    trains = True
    #: llama.cpp's quantizers choose each block's scales and codes themselves: no GPTQ rounding
    gptq_rounding = False

    def __repr__(self) -> str:
        return "GGUFFamily('gguf')"

    # -- option schema and encoding ------------------------------------------------------------------------
    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(self.field_choices)

    @property
    def field_sizes(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.field_choices.values())

    @property
    def option_space(self) -> tuple[GGUFOption, ...]:
        return tuple(GGUFOption(n) for n in TYPE_NAMES)

    def encode(self, option: GGUFOption) -> tuple[int, ...]:
        return _option(option).indices

    def option_from_dict(self, data: object, where: str = "option") -> GGUFOption:
        return GGUFOption.from_dict(data, where)

    def decode(self, indices: Sequence[int]) -> GGUFOption:
        values = [int(i) for i in indices]
        if len(values) != 1 or not 0 <= values[0] < len(TYPE_NAMES):
            raise CoaloraError(f"a gguf option is one index in 0..{len(TYPE_NAMES) - 1}, got {values}")
        return GGUFOption(TYPE_NAMES[values[0]])

    # -- cost, fit and stored parts ------------------------------------------------------------------------
    def bits_per_weight(self, option: GGUFOption) -> float:
        return TYPE_BITS[_option(option).indices[0]]

    def bits_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Vectorised :meth:`bits_per_weight` for (..., 1) integer indices (float64, from the same table)."""
        table = torch.tensor(TYPE_BITS, dtype=torch.float64, device=indices.device)
        return table[indices.long()[..., 0]]

    def allowed(self, option: GGUFOption, row_length: int) -> bool:
        """Whether ``option``'s blocks tile rows of ``row_length`` weights (K-quants: multiples of 256)."""
        return row_length_error(_option(option).type, int(row_length)) is None

    def allowed_options(self, row_length: int) -> tuple[GGUFOption, ...]:
        """The options :meth:`allowed` for rows of ``row_length``, in index order."""
        return tuple(o for o in self.option_space if self.allowed(o, row_length))

    def part_schema(self, option: GGUFOption, numel: int) -> dict[str, PartSpec]:
        """One uint8 part of whole blocks; the row check needs the shape, so :meth:`quantize` makes it."""
        t = _option(option).gguf_type
        if numel <= 0 or numel % t.block_size:
            raise CoaloraError(
                f"gguf {t.name} stores whole blocks of {t.block_size} weights; {numel} weights are not"
            )
        return {"blocks": PartSpec(torch.uint8, numel // t.block_size * t.type_size)}

    def from_parts(
        self, shape: tuple[int, ...], option: GGUFOption, parts: dict[str, torch.Tensor]
    ) -> GGUFPacked:
        return GGUFPacked(tuple(shape), _option(option), parts["blocks"])

    def codebook(self, bits: int) -> torch.Tensor:
        raise CoaloraError("the gguf family has no codebook: each block type has its own grid; use nf or int")

    # -- kernels ---------------------------------------------------------------------------------------------
    def quantize(
        self, weight: torch.Tensor, option: GGUFOption, absmax: torch.Tensor | None = None
    ) -> GGUFPacked:
        """``weight``'s rows (its last dimension) in ``option``'s blocks; ``absmax`` does not apply."""
        if absmax is not None:
            raise CoaloraError("gguf block types choose their own scales; quantize without absmax")
        option = _option(option)
        data = gguf_kernels.quantize(weight, option.type)
        return GGUFPacked(tuple(weight.shape), option, data.reshape(-1))

    def fake_quantize(
        self, weight: torch.Tensor, option: GGUFOption, absmax: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.quantize(weight, option, absmax).dequantize()

    def quantize_both(
        self, weight: torch.Tensor, option: GGUFOption, absmax: torch.Tensor | None = None
    ) -> tuple[GGUFPacked, torch.Tensor]:
        packed = self.quantize(weight, option, absmax)
        return packed, packed.dequantize()

    def dequantize(self, packed: GGUFPacked, out: torch.Tensor | None = None) -> torch.Tensor:
        return packed.dequantize(out)

    def error_table(
        self,
        weights: dict[str, torch.Tensor],
        options: Sequence[GGUFOption],
        fisher: dict[str, torch.Tensor] | None = None,
        hessians: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(matrices, options) float64 squared errors, defined as the blocked families' tables define them.

        Entry (i, c) is sum(F_i * E²) (F = 1 without a Fisher) or, with ``hessians``, tr(E H_i Eᵀ) for the
        symmetric part of H_i, where E = W_i - dequantize(quantize(W_i, c)); +inf where c does not tile
        the matrix's rows, so a minimiser never assigns it. Each type is encoded once per matrix.
        """
        check_weighting(weights, fisher, hessians)
        chosen = [_option(o) for o in options]
        table = torch.full((len(weights), len(chosen)), torch.inf, dtype=torch.float64)
        with torch.no_grad():
            for i, (name, weight) in enumerate(weights.items()):
                w = weight.detach().float()
                row_length = int(w.shape[-1]) if w.dim() else 0
                importance = None if fisher is None else fisher[name].to(w.device, torch.float64)
                h = None
                if hessians is not None:
                    h = hessians[name].to(w.device, torch.float64)
                    h = (h + h.T) / 2
                errors: dict[str, float] = {}
                for k, option in enumerate(chosen):
                    if not self.allowed(option, row_length):
                        continue
                    if option.type not in errors:
                        residual = (w - self.fake_quantize(w, option)).double()
                        errors[option.type] = _weighted_error(residual, importance, h)
                    table[i, k] = errors[option.type]
        return table


def _weighted_error(
    residual: torch.Tensor, fisher: torch.Tensor | None, hessian: torch.Tensor | None
) -> float:
    """sum(F * E²), sum(E²) without F, or tr(E H Eᵀ) with H, in float64."""
    if hessian is not None:
        return float(((residual @ hessian) * residual).sum())
    squares = residual.square()
    return float(squares.sum() if fisher is None else (squares * fisher).sum())


GGUF = GGUFFamily()
register_family(GGUF)
