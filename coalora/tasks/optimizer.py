"""AdamW over what a task trains, with the mapper in a parameter group of its own.

The mapper starts at D ≈ 0 and must learn a different adjustment for every configuration within the few
hundred steps a short run has, while the shared adapter only has to learn one; ``mapper_lr`` lets it move
faster (or slower) than the adapter without changing the adapter's schedule (issue #11 tried this).
"""

from __future__ import annotations

import torch

from coalora.nn.model import CoALoRAModel


def build_optimizer(
    model: CoALoRAModel, lr: float, weight_decay: float, mapper_lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW at ``lr``; the mapper's parameters at ``mapper_lr`` when it is set (None: the same ``lr``)."""
    trainable = model.trainable_parameters()
    if mapper_lr is None or model.mapper is None:
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    mapper_ids = {id(p) for p in model.mapper.parameters()}
    groups = [
        {"params": [p for p in trainable if id(p) not in mapper_ids], "lr": lr},
        {"params": [p for p in trainable if id(p) in mapper_ids], "lr": mapper_lr},
    ]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
