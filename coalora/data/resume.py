"""Where the training stream stands, saved in checkpoints so a run resumed mid-epoch sees the batches the
uninterrupted run would have seen.

Lightning restores its loop counters from a checkpoint, but a plain ``DataLoader`` starts its epoch over:
a run resumed after step 5 of an epoch would train on that epoch's first batches again. A data module with
:class:`ResumableTrainData` saves the position of the next batch to train (epoch, batches of it trained)
through the data module's ``state_dict``, and on resume its shuffler starts there (:class:`EpochShuffler`
skips the examples already trained on, in the order of that epoch).

The position counts batches that reached ``training_step`` (Lightning's ``batch_progress``), not batches
the loader yielded: Lightning fetches one batch ahead. DDP swaps the shuffler for a ``DistributedSampler``,
which does not skip; a DDP run resumed mid-epoch starts that epoch over (Lightning warns).
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.trainer.states import TrainerFn

from coalora.data.batching import EpochShuffler

#: Lightning's warning on a mid-epoch resume with a loader it cannot restore itself
NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"


class ResumableTrainData:
    """Mixin for a ``LightningDataModule`` whose train loader shuffles with :class:`EpochShuffler`."""

    trainer: Any
    _resume_at: tuple[int, int] | None = None  # (epoch, batches of it already trained), from a checkpoint

    def state_dict(self) -> dict[str, Any]:
        """The next batch to train as (epoch, index in the epoch); empty outside ``fit``."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        fit = trainer.fit_loop
        epoch = fit.epoch_progress.current.processed  # epochs whose batches have all been trained
        done = fit.epoch_loop.batch_progress.current.processed
        if fit.epoch_progress.current.started == epoch:  # between epochs: the counter is last epoch's
            done = 0
        if done >= trainer.num_training_batches:  # the epoch's batches are done: the next one starts
            epoch, done = epoch + 1, 0
        return {"train_epoch": int(epoch), "train_batches": int(done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_epoch" not in state_dict:
            return
        self._resume_at = (int(state_dict["train_epoch"]), int(state_dict["train_batches"]))
        if self.trainer is None or self.trainer.world_size == 1:  # Lightning's warning is about plain
            warnings.filterwarnings("ignore", message=NOT_RESUMABLE)  # loaders; this one resumes

    def train_sampler(self, dataset: Any, seed: int, batch_size: int) -> EpochShuffler:
        """The train shuffler, started where a loaded checkpoint left the stream (once; then from 0)."""
        sampler = EpochShuffler(dataset, seed)
        if self._resume_at is not None:
            sampler.epoch, batches = self._resume_at
            sampler.skip = batches * batch_size
            self._resume_at = None
        return sampler
