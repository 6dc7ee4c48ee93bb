"""The packed LoRA backend: serve a target matrix from its low-bit codes, not from a dequantized copy.

A dequantized fp32 target costs 32 bits per weight; its packed form costs ``option.storage_bits`` (3 bits
and a little for a 3-bit configuration). :class:`PackedLoRALinear` keeps the :class:`PackedTensor`'s parts
(bit-packed codes, bit-packed first-level scale codes, second-level scales, offset) as buffers and
dequantizes them inside ``forward``, so a full-size weight exists only while one layer runs and the model
at rest holds about what the artifact holds. Without autograd on the CPU (``predict``, ``generate``) that
weight is written into one buffer per thread that every layer reuses, the size of the largest target (up
to :data:`WORKSPACE_MAX_BYTES`): a fresh weight per layer would leave glibc holding several freed ones.
The folded adapter (A, B·M) stays the separate low-rank path of :class:`LoRALinear`, so the computation
is the dense deployment layer's, bit for bit: the transient weight is :meth:`PackedTensor.dequantize`'s,
whatever speed-ups that gets.

Registered as the ``packed`` backend of :data:`~coalora.nn.lora.LAYER_BACKENDS`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from torch import nn

from coalora.errors import CoaloraError
from coalora.nn.lora import LAYER_BACKENDS, LoRALinear
from coalora.quant.families import get_family
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import PackedTensor, quantize

#: the largest transient weight (bytes) an inference forward dequantizes into the reused buffer of
#: :func:`_workspace`; a larger one gets its own allocation, which glibc maps and unmaps anyway
WORKSPACE_MAX_BYTES = 32 << 20

_WORKSPACE = threading.local()


def _workspace(numel: int) -> torch.Tensor | None:
    """This thread's float32 buffer for an inference forward's transient CPU weight (grown as needed).

    A fresh weight per layer per call would make glibc keep several freed weights resident on its heap
    (6-7 MB after one MiniLM forward); one buffer reused by every layer holds only the largest.
    None where ``numel`` float32 values exceed :data:`WORKSPACE_MAX_BYTES`.
    """
    if numel * 4 > WORKSPACE_MAX_BYTES:
        return None
    buffer = getattr(_WORKSPACE, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACE.buffer = torch.empty(numel, dtype=torch.float32)
    return buffer


class PackedLoRALinear(LoRALinear):
    """A LoRA layer over a packed low-bit weight: one buffer per part of the code family's schema (``codes``,
    ``scale_codes``, ``scale2`` and ``offset`` for nf/int; ``blocks`` for gguf: the artifact's names and
    dtypes), parameters ``bias``, ``lora_A`` and ``lora_B``.

    There is no stored ``weight``: :meth:`base_weight` (and the read-only ``weight`` property, for code
    that inspects a linear layer's weight) dequantize a transient copy each time they are called.
    """

    codes: torch.Tensor
    scale_codes: torch.Tensor
    scale2: torch.Tensor
    offset: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        option: QuantOption | None = None,
        family: str = "nf",
    ) -> None:
        """A fresh adapter (A Kaiming-uniform, B zero, as :class:`LoRALinear`) over ``base``'s weight
        quantized under ``option``; what ``lora_layer(..., backend="packed", option=...)`` builds."""
        if option is None:
            raise CoaloraError(
                "the packed LoRA backend stores a quantized weight: pass option=QuantOption(...) "
                "(or build a deployment layer with PackedLoRALinear.from_packed)"
            )
        with torch.no_grad():
            packed = quantize(base.weight, option, family)
        dtype = base.weight.dtype
        # trainable adapters are fp32 master weights whatever the base's dtype (see LoRALinear)
        lora_A = torch.empty(rank, base.in_features, dtype=torch.float32, device=base.weight.device)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        lora_B = torch.zeros(base.out_features, rank, dtype=torch.float32, device=base.weight.device)
        bias = None if base.bias is None else base.bias.detach().clone()  # on a copy, as LoRALinear
        self.init_packed(packed, bias, lora_A, lora_B, alpha / rank, dtype, trainable=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_packed(
        cls,
        packed: PackedTensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        dtype: torch.dtype = torch.float32,
    ) -> PackedLoRALinear:
        """A deployment layer, the packed twin of :meth:`LoRALinear.frozen`: ``packed``'s tensors are
        held as they are (not copied), the adapter (B already B·M) is fixed. ``dtype`` is the dense
        layer's weight dtype (the model's): the adapter is cast to it and so is each transient weight."""
        if len(packed.shape) != 2:
            raise CoaloraError(f"a packed linear weight must be 2-D, got shape {packed.shape}")
        layer = cls.__new__(cls)
        layer.init_packed(packed, bias, lora_A, lora_B, scaling, dtype, trainable=False)
        return layer

    def init_packed(
        self,
        packed: PackedTensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        dtype: torch.dtype,
        trainable: bool,
    ) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = packed.shape
        if lora_A.shape[1] != self.in_features or lora_B.shape != (self.out_features, lora_A.shape[0]):
            raise CoaloraError(
                f"adapter shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)} do not fit a "
                f"{self.out_features}x{self.in_features} weight"
            )
        self.option, self.family = packed.option, packed.family
        for name, tensor in packed.parts().items():  # the family's part schema names the buffers
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)  # type: ignore[assignment]
        self.rank = int(lora_A.shape[0])
        self.scaling = scaling
        #: the dense weight's dtype (each transient dequantization's); a trainable adapter stays fp32
        self.weight_dtype = dtype
        adapter_dtype = torch.float32 if trainable else dtype
        self.lora_A = nn.Parameter(lora_A.detach().to(adapter_dtype), requires_grad=trainable)
        self.lora_B = nn.Parameter(lora_B.detach().to(adapter_dtype), requires_grad=trainable)
        self.dropout = nn.Identity()
        self.active_weight = None
        self.adjustment = None

    def packed(self) -> PackedTensor:
        """The held parts as a :class:`PackedTensor` (a view: nothing is copied)."""
        family = get_family(self.family)
        parts = {name: getattr(self, name) for name in family.part_names}
        return family.from_parts((self.out_features, self.in_features), self.option, parts)

    def _exact_dtype_parts(self) -> tuple[str, ...]:
        """Buffers a dtype cast must leave alone: the ``exact_dtype`` parts of the family's schema, whose
        dtype is part of the format (bf16 second-level scales rounded to fp16 by a model-wide ``.half()``
        would change every dequantized weight)."""
        schema = get_family(self.family).part_schema(self.option, self.out_features * self.in_features)
        return tuple(name for name, part in schema.items() if part.exact_dtype)

    def base_weight(self) -> torch.Tensor:
        """The active dequantized weight if training set one, else a transient dequantization of the
        packed parts (equal, bit for bit, to the dense path's weight), in the model's weight dtype."""
        if self.active_weight is not None:
            return self.active_weight
        return self.packed().dequantize().to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As :class:`LoRALinear`; without autograd on the CPU, the transient weight is dequantized into
        a buffer reused by every layer (no fresh allocation; it never leaves this call), else it is a
        fresh tensor, which autograd may keep for the backward pass."""
        if self.active_weight is not None or torch.is_grad_enabled() or self.lora_A.device.type != "cpu":
            return super().forward(x)
        packed = self.packed()
        buffer = _workspace(packed.padded_numel)
        if buffer is None:
            return super().forward(x)
        return self.forward_with(x, packed.dequantize(buffer).to(self.weight_dtype))

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """A transient dequantized weight (not stored: each read dequantizes again)."""
        return self.base_weight()

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the packed parts this layer holds (what replaces 4 bytes per weight)."""
        return self.packed().nbytes

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PackedLoRALinear:
        """Device moves reach every buffer; dtype casts skip the second-level scales and the offset.

        They travel as raw bytes (uint8 is never cast by ``.to(dtype)``, ``.half()`` or ``.float()``)
        and are viewed back in their own dtype afterwards.
        """
        kept = {name: getattr(self, name) for name in self._exact_dtype_parts()}
        for name, tensor in kept.items():
            self._buffers[name] = tensor.reshape(-1).contiguous().view(torch.uint8)
        try:
            super()._apply(fn, recurse)
            # a model-wide .half()/.to(dtype) moves the transient weights' dtype along with the model's
            self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        finally:
            for name, tensor in kept.items():
                moved = self._buffers[name]
                assert moved is not None
                self._buffers[name] = moved.view(tensor.dtype).reshape(tensor.shape)
        return self

    def extra_repr(self) -> str:
        option = self.option
        if not isinstance(option, QuantOption):  # a family of its own schema (gguf: the type's name)
            return f"{super().extra_repr()}, packed={option.short()} {self.family}"
        return (
            f"{super().extra_repr()}, packed={option.bits}-bit {self.family} "
            f"(scales {option.scale_bits}-bit/{option.block}, {option.scale2_dtype}/{option.block2})"
        )


LAYER_BACKENDS["packed"] = PackedLoRALinear
