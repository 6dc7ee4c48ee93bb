"""Start a run from another run's adapter: fine-tune at full precision first, then train for configurations.

A recipe of issue #24 (item 5): an ``fp`` run's LoRA factors (and task head) are where CoA-LoRA (or QLoRA,
or more fp steps) starts, instead of B = 0. Every trainable parameter of this run that the source
checkpoint also holds is copied before the first step; the rest (a mapper the source lacks) keeps its
initialisation, and the mapper's is near zero, so step 0 serves the source's adapter at every configuration.

The source must be a ``coalora fit`` checkpoint of the same backbone and rank: a mismatch is one line at
fit start, before any step. A resumed run (``ckpt_path``) already holds its own trained weights and is
left alone. The source's path and fingerprint go into this run's checkpoint (the callback's state).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from coalora.errors import CoaloraError
from coalora.tasks.base import CoALoRATask
from coalora.tasks.checkpoint import read_checkpoint

#: the LoRA factors every adapter has; a source without one of this run's is not the same adapter
LORA_SUFFIXES = (".lora_A", ".lora_B")


class AdapterWarmStart(L.Callback):
    """Copy ``checkpoint``'s trainable weights into this run before its first step.

    Args:
        checkpoint: a ``.ckpt`` written by ``coalora fit`` on the same backbone with the same ``rank``.
    """

    def __init__(self, checkpoint: str) -> None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():  # before any model is built: the whole read waits for fit start
            raise CoaloraError(
                f"warm-start checkpoint '{checkpoint}' does not exist; pass a .ckpt written by `coalora fit`"
            )
        self.checkpoint = str(path)
        self.copied: list[str] = []
        self.source_sha256 = ""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            rank_zero_info(f"warm start skipped: resuming from {trainer.ckpt_path}")
            return
        if not isinstance(pl_module, CoALoRATask):
            raise CoaloraError(f"AdapterWarmStart needs a coalora task, got {type(pl_module).__name__}")
        source = read_checkpoint(self.checkpoint)
        _check_same_adapter(source, pl_module, self.checkpoint)
        self.copied = copy_trainables(source["state_dict"], pl_module, self.checkpoint)
        self.source_sha256 = hashlib.sha256(Path(self.checkpoint).read_bytes()).hexdigest()[:16]
        rank_zero_info(f"warm start: {len(self.copied)} tensors from {self.checkpoint}")

    def state_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "sha256": self.source_sha256, "copied": len(self.copied)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.source_sha256 = state_dict.get("sha256", "")


def _check_same_adapter(source: dict, module: CoALoRATask, path: str) -> None:
    """The source must share this run's backbone weights and LoRA rank."""
    theirs = source["coalora"]["fingerprint"]
    if theirs != module.fingerprint:
        raise CoaloraError(
            f"warm-start checkpoint '{path}' was trained on another backbone (weights {theirs}, this model "
            f"{module.fingerprint}); pass a checkpoint of model_name {module.hparams.model_name}"
        )
    their_rank = source.get("hyper_parameters", {}).get("rank")
    if their_rank != module.hparams.rank:
        raise CoaloraError(
            f"warm-start checkpoint '{path}' has LoRA rank {their_rank}, this run {module.hparams.rank}; "
            f"set model.rank to {their_rank} or pass a rank-{module.hparams.rank} checkpoint"
        )


@torch.no_grad()
def copy_trainables(state: dict[str, torch.Tensor], module: torch.nn.Module, path: str = "") -> list[str]:
    """Copy every trainable parameter of ``module`` that ``state`` holds (in place, cast to the
    parameter's dtype: fp32 master weights stay fp32); returns the names copied.

    Every LoRA factor must be present with the same shape; other trainables (a mapper, a head the
    source trained differently) are copied when present and kept otherwise."""
    copied = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        value = state.get(name)
        if value is None:
            if name.endswith(LORA_SUFFIXES):
                raise CoaloraError(
                    f"warm-start checkpoint '{path}' has no '{name}'; it adapts other matrices "
                    "(pass a checkpoint with the same targets)"
                )
            continue
        if value.shape != param.shape:
            raise CoaloraError(
                f"warm-start checkpoint '{path}' holds '{name}' of shape {tuple(value.shape)}, this run "
                f"{tuple(param.shape)}; pass a checkpoint of the same model and rank"
            )
        param.copy_(value.to(param.dtype))
        copied.append(name)
    return copied
