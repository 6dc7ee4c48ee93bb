"""Dropout seeded per training batch, so a run resumed from a checkpoint trains exactly as the
uninterrupted run did.

Dropout (the backbone's and LoRA's) draws from torch's global RNG, whose state a checkpoint does not hold,
and which a resumed process reaches by another path (building the model, loading the checkpoint). Seeding
it at every batch from (task seed, epoch, batch index, rank) makes each batch's masks a function of where
the batch stands in training only. Epoch and batch index (rather than the optimizer step) keep the batches
of one accumulated step apart; the rank keeps DDP ranks' masks independent. The price: ``seed_everything``
sets the model's initialisation, ``model.seed`` the dropout (as it does the configuration draws and the
data order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

_MIX = (1_000_003, 1_000_033, 10_007)


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """One 63-bit seed per (seed, epoch, batch, rank); distinct from the configuration draws' seeds."""
    value = seed
    for part, mix in zip((epoch, batch_idx, rank), _MIX, strict=True):
        value = value * mix + part + 1
    return value % (1 << 63)


class BatchSeededDropout:
    """Mixin for the task: reseeds torch's global RNG before every training batch."""

    if TYPE_CHECKING:  # the LightningModule's

        @property
        def hparams(self) -> Any: ...
        @property
        def current_epoch(self) -> int: ...
        @property
        def global_rank(self) -> int: ...

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(batch_seed(self.hparams.seed, self.current_epoch, batch_idx, self.global_rank))
