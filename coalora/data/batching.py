"""Datasets, samplers and collators shared by the data modules: tokenized examples kept unpadded, padded
per batch, shuffled as a function of (seed, epoch), and a seeded held-out search split."""

from __future__ import annotations

from collections.abc import Sized

import torch
from torch.utils.data import Dataset, RandomSampler

from coalora.errors import CoaloraError

#: tokenizer outputs a batch carries, with the value that pads each (None: the tokenizer's pad id); the
#: task passes the model only those its forward names (:func:`coalora.utils.model_inputs`).
PADDED_KEYS: tuple[tuple[str, int | None], ...] = (
    ("input_ids", None),
    ("attention_mask", 0),
    ("token_type_ids", 0),
)


class EpochShuffler(RandomSampler):
    """A shuffling sampler whose order is a function of (seed, epoch) only.

    A seeded ``RandomSampler`` continues one generator across epochs, so a run resumed from a checkpoint
    replays epoch 0's order; Lightning calls ``set_epoch`` before every epoch (also on resume), and this
    sampler reseeds from it. Subclassing ``RandomSampler`` keeps Lightning's DDP handling: it is swapped
    for a ``DistributedSampler``, which is itself seeded per epoch.

    ``skip`` drops the first examples of the next pass only: a run resumed mid-epoch continues the
    epoch's order where the checkpoint left it (:mod:`coalora.data.resume`) instead of replaying it.
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a skip belongs to the epoch it was set for
            self.skip = 0
        self.epoch = epoch

    def __iter__(self):
        skip, self.skip = self.skip, 0
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=self.generator).tolist()[skip:]

    def __len__(self) -> int:
        return len(self.data_source)


class EncodedDataset(Dataset):
    """Tokenized rows kept as unpadded Python lists, plus a label tensor."""

    def __init__(self, features: dict[str, list[list[int]]], labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item: dict = {key: values[index] for key, values in self.features.items()}
        item["labels"] = self.labels[index]
        return item


class PadCollator:
    """Right-pads each batch only to its own longest sequence (dynamic padding), keeping workers picklable."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        batch: dict[str, torch.Tensor] = {}
        for key, fill in PADDED_KEYS:
            if key not in items[0]:
                continue
            value = self.pad_token_id if fill is None else fill
            batch[key] = torch.tensor([item[key] + [value] * (length - len(item[key])) for item in items])
        batch["labels"] = torch.stack([item["labels"] for item in items])
        return batch


def split_search(count: int, search_size: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train, search)`` row indices: a seeded random ``search_size`` held out, both in file order."""
    if search_size <= 0:
        return list(range(count)), []
    if search_size >= count:
        raise CoaloraError(
            f"search_size={search_size} leaves no training rows (the training set has {count}); "
            "use a smaller search_size"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[search_size:]), sorted(order[:search_size])
