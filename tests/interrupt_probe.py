"""Callbacks that stop ``fit`` once training reaches a given step: Ctrl-C, or a ``kill -9``."""

from __future__ import annotations

import os
import signal

import lightning as L


class InterruptAt(L.Callback):
    """Presses Ctrl-C (raises KeyboardInterrupt): Lightning shuts down gracefully and saves."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class KillAt(L.Callback):
    """SIGKILLs its own process before the batch after ``step``: no hook runs, nothing more is saved,
    the step checkpoints already written are all that is left (as after a crash or an OOM kill)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
