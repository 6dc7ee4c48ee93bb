"""One set of evaluation metrics per evaluation configuration, for the task base class.

A task says what its metrics are (``new_metrics``) and what they are fed (``metric_inputs``); this mixin
keeps one set per configuration label, so every configuration is validated with its own accumulators.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MetricCollection


class ConfigurationMetrics:
    """Per-label metric sets; the class using it provides ``new_metrics`` and ``metric_inputs``."""

    metrics: nn.ModuleDict

    def new_metrics(self) -> MetricCollection:
        raise NotImplementedError

    def metric_inputs(self, outputs: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def configure_metrics(self, labels: list[str]) -> None:
        """One set of metrics per evaluation configuration label."""
        self.metrics = nn.ModuleDict({_metric_key(label): self.new_metrics() for label in labels})

    def _metrics_at(self, label: str) -> MetricCollection:
        metrics = self.metrics[_metric_key(label)]
        assert isinstance(metrics, MetricCollection)
        return metrics

    def update_metrics(self, label: str, outputs: torch.Tensor, batch: dict) -> None:
        """Accumulate one evaluation batch into the metrics of configuration ``label``."""
        self._metrics_at(label).update(*self.metric_inputs(outputs, batch))

    def compute_metrics(self, label: str) -> dict[str, torch.Tensor]:
        """The accumulated metrics of configuration ``label`` (and reset them)."""
        metrics = self._metrics_at(label)
        values = metrics.compute()
        metrics.reset()
        return values

    def epoch_metrics(self, labels: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Every label's accumulated metrics as ``name@label``, and each metric's mean over the labels
        (what the progress bar shows); the accumulators are reset."""
        per_label: dict[str, torch.Tensor] = {}
        means: dict[str, float] = {}
        for label in labels:
            for name, value in self.compute_metrics(label).items():
                per_label[f"{name}@{label}"] = value
                means[name] = means.get(name, 0.0) + float(value) / len(labels)
        return per_label, means


def _metric_key(label: str) -> str:
    """A ModuleDict key for a configuration label (no dots allowed there)."""
    return "at_" + label.replace(".", "_")
