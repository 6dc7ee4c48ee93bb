"""Code families: one object per way of quantizing a matrix, registered by name (issue #26 item 1).

A family owns everything that depends on how weights are coded: its option schema and the integer encoding
the mapper and the search use, bits per weight, quantize (weight -> packed parts), dequantize, the error-table
kernel and the part schema artifacts are written and checked by. Code elsewhere passes the family's name (a
string in checkpoints, hyperparameters and artifact metadata) and asks :func:`get_family` for the object, so
a new family is one class and one :func:`register_family` call instead of edits in five modules.

``nf`` (NormalFloat) and ``int`` (symmetric integer) are the built-in ones: the same blocked, double-quantized
scheme over two codebooks (:mod:`coalora.quant.families.blocked_codebook`, which registers them and which
the ``coalora.quant`` package imports). This module imports no other coalora module but the errors, so the
kernels that look a family up by name (:mod:`~coalora.quant.quantizer`, :mod:`~coalora.quant.codebooks`)
import it without a cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from coalora.errors import CoaloraError


@dataclass(frozen=True)
class PartSpec:
    """One stored tensor of a packed matrix: its dtype and element count, as artifacts hold it.

    ``exact_dtype``: the dtype is part of the format, so a model-wide ``.to(dtype)`` must not cast it.
    """

    dtype: torch.dtype
    count: int
    exact_dtype: bool = False

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


@runtime_checkable
class CodeFamily(Protocol):
    """What a code family provides; :class:`~coalora.quant.families.blocked_codebook.BlockedCodebookFamily`
    is the implementation ``nf`` and ``int`` share."""

    #: the name checkpoints, configs and artifact metadata store
    name: str
    #: field name -> its allowed values, in index order (the mapper's and the search's integer encoding)
    field_choices: dict[str, tuple]
    #: names of the packed parts, in the order artifacts store them
    part_names: tuple[str, ...]
    #: whether training, allocation and serving take it (a family without it is quantize/dequantize/cost
    #: only: runs refuse it up front)
    trains: bool
    #: whether ``rounding: gptq`` can choose its codes (GPTQ rounds onto the blocked codebook grid)
    gptq_rounding: bool

    @property
    def field_names(self) -> tuple[str, ...]: ...

    @property
    def field_sizes(self) -> tuple[int, ...]: ...

    @property
    def option_space(self) -> tuple[Any, ...]: ...

    def encode(self, option: Any) -> tuple[int, ...]: ...

    def option_from_dict(self, data: Any, where: str = "option") -> Any:
        """An option from its JSON form (a qconfig file's matrix entry); one-line errors otherwise."""
        ...

    def allowed(self, option: Any, row_length: int) -> bool:
        """Whether ``option`` can code a matrix whose rows hold ``row_length`` weights."""
        ...

    def from_parts(self, shape: tuple[int, ...], option: Any, parts: dict[str, torch.Tensor]) -> Any:
        """The packed form from its stored parts (named as :attr:`part_names`), as an artifact holds them."""
        ...

    def decode(self, indices: Sequence[int]) -> Any: ...

    def bits_per_weight(self, option: Any) -> float: ...

    def bits_from_indices(self, indices: torch.Tensor) -> torch.Tensor: ...

    def part_schema(self, option: Any, numel: int) -> dict[str, PartSpec]: ...

    def codebook(self, bits: int) -> torch.Tensor: ...

    # packed forms are typed Any here: this module imports no kernel (see the module docstring); the
    # built-in families return coalora.quant.quantizer.PackedTensor
    def quantize(self, weight: torch.Tensor, option: Any, absmax: torch.Tensor | None = None) -> Any: ...

    def fake_quantize(
        self, weight: torch.Tensor, option: Any, absmax: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def quantize_both(
        self, weight: torch.Tensor, option: Any, absmax: torch.Tensor | None = None
    ) -> tuple[Any, torch.Tensor]: ...

    def dequantize(self, packed: Any, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def error_table(
        self,
        weights: dict[str, torch.Tensor],
        options: Sequence[Any],
        fisher: dict[str, torch.Tensor] | None = None,
        hessians: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor: ...


_REGISTRY: dict[str, CodeFamily] = {}
#: families whose module registers them on first use (name -> module): llama.cpp's block types cost a
#: process that serves an nf/int artifact ~10 ms of imports it never needs
_ON_FIRST_USE: dict[str, str] = {"gguf": "coalora.quant.families.gguf_family"}


def _import_on_first_use(name: str | None = None) -> None:
    """Import the module that registers ``name`` (every such module if None), once."""
    for lazy in list(_ON_FIRST_USE) if name is None else [name]:
        module = _ON_FIRST_USE.pop(lazy, None)
        if module is not None:
            importlib.import_module(module)


#: the families every install has, registered by :mod:`coalora.quant.families.blocked_codebook` (which the
#: ``coalora.quant`` package imports first, so they are there before any lookup)
BUILTIN_NAMES: tuple[str, ...] = ("nf", "int")


def register_family(family: CodeFamily, replace: bool = False) -> CodeFamily:
    """Make ``family`` available by its name; an existing name is refused unless ``replace``.

    A built-in family is never replaced: checkpoints, error-table caches and artifacts name ``nf`` and
    ``int`` and mean these codebooks. Lookups built from a codebook are cached by family name
    (:meth:`~coalora.quant.codebooks.NearestLookup.build`), so give a changed codebook a new name.
    """
    name = getattr(family, "name", None)
    if not isinstance(name, str) or not name:
        raise CoaloraError(f"a code family needs a non-empty string name, got {name!r}")
    if name in BUILTIN_NAMES and name in _REGISTRY and _REGISTRY[name] is not family:
        raise CoaloraError(f"code family '{name}' is built in and cannot be replaced; register another name")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not family:
        raise CoaloraError(
            f"code family '{name}' is already registered; pick another name or pass replace=True"
        )
    _REGISTRY[name] = family
    return family


def unregister_family(name: str) -> None:
    """Forget a registered family (tests register toy ones); the built-in ones cannot be removed."""
    if name in BUILTIN_NAMES:
        raise CoaloraError(f"code family '{name}' is built in and cannot be unregistered")
    _REGISTRY.pop(name, None)


def get_family(name: str) -> CodeFamily:
    """The family registered as ``name``; a one-line error naming the registered ones otherwise."""
    if name not in _REGISTRY:
        _import_on_first_use(name)
    family = _REGISTRY.get(name)
    if family is None:
        raise CoaloraError(f"unknown code family '{name}'; use one of: {', '.join(family_names())}")
    return family


def check_rounding_family(rounding: str, family: str, what: str = "model.rounding") -> None:
    """``gptq`` only with a family whose codes it can choose; a one-line refusal otherwise."""
    if rounding == "gptq" and not getattr(get_family(family), "gptq_rounding", False):
        raise CoaloraError(
            f"{what} gptq does not apply to code_family {family} (its types choose their own scales and "
            "grid; GPTQ rounds onto the nf/int codebooks); use rounding nearest, or code_family nf or int"
        )


def family_names(trainable: bool = False) -> tuple[str, ...]:
    """Names of every registered family, the built-in ones first (``trainable``: only those a run can
    train, allocate and serve with)."""
    _import_on_first_use()
    return tuple(name for name, family in _REGISTRY.items() if family.trains or not trainable)
