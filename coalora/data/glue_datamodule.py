"""The GLUE LightningDataModule: rows from :mod:`coalora.data.glue_files`, tokenized once, padded per batch.

Besides train and dev it carves a seeded *search split* out of the training rows (and removes it from
training) so the configuration search is scored on examples the adapters never trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from coalora.data.batching import PADDED_KEYS, EncodedDataset, PadCollator, split_search
from coalora.data.glue import Row, TaskSpec, get_task
from coalora.data.glue_files import (
    default_glue_dir,
    find_split_file,
    load_hub_split,
    read_rows,
    resolve_source,
)
from coalora.data.resume import ResumableTrainData
from coalora.errors import CoaloraError
from coalora.pretrained import DEFAULT_MODEL, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _check_count(name: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise CoaloraError(f"{name}={value} is too small; use an integer >= {minimum}")


class GLUEDataModule(ResumableTrainData, L.LightningDataModule):
    """One GLUE task: train (minus the search split), search, and dev (used for validation and test)."""

    if TYPE_CHECKING:  # Lightning types hparams as a plain mapping; ours are attribute-accessed arguments

        @property
        def hparams(self) -> Any: ...

    def __init__(
        self,
        task: str = "sst2",
        model_name: str = DEFAULT_MODEL,
        glue_dir: str | None = None,
        source: str = "auto",
        train_file: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        search_size: int = 256,
        train_limit: int | None = None,
        eval_limit: int | None = None,
        seed: int = 42,
    ) -> None:
        """Args mirror the CLI: ``train_file`` overrides the train split (any supported layout);
        ``search_size`` rows are held out of training (0 disables); the limits cut splits for quick runs."""
        super().__init__()
        self.save_hyperparameters()
        get_task(task)  # fail early on a typo
        resolve_source(source, glue_dir)
        for name, value, minimum in (
            ("max_length", max_length, 2),
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("search_size", search_size, 0),
            ("train_limit", train_limit, 1),
            ("eval_limit", eval_limit, 1),
        ):
            _check_count(name, value, minimum)
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: EncodedDataset | None = None
        self.search_set: EncodedDataset | None = None
        self.dev_set: EncodedDataset | None = None
        self.train_indices: list[int] = []  # positions in the training file, after the search split
        self.search_indices: list[int] = []

    # ------------------------------------------------------------------------------------------ task info

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.hparams.task)

    @property
    def num_labels(self) -> int:
        return self.spec.num_labels

    @property
    def is_regression(self) -> bool:
        return self.spec.is_regression

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name)
            if self._tokenizer.pad_token_id is None:
                raise CoaloraError(
                    f"tokenizer of '{self.hparams.model_name}' has no pad or eos token; pick another model"
                )
        return self._tokenizer

    # ------------------------------------------------------------------------------------------- loading

    def _train_file(self) -> Path:
        """``train_file`` as given, else relative to the GLUE folder (configs say ``sst2/sentence/...``)."""
        path = Path(self.hparams.train_file).expanduser()
        if not path.is_absolute() and not path.exists():
            folder = Path(self.hparams.glue_dir).expanduser() if self.hparams.glue_dir else default_glue_dir()
            if folder is not None and (folder / path).exists():
                return folder / path
        return path

    def _rows(self, split: str) -> list[Row]:
        if split == "train" and self.hparams.train_file:
            return read_rows(self._train_file(), self.spec.name)
        kind, folder = resolve_source(self.hparams.source, self.hparams.glue_dir)
        if kind == "hub":
            return load_hub_split(self.spec.name, split)
        assert folder is not None
        return read_rows(find_split_file(folder, self.spec.name, split), self.spec.name)

    def prepare_data(self) -> None:
        """Download hub splits into the datasets cache; for local data, fail early on a missing file."""
        kind, folder = resolve_source(self.hparams.source, self.hparams.glue_dir)
        splits = [self.spec.dev_split] if self.hparams.train_file else ["train", self.spec.dev_split]
        if self.hparams.train_file and not self._train_file().is_file():
            raise CoaloraError(f"train_file {self.hparams.train_file} does not exist; check the path")
        for split in splits:
            if kind == "hub":
                load_hub_split(self.spec.name, split)
            else:
                assert folder is not None
                find_split_file(folder, self.spec.name, split)

    def _encode(self, rows: list[Row]) -> EncodedDataset:
        """Tokenize all rows in one fast-tokenizer call: truncated, unpadded."""
        dtype = torch.float32 if self.is_regression else torch.long
        labels = torch.tensor([row["label"] for row in rows], dtype=dtype)
        if not rows:
            return EncodedDataset({"input_ids": []}, labels)
        texts = [[str(row[name]) for row in rows] for name in self.spec.text_fields]
        encoded = self.tokenizer(*texts, truncation=True, max_length=self.hparams.max_length)
        features = {key: encoded[key] for key, _ in PADDED_KEYS if key in encoded}
        return EncodedDataset(features, labels)

    def _setup_train(self) -> None:
        rows = self._rows("train")
        if not rows:
            raise CoaloraError(
                f"the {self.spec.name} training data has no rows (only a header?); "
                "give a train_file (or glue_dir) that holds examples"
            )
        train, search = split_search(len(rows), self.hparams.search_size, self.hparams.seed)
        self.train_indices = train[: self.hparams.train_limit]
        self.search_indices = search
        self.train_set = self._encode([rows[i] for i in self.train_indices])
        self.search_set = self._encode([rows[i] for i in search])

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize what ``stage`` needs (train and search only for fitting); idempotent."""
        if stage in (None, "fit") and self.train_set is None:
            self._setup_train()
        if self.dev_set is None:
            rows = self._rows(self.spec.dev_split)
            if not rows:
                raise CoaloraError(
                    f"the {self.spec.name} {self.spec.dev_split} split has no rows (only a header?); "
                    "give a glue_dir whose dev file holds examples"
                )
            self.dev_set = self._encode(rows[: self.hparams.eval_limit])

    # --------------------------------------------------------------------------------------- dataloaders

    def _loader(self, dataset: EncodedDataset | None, batch_size: int, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise CoaloraError("the data module is not set up; call setup() (the Trainer does) first")
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.train_sampler(dataset, self.hparams.seed, batch_size) if shuffle else None,
            # seeds worker processes from this generator rather than from the global RNG
            generator=torch.Generator().manual_seed(self.hparams.seed),
            collate_fn=PadCollator(self.tokenizer.pad_token_id),
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dev_set, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """The dev split again: GLUE's test labels are hidden."""
        return self._loader(self.dev_set, self.hparams.eval_batch_size)

    def search_dataloader(self, batch_size: int | None = None, by_length: bool = False) -> DataLoader:
        """The held-out search split, in a fixed order, for scoring quantization configurations;
        ``by_length``: shortest first, so that each batch pads to little (for scoring the whole split,
        where the order does not change the mean)."""
        if self.hparams.search_size == 0:
            raise CoaloraError("the search split is disabled (search_size=0); set search_size > 0")
        if self.search_set is None:
            self._setup_train()
        loader = self._loader(self.search_set, batch_size or self.hparams.eval_batch_size)
        if not by_length:
            return loader
        assert self.search_set is not None
        lengths = [len(ids) for ids in self.search_set.features["input_ids"]]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return DataLoader(
            self.search_set,
            batch_size=loader.batch_size,
            sampler=order,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
