"""The matrices that get quantized: found from the model itself (SPEC §2.1), described, fingerprinted.

The repeated transformer blocks are the longest ``nn.ModuleList`` of identical modules, and every
``nn.Linear`` inside a block is a target. Its module type is its name relative to the block
(``attention.self.query``, ``mlp.down_proj``), so attention-output and FFN-output matrices get distinct
types, unlike the authors' suffix parser. Pure torch: no Hugging Face loading here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from coalora.errors import CoaloraError


@dataclass(frozen=True)
class TargetMatrix:
    """One quantized weight matrix: where it lives and what the mapper needs to know about it."""

    name: str  # full module name in the model, e.g. bert.encoder.layer.0.attention.self.query
    module_type: str  # name relative to its block, e.g. attention.self.query
    block_index: int
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def _find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise CoaloraError(
            f"found no repeated transformer blocks with Linear layers in {type(model).__name__}; "
            "coalora supports BERT/RoBERTa encoders and LLaMA/Qwen-style decoders"
        )
    return best


def discover_targets(model: nn.Module) -> list[TargetMatrix]:
    """Every ``nn.Linear`` inside the model's repeated blocks, in module order."""
    prefix, blocks = _find_block_list(model)
    targets = []
    for index, block in enumerate(blocks):
        for rel, module in block.named_modules():
            if isinstance(module, nn.Linear):
                targets.append(
                    TargetMatrix(
                        name=f"{prefix}.{index}.{rel}",
                        module_type=rel,
                        block_index=index,
                        out_features=module.out_features,
                        in_features=module.in_features,
                    )
                )
    return targets


def module_types(targets: list[TargetMatrix]) -> list[str]:
    """Distinct module types in first-seen order (the mapper's type vocabulary)."""
    return list(dict.fromkeys(t.module_type for t in targets))


def target_weights(model: nn.Module, targets: list[TargetMatrix]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {t.name: modules[t.name].weight.detach() for t in targets}


def weights_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """A short hash of the target weights, used to key caches (error tables) and to match checkpoints."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(w.shape)).encode())
        digest.update(w.numpy().tobytes())
    return digest.hexdigest()[:16]
