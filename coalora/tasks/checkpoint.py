"""The one checkpoint reader: a ``.ckpt`` written by ``coalora fit`` back to a task, on the CPU.

It loads with ``weights_only=True`` (a checkpoint from elsewhere cannot run code) and turns every way a
file can be wrong into one line that says what to pass instead.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

import coalora.tasks.causal_lm
import coalora.tasks.classification  # noqa: F401 - registers the task type that old checkpoints imply
from coalora.errors import CoaloraError
from coalora.tasks.base import TASK_TYPES, CoALoRATask
from coalora.utils import first_line, quiet_transformers

#: the task type of checkpoints written before task types were recorded
LEGACY_TASK = "classification"
WRITTEN_BY_FIT = "pass a .ckpt written by `coalora fit`"


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dictionary, checked to be a coalora checkpoint (weights only: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CoaloraError(f"checkpoint '{path}' does not exist; {WRITTEN_BY_FIT}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike
        raise CoaloraError(f"cannot read checkpoint '{path}' ({first_line(err)}); {WRITTEN_BY_FIT}") from None
    if not isinstance(checkpoint, dict) or "coalora" not in checkpoint or "state_dict" not in checkpoint:
        raise CoaloraError(f"'{path}' is not a coalora checkpoint; {WRITTEN_BY_FIT}")
    return checkpoint


def task_class(checkpoint: dict) -> type[CoALoRATask]:
    """The task class that wrote ``checkpoint``."""
    name = checkpoint["coalora"].get("task", LEGACY_TASK)
    cls = TASK_TYPES.get(name)
    if cls is None:
        raise CoaloraError(f"checkpoint was written by an unknown task type '{name}'; upgrade coalora")
    return cls


def load_task(path: str | os.PathLike) -> CoALoRATask:
    """Rebuild the task a checkpoint was written by, with its weights and configuration sets, in eval mode.

    Like ``load_from_checkpoint``, but from a weights-only read and with one-line errors. The configuration
    sets come from the checkpoint, so coalora/shared tasks never run the allocator; qlora/lqlora still
    allocate (from the disk cache) and decompose their one configuration while being constructed.
    """
    checkpoint = read_checkpoint(path)
    cls = task_class(checkpoint)
    accepted = set(inspect.signature(cls.__init__).parameters) | set(
        inspect.signature(CoALoRATask.__init__).parameters
    )
    hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters", {})).items() if k in accepted}
    with quiet_transformers():
        task = cls(**hparams)
    task.on_load_checkpoint(checkpoint)
    try:
        task.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise CoaloraError(
            f"checkpoint '{path}' does not fit its own hyperparameters ({first_line(err)})"
        ) from None
    return task.eval()
