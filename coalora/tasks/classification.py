"""GLUE sequence classification (and STS-B regression): the encoder task of the paper's Table 2."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from coalora.data.glue import TaskSpec, get_task, glue_metrics, predictions_from_logits
from coalora.data.glue_datamodule import GLUEDataModule
from coalora.pretrained import load_classifier
from coalora.tasks.base import CoALoRATask

#: the GLUE data module's arguments that a checkpoint's saved data arguments may set
GLUE_ARGUMENTS = frozenset(inspect.signature(GLUEDataModule.__init__).parameters) - {"self"}


class ClassificationTask(CoALoRATask):
    """CoA-LoRA (or a baseline) on an ``AutoModelForSequenceClassification`` backbone for a GLUE task.

    Cross-entropy on the labels (mean squared error for STS-B), the task's GLUE metrics per evaluation
    configuration. Every other argument is :class:`~coalora.tasks.base.CoALoRATask`'s.
    """

    task_type = "classification"
    linked_arguments = ("model_name", "task", "seed")

    def __init__(self, task: str = "sst2", **kwargs: Any) -> None:
        """
        Args:
            task: the GLUE task (``sst2``, ``rte``, ``SST-2`` ...): its labels size the head.
            **kwargs: the base class's arguments (method, rank, budgets, ...).
        """
        get_task(task)  # fail on a typo before the backbone loads
        super().__init__(**kwargs)

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.hparams.task)

    def load_backbone(self) -> nn.Module:
        return load_classifier(self.hparams.model_name, num_labels=self.spec.num_labels)

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        if self.spec.is_regression:
            return nn.functional.mse_loss(outputs.view(-1).float(), labels.float())
        return nn.functional.cross_entropy(outputs.float(), labels)

    def distillation_loss(self, outputs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL(teacher ‖ student) of the class distributions (squared error of the score for STS-B)."""
        if self.spec.is_regression:
            return nn.functional.mse_loss(outputs.float(), teacher.float())
        target = teacher.float().log_softmax(dim=-1)
        return nn.functional.kl_div(
            outputs.float().log_softmax(dim=-1), target, log_target=True, reduction="batchmean"
        )

    def new_metrics(self) -> MetricCollection:
        return glue_metrics(self.hparams.task)

    def metric_inputs(self, outputs: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return predictions_from_logits(outputs, self.hparams.task), batch["labels"]

    def data_module(self, **overrides: Any) -> GLUEDataModule:
        hp = self.hparams
        known = {k: v for k, v in overrides.items() if k in GLUE_ARGUMENTS}
        return GLUEDataModule(**{**known, "task": hp.task, "model_name": hp.model_name, "seed": hp.seed})

    @property
    def evaluation_name(self) -> str:
        return self.hparams.task

    @property
    def main_metric(self) -> str:
        return self.spec.main_metric

    @property
    def label_names(self) -> list[str]:
        return list(self.spec.label_names)
