"""One backward per configuration (issue #13): a step's K graphs never live at the same time.

Lightning's automatic optimisation back-propagates the one loss a ``training_step`` returns. A CoA-LoRA
step has K losses, one per configuration; summing them first keeps all K graphs (activations, and the
dequantized weights they saved) alive until the one backward. Here every loss but the last is
back-propagated inside the step, as Lightning would back-propagate it, and the last is returned: the
gradient is the same average, and gradient clipping, accumulation and the optimizer step stay Lightning's
(``Trainer(gradient_clip_val=..., accumulate_grad_batches=...)`` keep working, which manual optimisation
would forbid). Lightning clears gradients between a step's ``training_step`` and its backward, which
would drop the early shares; with ``backward_per_config`` the task clears them instead at the start of
the step, on the same batches (the first of every accumulation window).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from torch.optim import Optimizer

from coalora.errors import CoaloraError


def backward_now(trainer: Any, loss: torch.Tensor) -> None:
    """Back-propagate ``loss`` (one configuration's share of the step's mean) as Lightning's closure does.

    The closure divides the loss a step returns by the accumulation factor and, in fp16 mixed precision,
    scales it by the grad scaler; the early losses get the same treatment so all K shares add up alike.
    Under DDP the step runs inside the wrapped forward, before the reducer expects gradients, so these
    gradients accumulate locally and the backward Lightning runs afterwards synchronises their sum: once
    per step, not K times (``tests/ddp_probe.py`` counts the all-reduces). Lightning's backward hooks
    (``on_before_backward``/``on_after_backward``) still run once per step, on the last share.

    The step runs inside Lightning's autocast region, but Lightning back-propagates the returned loss
    outside it; so does this one. On the CPU the backward runs in the calling thread, where an enabled
    autocast would recast the backward of the regions deliberately kept in fp32 (the mapper, h + D·h) to
    bf16 for K − 1 of the K shares, and their sum would not be the summed loss's gradient (issue #23).
    """
    if trainer is not None:
        loss = loss / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            loss = scaler.scale(loss)
    with autocast_disabled():
        loss.backward()


@contextlib.contextmanager
def autocast_disabled() -> Iterator[None]:
    """Leave every autocast region that is on now (CPU and accelerator alike) for the duration."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda", "mps", "xpu"):
            try:
                enabled = torch.is_autocast_enabled(device)
            except (RuntimeError, TypeError):  # a device type this torch build does not know
                continue
            if enabled:
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


def check_backward_strategy(strategy: Strategy, backward_per_config: bool) -> None:
    """Refuse strategies whose every backward reduces or reshards (FSDP, DeepSpeed): K backward passes
    a step would reduce K times there, or trip over sharded parameters."""
    if backward_per_config and not isinstance(strategy, DDPStrategy | SingleDeviceStrategy):
        raise CoaloraError(
            f"backward_per_config supports single-device and DDP training, not {type(strategy).__name__}; "
            "set --model.backward_per_config false (all K graphs then stay alive until one backward)"
        )


class PerConfigurationBackward:
    """The task's side of it: where gradients are cleared, and whether a step back-propagates early."""

    if TYPE_CHECKING:

        @property
        def hparams(self) -> Any: ...

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Optimizer) -> None:
        """Lightning's hook, called after ``training_step``: a no-op when :meth:`prepare_early_backward`
        cleared the gradients before the step's first share."""
        if not self.hparams.backward_per_config:
            optimizer.zero_grad()

    def prepare_early_backward(self, batch_idx: int) -> bool:
        """Whether this step back-propagates every share but the last itself; if so, clear the gradients
        now where Lightning would have cleared them (``batch_idx % accumulate_grad_batches == 0``)."""
        if not (self.hparams.backward_per_config and torch.is_grad_enabled()):
            return False
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and batch_idx % trainer.accumulate_grad_batches == 0:
            for optimizer in trainer.optimizers:
                optimizer.zero_grad()
        return True
