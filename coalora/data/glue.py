"""GLUE tasks: what each task looks like (fields, labels, splits) and its metrics.

Rows are plain dicts keyed by the Hugging Face ``nyu-mll/glue`` field names (``sentence``, ``premise`` ...)
plus an int ``label`` (a float for STS-B), whichever layout they came from; :mod:`coalora.data.glue_files`
reads them, so the rest of the project never sees a file format.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryMatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from coalora.errors import CoaloraError

Row = dict[str, str | int | float]

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class OriginalLayout:
    """Where a task's text and label sit in the original GLUE download."""

    folder: str  # folder name in glue_data/, e.g. "SST-2"
    text_columns: tuple[str, ...]  # header names, in the order of the task's HF text fields
    label_column: str
    label_last: bool = False  # STS-B/MNLI: rows may carry extra tabs, the label is always the last field
    names: tuple[str, ...] = ()  # column names of a headerless file (CoLA)


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: its fields, labels, splits and metrics."""

    name: str
    text_fields: tuple[str, ...]  # HF field names, one or two
    num_labels: int  # 1 means regression (STS-B)
    label_names: tuple[str, ...]  # HF label names in id order; empty for regression
    metrics: tuple[str, ...]  # keys of glue_metrics(); the first is not necessarily the main one
    main_metric: str
    original: OriginalLayout
    dev_split: str = "dev"
    extra_dev_splits: tuple[str, ...] = field(default=())

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return (self.dev_split, *self.extra_dev_splits)


_ENTAIL2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "cola",
            ("sentence",),
            2,
            ("unacceptable", "acceptable"),
            ("mcc",),
            "mcc",
            OriginalLayout(
                "CoLA", ("sentence",), "label", names=("source", "label", "original_label", "sentence")
            ),
        ),
        TaskSpec(
            "sst2",
            ("sentence",),
            2,
            ("negative", "positive"),
            ("accuracy",),
            "accuracy",
            OriginalLayout("SST-2", ("sentence",), "label"),
        ),
        TaskSpec(
            "mrpc",
            ("sentence1", "sentence2"),
            2,
            ("not_equivalent", "equivalent"),
            ("f1", "accuracy"),
            "accuracy",
            OriginalLayout("MRPC", ("#1 String", "#2 String"), "Quality"),
        ),
        TaskSpec(
            "qqp",
            ("question1", "question2"),
            2,
            ("not_duplicate", "duplicate"),
            ("f1", "accuracy"),
            "accuracy",
            OriginalLayout("QQP", ("question1", "question2"), "is_duplicate"),
        ),
        TaskSpec(
            "stsb",
            ("sentence1", "sentence2"),
            1,
            (),
            ("pearson", "spearman"),
            "pearson",
            OriginalLayout("STS-B", ("sentence1", "sentence2"), "score", label_last=True),
        ),
        TaskSpec(
            "mnli",
            ("premise", "hypothesis"),
            3,
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            OriginalLayout("MNLI", ("sentence1", "sentence2"), "gold_label", label_last=True),
            dev_split="dev_matched",
            extra_dev_splits=("dev_mismatched",),
        ),
        TaskSpec(
            "qnli",
            ("question", "sentence"),
            2,
            _ENTAIL2,
            ("accuracy",),
            "accuracy",
            OriginalLayout("QNLI", ("question", "sentence"), "label"),
        ),
        TaskSpec(
            "rte",
            ("sentence1", "sentence2"),
            2,
            _ENTAIL2,
            ("accuracy",),
            "accuracy",
            OriginalLayout("RTE", ("sentence1", "sentence2"), "label"),
        ),
        TaskSpec(
            "wnli",
            ("sentence1", "sentence2"),
            2,
            ("not_entailment", "entailment"),
            ("accuracy",),
            "accuracy",
            OriginalLayout("WNLI", ("sentence1", "sentence2"), "label"),
        ),
    )
}

#: our split name -> the HF hub split name (also accepted as a file stem and as a split name).
HUB_SPLITS: dict[str, str] = {
    "train": "train",
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


def get_task(name: str) -> TaskSpec:
    """The spec of a GLUE task; accepts HF names and original folder names (``SST-2``, ``STS-B``)."""
    key = name.strip().lower().replace("-", "")
    if key not in TASKS:
        raise CoaloraError(f"unknown GLUE task '{name}'; choose one of {', '.join(TASKS)}")
    return TASKS[key]


def main_metric(task: str) -> str:
    """The metric key a task is ranked by (MCC for CoLA, Pearson for STS-B, accuracy otherwise)."""
    return get_task(task).main_metric


def split_name(spec: TaskSpec, split: str) -> str:
    """Normalise a split name (HF names accepted), checking the task has it."""
    by_hub = {hub: ours for ours, hub in HUB_SPLITS.items()}
    ours = by_hub.get(split, split)
    if ours == "dev" and spec.dev_split != "dev":
        ours = spec.dev_split
    valid = ("train", *spec.eval_splits)
    if ours not in valid:
        raise CoaloraError(f"task '{spec.name}' has no split '{split}'; choose one of {', '.join(valid)}")
    return ours


def glue_metrics(task: str) -> MetricCollection:
    """The task's GLUE metrics, keyed ``accuracy``/``f1``/``mcc``/``pearson``/``spearman``.

    Feed class ids (scores for STS-B), not logits: :func:`predictions_from_logits` converts them.
    """
    spec = get_task(task)
    factories: dict[str, type[Metric]] = {
        "f1": BinaryF1Score,
        "mcc": BinaryMatthewsCorrCoef,
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    with warnings.catch_warnings():  # Spearman warns that it buffers every prediction: fine for GLUE dev sets
        warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
        metrics: dict[str, Metric | MetricCollection] = {
            key: MulticlassAccuracy(num_classes=spec.num_labels, average="micro")
            if key == "accuracy"
            else factories[key]()
            for key in spec.metrics
        }
    return MetricCollection(metrics)


def predictions_from_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    """What the metrics take: argmax class ids, or the single regression output for STS-B."""
    if get_task(task).is_regression:
        return logits.reshape(logits.shape[0], -1)[:, 0].float()
    return logits.argmax(dim=-1)
