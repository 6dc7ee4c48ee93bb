"""The one checkpoint reader: a ``.ckpt`` written by ``coalora fit`` back to a task, on the CPU.

It loads with ``weights_only=True`` (a checkpoint from elsewhere cannot run code) and turns every way a
file can be wrong into one line that says what to pass instead.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
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


#: how the files ``torch.save`` writes begin: a zip archive, or (before torch 1.6) a pickle
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
#: the keys of the ``coalora`` section that every checkpoint ``coalora fit`` writes holds
COALORA_KEYS = ("fingerprint", "train_configs", "eval_configs")


def _unreadable(path: Path, head: bytes, err: BaseException) -> CoaloraError:
    """Why ``torch.load`` refused ``path``, in our words: torch's own message may advise
    ``weights_only=False``, which runs whatever code the file carries."""
    if isinstance(err, PermissionError):
        return CoaloraError(f"checkpoint '{path}' cannot be read (permission denied); fix its permissions")
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        return CoaloraError(
            f"cannot read checkpoint '{path}': not a PyTorch checkpoint (text or other data); "
            f"{WRITTEN_BY_FIT}"
        )
    if "weights only" in str(err).lower() and not isinstance(err, (EOFError, RuntimeError)):
        return CoaloraError(
            f"checkpoint '{path}' holds Python objects that a safe (weights-only) load refuses, since "
            f"loading them could run code; it was not written by `coalora fit`: {WRITTEN_BY_FIT}"
        )
    return CoaloraError(
        f"cannot read checkpoint '{path}': truncated or corrupted (an incomplete copy or interrupted save?); "
        f"copy it again or {WRITTEN_BY_FIT}"
    )


def _foreign(path: Path, checkpoint: object) -> CoaloraError | None:
    """A one-line error if ``checkpoint`` was not written by ``coalora fit`` (None: it was)."""
    if not isinstance(checkpoint, dict):
        return CoaloraError(
            f"'{path}' holds a {type(checkpoint).__name__}, not a coalora checkpoint; {WRITTEN_BY_FIT}"
        )
    state = checkpoint.get("coalora")
    if state is None or "state_dict" not in checkpoint:
        library = (
            "a Lightning checkpoint of another project"
            if "pytorch-lightning_version" in checkpoint
            else ("a plain PyTorch file")
        )
        return CoaloraError(f"'{path}' is {library}, not a coalora checkpoint; {WRITTEN_BY_FIT}")
    missing = [key for key in COALORA_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        return CoaloraError(
            f"checkpoint '{path}' has an incomplete coalora section (no '{missing[0]}'); {WRITTEN_BY_FIT}"
        )
    return None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dictionary, checked to be a coalora checkpoint (weights only: no code runs).

    Every way a file can be wrong (missing, a folder, empty, truncated, text, random bytes, pickled
    objects, another library's checkpoint) is one line; nothing is ever loaded with ``weights_only=False``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CoaloraError(
            f"a checkpoint path must be a string or a path, got {type(path).__name__}; {WRITTEN_BY_FIT}"
        )
    path = Path(path).expanduser()
    if path.is_dir():
        hint = (
            "; an exported artifact: open it with coalora.load" if (path / "coalora.json").is_file() else ""
        )
        raise CoaloraError(
            f"checkpoint '{path}' is a folder, not a file{hint}; pass the .ckpt inside it "
            "(e.g. <run>/checkpoints/last.ckpt)"
        )
    if not path.is_file():
        raise CoaloraError(f"checkpoint '{path}' does not exist; {WRITTEN_BY_FIT}")
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise _unreadable(path, b"", err) from None
    if not head:
        raise CoaloraError(f"checkpoint '{path}' is empty (0 bytes: an interrupted copy?); {WRITTEN_BY_FIT}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip, EOF and runtime errors alike
        raise _unreadable(path, head, err) from None
    problem = _foreign(path, checkpoint)
    if problem is not None:
        raise problem
    return checkpoint


def check_task_of(checkpoint: dict, path: str | os.PathLike, task: type[CoALoRATask]) -> None:
    """``checkpoint`` must have been written by ``task`` (LightningCLI would load its hyperparameters into
    the wrong task or data module)."""
    written_by = checkpoint["coalora"].get("task", LEGACY_TASK)
    if written_by != task.task_type:
        raise CoaloraError(
            f"checkpoint '{path}' was written by a '{written_by}' task, not '{task.task_type}' "
            f"({task.__name__}); pass the config it was trained with"
        )


def check_backbone_of(checkpoint: dict, path: str | os.PathLike, module: CoALoRATask) -> None:
    """``checkpoint`` must have been trained on ``module``'s backbone (the weights' fingerprint)."""
    theirs = checkpoint["coalora"]["fingerprint"]
    if theirs != module.fingerprint:
        raise CoaloraError(
            f"checkpoint '{path}' was trained on another backbone (weights {theirs}, this model "
            f"{module.fingerprint}); pass the model_name it was trained with"
        )


def task_class(checkpoint: dict) -> type[CoALoRATask]:
    """The task class that wrote ``checkpoint``."""
    name = checkpoint["coalora"].get("task", LEGACY_TASK)
    cls = TASK_TYPES.get(name)
    if cls is None:
        raise CoaloraError(f"checkpoint was written by an unknown task type '{name}'; upgrade coalora")
    return cls


def load_task(
    path: str | os.PathLike, rounding: str | None = None, data_overrides: dict | None = None
) -> CoALoRATask:
    """Rebuild the task a checkpoint was written by, with its weights and configuration sets, in eval mode.

    ``rounding`` (default: the run's own) is how it quantizes configurations from now on; ``gptq``
    calibrates on the run's training examples, with its saved data arguments and ``data_overrides``
    (see :mod:`coalora.tasks.calibrated` for whose statistics).

    Like ``load_from_checkpoint``, but from a weights-only read and with one-line errors. The configuration
    sets come from the checkpoint, so coalora/shared tasks never run the allocator; qlora/lqlora still
    allocate (from the disk cache) and decompose their one configuration while being constructed. A
    budget the checkpoint lacks is allocated from the run's ``error_weighting`` table, whose statistics
    come from the same data arguments.
    """
    checkpoint = read_checkpoint(path)
    cls = task_class(checkpoint)
    accepted = set(inspect.signature(cls.__init__).parameters) | set(
        inspect.signature(CoALoRATask.__init__).parameters
    )
    hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters", {})).items() if k in accepted}
    with quiet_transformers():
        task = cls(**hparams)
    try:
        task.on_load_checkpoint(checkpoint)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CoaloraError):
            raise
        raise CoaloraError(
            f"checkpoint '{path}' has a malformed coalora section ({first_line(err)}); {WRITTEN_BY_FIT}"
        ) from None
    try:
        task.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise CoaloraError(
            f"checkpoint '{path}' does not fit its own hyperparameters ({first_line(err)})"
        ) from None
    task.eval()
    saved = dict(checkpoint.get("datamodule_hyper_parameters", {}))
    data_module = functools.partial(task.data_module, **{**saved, **(data_overrides or {})})
    rounding = rounding or task.hparams.get("rounding", "nearest")
    if rounding != task.model.rounder.method or not task.model.rounder.ready:
        data = data_module() if rounding == "gptq" else None
        task.serve_with(rounding, data)
        if data is not None:
            task.use_allocation_data(data)
    if task.allocation_data is None:  # built only if a new budget needs a weighted table
        task.use_allocation_data(data_module)
    return task
