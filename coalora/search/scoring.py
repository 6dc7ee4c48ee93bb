"""f1 of one configuration: the model's mean task loss on the search split's batches, in eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from coalora.quant.qconfig import QConfig
from coalora.tasks.base import CoALoRATask


def mean_loss(module: CoALoRATask, config: QConfig, batches: list[dict]) -> float:
    """Example-weighted mean task loss of ``module`` under ``config`` over ``batches`` (no grad)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            size = module.batch_size(batch)
            total += float(module.batch_loss(batch, config)) * size
            count += size
    return total / max(count, 1)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for scoring; afterwards every submodule gets back its own mode (frozen parts included)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
