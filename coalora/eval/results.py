"""Evaluating a task at one configuration, and the record of one (checkpoint, configuration) result."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch

from coalora.quant.qconfig import QConfig


@dataclass
class EvalResult:
    """One (checkpoint, configuration) evaluation."""

    run: str
    method: str
    label: str  # '3.0' for a budget, a file name for a qconfig, 'random-3', 'seen-5', 'fp'
    kind: str  # budget | qconfig | random | seen | own | fp
    avg_bits: float | None
    seen: bool
    metrics: dict[str, float] = field(default_factory=dict)
    rounding: str = "nearest"  # how the configuration's codes were chosen (nearest or gptq)
    code_family: str = "nf"  # the run's code family (its bits range scales the hypervolume)

    def row(self) -> dict:
        data = asdict(self)
        data.update(data.pop("metrics"))
        return data


@torch.no_grad()
def evaluate_config(module, loader: Iterable[dict], config: QConfig | None) -> dict[str, float]:
    """The task's own metrics (GLUE's, or perplexity) and mean loss of ``module`` under ``config``."""
    metrics = module.new_metrics()
    total, count = 0.0, 0
    device = next(module.parameters()).device
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = module(batch, config)
        size = module.batch_size(batch)
        total += float(module.loss(outputs, batch)) * size
        count += size
        metrics.update(*(t.cpu() for t in module.metric_inputs(outputs, batch)))
    values = {name: float(value) for name, value in metrics.compute().items()}
    values["loss"] = total / max(count, 1)
    return values
