"""The one LoRA layer family, for training and deployment: y = x·Ŵᵀ + b + s·B·M·A·x (SPEC §3).

:class:`LoRALinear` keeps the base weight and bias frozen. For training, the model sets the active
dequantized weight Ŵ_C and the mapper's r×r adjustment D (M = I + D) before each forward; with neither set
the layer is plain LoRA on the full-precision base (the fp ceiling). h + D·h is formed in fp32: under bf16
autocast a diagonal adjustment below ~0.004 would otherwise round away (1 + 0.0039 is 1.0 in bf16). For
deployment, :meth:`LoRALinear.frozen` builds the same layer around a dequantized weight with the folded
B·M as its B, so it needs no mapper.

Where the frozen weight comes from is a backend, as in peft's per-backend dispatch: :func:`lora_layer`
picks the class registered for a backend name in :data:`LAYER_BACKENDS` (``dense``: a full tensor;
``packed``: :class:`~coalora.nn.packed_lora.PackedLoRALinear`, the low-bit codes dequantized inside
``forward`` by its override of :meth:`LoRALinear.base_weight`, registered when its module is imported).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from coalora.errors import CoaloraError


class LoRALinear(nn.Module):
    """A frozen linear map plus a (configuration-aware) LoRA path; parameter names match ``nn.Linear``'s
    (``weight``, ``bias``) plus ``lora_A`` (r×in) and ``lora_B`` (out×r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """A fresh adapter on a copy of ``base``: A Kaiming-uniform, B zero (training starts at ``base``)."""
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = (
            None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        )
        self.rank = rank
        self.scaling = alpha / rank
        # fp32 master weights whatever the base's dtype: an AdamW update at lr 1e-4 is about one bf16 ulp
        # of a LoRA entry, so bf16 parameters would lose much of every step (issue #23); cast in forward
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        #: dequantized weight of the active configuration (None: the stored weight); not saved
        self.active_weight: torch.Tensor | None = None
        #: the mapper's r×r adjustment D for the active configuration, M = I + D (None: M = I)
        self.adjustment: torch.Tensor | None = None

    @classmethod
    def frozen(
        cls, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
    ) -> LoRALinear:
        """A deployment layer: ``base``'s weight (shared, not copied) and a fixed adapter (B already B·M)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = base.in_features, base.out_features
        layer.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        layer.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        layer.rank = int(lora_A.shape[0])
        layer.scaling = scaling
        layer.lora_A = nn.Parameter(lora_A.to(base.weight), requires_grad=False)
        layer.lora_B = nn.Parameter(lora_B.to(base.weight), requires_grad=False)
        layer.dropout = nn.Identity()
        layer.active_weight = None
        layer.adjustment = None
        return layer

    def base_weight(self) -> torch.Tensor:
        """The frozen path's weight: the active dequantized one if set, else the stored one (a backend's
        override point)."""
        return self.weight if self.active_weight is None else self.active_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.base_weight())

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's output with ``weight`` as the frozen path's weight: a backend that makes a transient
        weight for one call (the packed one) passes it here rather than through :meth:`base_weight`."""
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)  # a weight cached in the autocast dtype, used outside autocast
        out = F.linear(x, weight, self.bias)
        hidden = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        if self.adjustment is not None:
            hidden = adjusted(hidden, self.adjustment)  # M·A·x per token
        return out + self.scaling * F.linear(hidden, self.lora_B.to(hidden.dtype))

    def folded_B(self, adjustment: torch.Tensor | None = None) -> torch.Tensor:
        """B·M = B + B·D: with it the layer is a plain LoRA for one configuration (the one fold, used for
        export). Formed in float32 whatever B's dtype, and never as B·(I + D), which rounds a small D away
        in bf16. Within one float32 ulp of forming it in float64 (MiniLM, random B and mapper: max
        1.5e-8), at an eighth of the time: torch's float64 products are slow on CPU."""
        if adjustment is None:
            return self.lora_B
        return fold_all([self], [adjustment])[0]

    def merged(self) -> nn.Linear:
        """A plain Linear with Ŵ + s·B·A (summed in float64 so merging adds no visible rounding)."""
        weight = self.base_weight()
        linear = nn.utils.skip_init(
            nn.Linear, self.in_features, self.out_features, bias=self.bias is not None
        )
        delta = self.folded_B(self.adjustment).double() @ self.lora_A.double()
        linear.weight = nn.Parameter((weight.double() + self.scaling * delta).to(weight.dtype), False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def fold_all(layers: Sequence[LoRALinear], adjustments: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """``[layer.folded_B(adjustment) ...]`` with one batched product per B shape (see
    :meth:`LoRALinear.folded_B`): MiniLM's 36 folds in ~1.1 ms rather than ~2.7 ms one by one."""
    folded: list[torch.Tensor | None] = [None] * len(layers)
    groups: dict[tuple, list[int]] = {}
    for i, (layer, adjustment) in enumerate(zip(layers, adjustments, strict=True)):
        if adjustment is None:
            folded[i] = layer.lora_B
        else:
            key = (tuple(layer.lora_B.shape), layer.lora_B.dtype, layer.lora_B.device)
            groups.setdefault(key, []).append(i)
    for indices in groups.values():
        dtype = torch.promote_types(layers[indices[0]].lora_B.dtype, torch.float32)  # float64 stays
        b = torch.stack([layers[i].lora_B.detach() for i in indices]).to(dtype)
        d = torch.stack([adjustments[i] for i in indices]).to(dtype)  # type: ignore[misc]
        out = (b + torch.bmm(b, d)).to(layers[indices[0]].lora_B.dtype)
        for j, i in enumerate(indices):
            folded[i] = out[j]
    return folded  # type: ignore[return-value]


def adjusted(hidden: torch.Tensor, adjustment: torch.Tensor) -> torch.Tensor:
    """M·h = h + D·h per token, formed in fp32 whatever the autocast dtype, returned in ``hidden``'s dtype.

    (Under autocast the next linear would cast an fp32 result to bf16 anyway; rounding each element of
    h + D·h keeps the adjustment in expectation, where rounding M = I + D to bf16 erases it outright.)
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h = hidden.float()
        return (h + F.linear(h, adjustment.float())).to(hidden.dtype)


#: backend name -> layer class; a backend for another weight storage registers its subclass here
LAYER_BACKENDS: dict[str, type[LoRALinear]] = {"dense": LoRALinear}

#: backends living in their own module (which imports this one, so it cannot be imported here up front):
#: imported, and so registered, the first time :func:`lora_layer` is asked for them
_BACKEND_MODULES = {"packed": "coalora.nn.packed_lora"}


def lora_layer(
    base: nn.Linear,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    backend: str = "dense",
    **options: Any,
) -> LoRALinear:
    """A fresh LoRA layer around ``base`` from the class registered for ``backend``; ``options`` go to
    that class (``packed`` needs ``option=QuantOption(...)``, the quantization its weight is stored in)."""
    if rank < 1:
        raise CoaloraError(f"LoRA rank must be >= 1, got {rank}")
    if backend not in LAYER_BACKENDS and backend in _BACKEND_MODULES:
        importlib.import_module(_BACKEND_MODULES[backend])
    layer_class = LAYER_BACKENDS.get(backend)
    if layer_class is None:
        known = ", ".join(dict.fromkeys([*LAYER_BACKENDS, *_BACKEND_MODULES]))
        raise CoaloraError(f"unknown LoRA layer backend '{backend}'; use one of: {known}")
    return layer_class(base, rank, alpha, dropout, **options)
