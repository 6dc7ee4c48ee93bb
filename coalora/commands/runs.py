"""What ``coalora fit|validate|test`` check before any work, and what they do when a run stops early.

LightningCLI parses and instantiates, then the Trainer creates the run folder (logger version folder,
``config.yaml``) before it reads data or a checkpoint. So everything that can be checked from the parsed
config is checked first (trainer numbers, output folders, the ``--ckpt_path`` file), the backbone of a
checkpoint is checked once the task is built, and a run refused later still (a data file that is empty)
removes the one run folder it created, if no checkpoint was written into it. An interrupted ``fit``
(Ctrl-C, SIGTERM) leaves the checkpoint Lightning's ``ModelCheckpoint(save_on_exception=True)`` saves, and
the user gets the one command that resumes it.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from coalora.checks import Bound, check_output_dir, check_values, nearest_existing
from coalora.errors import CoaloraError

#: Lightning's own ``ckpt_path`` names; "last" is resolved here, the others are Lightning's
LIGHTNING_NAMES = ("best", "hpc", "registry")
#: the trainer's numeric arguments and what they accept (Lightning checks some only once training runs)
TRAINER_BOUNDS: dict[str, Bound] = {
    "max_epochs": Bound(-1, integer=True, optional=True),
    "min_epochs": Bound(0, integer=True, optional=True),
    "max_steps": Bound(-1, integer=True, optional=True),
    "min_steps": Bound(0, integer=True, optional=True),
    "accumulate_grad_batches": Bound(1, integer=True, optional=True),
    "log_every_n_steps": Bound(1, integer=True, optional=True),
    "check_val_every_n_epoch": Bound(1, integer=True, optional=True),
    "num_sanity_val_steps": Bound(-1, integer=True, optional=True),
    "gradient_clip_val": Bound(0, optional=True),
}
#: ``limit_*_batches`` and ``overfit_batches``: a fraction in [0, 1] or a count >= 0
FRACTION_OR_COUNT = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "overfit_batches")


class TrainingInterrupted(CoaloraError):
    """``fit`` stopped by Ctrl-C or SIGTERM after saving a checkpoint; the message is the resume command."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """Every numeric trainer argument in range (``max_epochs 0`` trains nothing: refused too)."""
    check_values(trainer, TRAINER_BOUNDS, prefix="trainer.")
    if trainer.get("max_epochs") == 0 or trainer.get("max_steps") == 0:
        key = "max_epochs" if trainer.get("max_epochs") == 0 else "max_steps"
        raise CoaloraError(f"trainer.{key} is 0, so nothing would train; use -1 (no limit) or a count >= 1")
    for key in FRACTION_OR_COUNT:
        value = trainer.get(key)
        if value is None:
            continue
        bound = Bound(0, integer=True) if isinstance(value, int) else Bound(0, 1)
        bound.check(f"trainer.{key}", value, "give a fraction in [0, 1] or a number of batches >= 0")


def _save_dirs(node: Any) -> Iterable[str]:
    """``save_dir`` of every logger in a parsed ``trainer.logger`` (one, a list, or true/false)."""
    for logger in node if isinstance(node, list) else [node]:
        if isinstance(logger, Mapping):
            init = logger.get("init_args") or {}
            for key in ("save_dir", "root_dir"):
                if init.get(key):
                    yield str(init[key])


def output_roots(trainer: Mapping[str, Any]) -> list[Path]:
    """The folders a run writes into: ``default_root_dir``, logger ``save_dir``s, checkpoint folders."""
    roots = [str(trainer.get("default_root_dir") or os.getcwd()), *_save_dirs(trainer.get("logger"))]
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, Mapping):
            dirpath = (callback.get("init_args") or {}).get("dirpath")
            if dirpath:
                roots.append(str(dirpath))
    return list(dict.fromkeys(Path(r).expanduser() for r in roots))


def check_outputs(trainer: Mapping[str, Any]) -> list[Path]:
    """Every output root can be created and written (nothing is created here)."""
    roots = output_roots(trainer)
    for root in roots:
        check_output_dir(root, "run folder")
    return roots


def find_last(roots: Sequence[Path]) -> Path:
    """The newest ``last*.ckpt`` under the run's folders: what ``--ckpt_path last`` resumes.

    Lightning looks for it in the *new* run's version folder only, so in a fresh process it would find
    none and silently train from scratch.
    """
    found = [p for root in roots if root.is_dir() for p in root.rglob("last*.ckpt") if p.is_file()]
    if not found:
        where = ", ".join(str(r) for r in roots)
        raise CoaloraError(
            f"--ckpt_path last: no last.ckpt under {where}; pass the checkpoint's path, or train without it"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def resume_command(argv: Sequence[str], checkpoint: str | os.PathLike) -> str:
    """``argv`` as a ``coalora`` command line, with ``--ckpt_path`` replaced by ``checkpoint``."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["coalora", *kept, "--ckpt_path", str(checkpoint)])


def saved_checkpoint(trainer: Any) -> Path | None:
    """The checkpoint an interrupted run left: ``last.ckpt``, else the newest file beside it."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    if callback.last_model_path and Path(callback.last_model_path).is_file():
        return Path(callback.last_model_path)
    folder = Path(callback.dirpath) if callback.dirpath else None
    files = (
        sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder and folder.is_dir() else []
    )
    return files[-1] if files else None


def interrupted(trainer: Any, argv: Sequence[str], by_sigterm: bool) -> TrainingInterrupted:
    """The one-line report of an interrupted ``fit``: where it saved and the command that resumes."""
    signal_name, code = ("SIGTERM", 143) if by_sigterm else ("Ctrl-C", 130)
    saved = saved_checkpoint(trainer)
    if saved is None:
        return TrainingInterrupted(
            f"fit stopped by {signal_name} at step {trainer.global_step} before any checkpoint was saved; "
            "run the same command again to start over",
            code,
        )
    return TrainingInterrupted(
        f"fit stopped by {signal_name} at step {trainer.global_step}; saved {saved}; resume with: "
        f"{resume_command(argv, saved)}",
        code,
    )


class RunFolder:
    """The version folder a run is about to create, removed again if the run is refused before training.

    Only a folder that did not exist when the run started, and holds no checkpoint, is removed (with the
    empty parents the run created): a refused run leaves nothing, and nothing of another run is touched.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.top = self.folder  # the highest folder this run will create
        existing = nearest_existing(self.folder)
        self.existed = existing == self.folder
        if not self.existed:
            while self.top.parent != existing:
                self.top = self.top.parent

    def remove(self) -> None:
        if self.existed or not self.folder.is_dir() or any(self.folder.rglob("*.ckpt")):
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        while parent != self.top.parent and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


class HeldLogs:
    """Lightning's info messages (seed, devices), held back until the inputs are known good: a refused
    run prints its one line and nothing else. :meth:`release` shows what was held; :meth:`drop` discards
    it (and is a no-op after a release)."""

    NAMES = ("lightning.pytorch", "lightning.fabric")

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self.saved: dict[str, list[logging.Handler]] = {}
        holder = _Collect(self.records)
        for name in self.NAMES:
            logger = logging.getLogger(name)
            self.saved[name] = list(logger.handlers)
            logger.handlers = [holder]

    def _restore(self) -> None:
        for name, handlers in self.saved.items():
            logging.getLogger(name).handlers = handlers
        self.saved = {}

    def release(self) -> None:
        if not self.saved:
            return
        handlers = dict(self.saved)
        self._restore()
        for record in self.records:
            for handler in handlers.get(record.name.split(".")[0] + "." + record.name.split(".")[1], []):
                if record.levelno >= handler.level:
                    handler.handle(record)
        self.records.clear()

    def drop(self) -> None:
        self._restore()
        self.records.clear()


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
