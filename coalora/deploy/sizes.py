"""Exact byte sizes of packed weights and of an artifact's parts (without building anything)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from coalora.deploy.layout import Artifact, full_precision_state
from coalora.quant.families import get_family
from coalora.quant.options import QuantOption
from coalora.quant.qconfig import ConfigSpace, QConfig

if TYPE_CHECKING:
    from coalora.tasks.base import CoALoRATask


def packed_layout(option: QuantOption, numel: int, family: str = "nf") -> dict[str, tuple[torch.dtype, int]]:
    """Dtype and element count of each tensor :func:`quantize` stores for ``numel`` weights: the family's
    part schema (:meth:`~coalora.quant.families.CodeFamily.part_schema`), in its part order."""
    parts = get_family(family).part_schema(option, numel)
    return {name: (part.dtype, part.count) for name, part in parts.items()}


def packed_nbytes(option: QuantOption, numel: int, family: str = "nf") -> int:
    """Exact bytes :func:`quantize` stores for ``numel`` weights (every part of the family's schema)."""
    return sum(part.nbytes for part in get_family(family).part_schema(option, numel).values())


def quantized_nbytes(space: ConfigSpace, config: QConfig) -> int:
    family = space.family_name
    return sum(packed_nbytes(config.matrices[t.name], t.numel, family) for t in space.targets)


def fixed_nbytes(module: CoALoRATask) -> int:
    """Bytes of everything but the quantized weights: full-precision parts and the folded adapter."""
    full = sum(t.numel() * t.element_size() for t in full_precision_state(module, quantized=True).values())
    adapter = sum(
        (layer.lora_A.numel() + layer.lora_B.numel()) * layer.lora_A.element_size()
        for layer in module.model.layers
    )
    return full + adapter


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def part_sizes(artifact: Artifact, head_names: Sequence[str]) -> dict[str, int]:
    """Bytes of each part of the weights (tensor payloads; file headers excluded).

    Target weights are ``quantized`` (packed), or for fp checkpoints ``unquantized_targets``.
    """
    head = set(head_names)
    targets = {f"{name}.weight" for name in artifact.adapter}
    sizes = dict.fromkeys(("quantized", "adapter", "embeddings", "head", "other_full_precision"), 0)
    if not artifact.packed:
        sizes["unquantized_targets"] = 0
    sizes["quantized"] = sum(p.nbytes for p in artifact.packed.values())
    sizes["adapter"] = _nbytes([t for pair in artifact.adapter.values() for t in pair])
    for name, tensor in artifact.full_precision.items():
        part = "other_full_precision"
        if name in targets:
            part = "unquantized_targets"
        elif name in head:
            part = "head"
        elif "embed" in name:
            part = "embeddings"
        sizes[part] += tensor.numel() * tensor.element_size()
    sizes["weights"] = sum(sizes.values())
    return sizes
