"""A loaded artifact as a ready model: the Hugging Face classifier rebuilt from ``config.json`` with the
dequantized packed weights and the adapter as a separate LoRA (or merged), and ``predict`` on raw text."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from coalora.deploy.layout import REEXPORT, Artifact
from coalora.deploy.reader import read_artifact
from coalora.errors import CoaloraError
from coalora.nn.lora import LoRALinear
from coalora.quant.qconfig import QConfig
from coalora.quant.targets import discover_targets
from coalora.utils import intra_op_threads, quiet_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def plain_model(artifact: Artifact) -> PreTrainedModel:
    """The HF classifier from the artifact's config with dequantized targets (no adapter), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_config(artifact.hf_config)
    state = dict(artifact.full_precision)
    with intra_op_threads(1):
        for name, packed in artifact.packed.items():
            state[f"{name}.weight"] = packed.dequantize()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        missing = result.missing_keys
        raise CoaloraError(f"artifact misses tensor '{missing[0]}' ({len(missing)} missing); {REEXPORT}")
    if result.unexpected_keys:
        raise CoaloraError(f"artifact holds unknown tensor '{result.unexpected_keys[0]}'; {REEXPORT}")
    return model.eval()


def assemble(artifact: Artifact, merge: bool = False) -> nn.Module:
    """The HF classifier with dequantized target weights and the adapter (kept, or merged if asked)."""
    model = plain_model(artifact)
    names = [t.name for t in discover_targets(model)]
    if names != list(artifact.adapter):
        raise CoaloraError(
            f"the backbone in config.json does not have the artifact's target matrices; {REEXPORT}"
        )
    scaling = float(artifact.metadata["lora_scaling"])
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear.frozen(getattr(parent, child), *artifact.adapter[name], scaling)
        setattr(parent, child, layer.merged() if merge else layer)
    return model.requires_grad_(False).eval()


def predict_texts(
    logits_fn: Callable[[dict], torch.Tensor],
    tokenizer: Any,
    texts: Sequence[str | tuple[str, str]],
    label_names: Sequence[str],
    device: torch.device,
    batch_size: int = 32,
    max_length: int = 128,
) -> list[dict]:
    """Labels and probabilities (classification) or scores (regression) for raw texts or text pairs."""
    texts = [texts] if isinstance(texts, str) else texts
    results: list[dict] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        pairs = [t if isinstance(t, (tuple, list)) else (t,) for t in chunk]
        if len({len(p) for p in pairs}) != 1:
            raise CoaloraError("mix of single texts and text pairs in one call; pass one kind")
        columns = [list(col) for col in zip(*pairs)]
        batch = tokenizer(*columns, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        logits = logits_fn({k: v.to(device) for k, v in batch.items()}).float().cpu()
        if not label_names:
            results += [{"score": float(v)} for v in logits.reshape(len(chunk), -1)[:, 0]]
            continue
        probabilities = logits.softmax(dim=-1)
        for row in probabilities:
            best = int(row.argmax())
            results.append(
                {
                    "label": label_names[best],
                    "probability": float(row[best]),
                    "probabilities": {n: float(p) for n, p in zip(label_names, row)},
                }
            )
    return results


class DeployedModel(nn.Module):
    """A loaded artifact: the HF classifier, its tokenizer and metadata; ``predict`` works on raw text."""

    def __init__(self, model: nn.Module, tokenizer: Any, metadata: dict, qconfig: QConfig | None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.metadata = metadata
        self.qconfig = qconfig

    @property
    def label_names(self) -> list[str]:
        return list(self.metadata.get("label_names", []))

    @property
    def avg_bits(self) -> float:
        return float(self.metadata["avg_bits"])

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs).logits

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        return self(**batch)

    def predict(
        self, texts: Sequence[str | tuple[str, str]], batch_size: int = 32, max_length: int = 128
    ) -> list[dict]:
        device = next(self.model.parameters()).device
        return predict_texts(
            self.logits, self.tokenizer, texts, self.label_names, device, batch_size, max_length
        )


def load(folder: str | os.PathLike, merge: bool = False, verify: bool = True) -> DeployedModel:
    """Load an artifact written by ``coalora adapt`` as a ready model (no network, no checkpoint).

    The target weights are the dequantized packed weights; the folded adapter stays a separate LoRA
    (exactly the training computation) unless ``merge`` folds it into the weights, which leaves a plain
    Hugging Face model. ``verify`` checks every file's SHA-256 as well as its size.
    """
    artifact = read_artifact(folder, verify)
    model = assemble(artifact, merge)
    return DeployedModel(model, artifact.tokenizer, artifact.metadata, artifact.qconfig)
