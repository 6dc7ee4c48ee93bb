"""The language-modelling LightningDataModule: documents tokenized with the backbone's tokenizer, joined with
EOS and packed into ``block_size`` blocks; a seeded held-out *search split* of training blocks scores the
configuration search (and validates during training when no validation files are given)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from coalora.data.batching import split_search
from coalora.data.glue_files import default_glue_dir
from coalora.data.resume import ResumableTrainData
from coalora.data.text_files import expand_paths, read_documents, stream_hub_documents
from coalora.errors import CoaloraError
from coalora.pretrained import load_tokenizer, model_context_length
from coalora.utils import quiet_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SOURCES = ("auto", "local", "hub")


def source_kind(source: str, train_files: object) -> str:
    """``local`` or ``hub``: what ``source`` means, ``auto`` being local when training files are given."""
    return ("local" if train_files else "hub") if source == "auto" else source


def evaluation_split(data_hparams: Mapping[str, Any], requested: str | None) -> str:
    """The split ``coalora evaluate`` reports on for a run with these saved data arguments: ``requested``,
    else ``test`` when the run has test text, else ``validate``.

    A local run without ``val_files`` validated on its search split during training, which is fine for
    watching training but not for a report: the search used those blocks to choose the training
    configurations. So a report that would land there is refused, before any model loads.
    """
    has_test, has_val = bool(data_hparams.get("test_files")), bool(data_hparams.get("val_files"))
    split = requested or ("test" if has_test else "validate")
    if split == "test" and not has_test:
        fix = "leave out --split test" if has_val else "fit with data.test_files set to held-out text"
        raise CoaloraError(f"no test text: the run has no data.test_files; {fix}")
    kind = source_kind(data_hparams.get("source", "auto"), data_hparams.get("train_files"))
    if split == "validate" and kind == "local" and not has_val:
        fix = (
            "use --split test"
            if has_test
            else "fit with data.val_files (or data.test_files) of held-out text"
        )
        raise CoaloraError(
            "no validation text: the run has no data.val_files, and its search split chose the training "
            f"configurations so cannot be reported; {fix}"
        )
    return split


class BlockDataset(Dataset):
    """Equal-length token blocks; every item is a full (unpadded) causal-LM example."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def pack_documents(token_ids: list[list[int]], eos_id: int, block_size: int) -> torch.Tensor:
    """Documents joined with EOS into one stream, cut into ``(N, block_size)`` blocks (the tail dropped)."""
    stream = [token for ids in token_ids for token in (*ids, eos_id)]
    count = len(stream) // block_size
    return torch.tensor(stream[: count * block_size], dtype=torch.long).view(count, block_size)


class TextDataModule(ResumableTrainData, L.LightningDataModule):
    """Causal-LM data: train blocks (minus the search split), search blocks, validation and test blocks."""

    if TYPE_CHECKING:  # Lightning types hparams as a plain mapping; ours are attribute-accessed arguments

        @property
        def hparams(self) -> Any: ...

    def __init__(
        self,
        model_name: str,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        test_files: list[str] | None = None,
        data_dir: str | None = None,
        source: str = "auto",
        hub_dataset: str = "allenai/c4",
        hub_config: str | None = "en",
        hub_train_documents: int = 20_000,
        hub_eval_documents: int = 1_000,
        block_size: int = 128,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        search_blocks: int = 16,
        train_limit: int | None = None,
        eval_limit: int | None = None,
        seed: int = 42,
    ) -> None:
        """
        Args:
            model_name: the backbone, whose tokenizer encodes the text (linked from the task).
            train_files, val_files, test_files: files or folders (see :mod:`coalora.data.text_files`); a
                relative path is also looked up in ``data_dir``. No ``val_files``: training validates on
                the search split (``coalora evaluate`` refuses to report it).
            data_dir: the data folder (default ``$GLUE_DIR``, else ``../shared/data``).
            source: ``local`` files, ``hub`` (stream ``hub_dataset``/``hub_config``), or ``auto`` (local
                when ``train_files`` is given).
            hub_train_documents, hub_eval_documents: documents streamed from the hub's train and validation.
            block_size: tokens per training example (at most the model's context length).
            search_blocks: training blocks held out to score configurations (0 disables the search split).
            train_limit, eval_limit: use only this many blocks (quick runs); ``eval_limit`` caps every
                split that is validated or tested, the search split included when it stands in for
                validation (the search's own scoring uses ``search_blocks``).
        """
        super().__init__()
        self.save_hyperparameters()
        if source not in SOURCES:
            raise CoaloraError(f"source must be one of {', '.join(SOURCES)}, got '{source}'")
        for name, value, minimum in (
            ("block_size", block_size, 2),
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("search_blocks", search_blocks, 0),
            ("train_limit", train_limit, 1),
            ("eval_limit", eval_limit, 1),
            ("hub_train_documents", hub_train_documents, 1),
            ("hub_eval_documents", hub_eval_documents, 1),
        ):
            if value is not None and value < minimum:
                raise CoaloraError(f"{name}={value} is too small; use an integer >= {minimum}")
        if self.kind == "local" and not train_files:
            raise CoaloraError("no training text: set data.train_files (files or folders) or source: hub")
        for files in (train_files, val_files, test_files):  # a wrong path fails now, before the model loads
            if files:
                expand_paths([files] if isinstance(files, str) else files, self.data_dir)
        context = model_context_length(model_name)
        if context is not None and block_size > context:
            raise CoaloraError(
                f"block_size={block_size} is longer than the model's context ({context} tokens); "
                f"use block_size <= {context}"
            )
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: BlockDataset | None = None
        self.search_set: BlockDataset | None = None
        self.val_set: BlockDataset | None = None
        self.test_set: BlockDataset | None = None

    @property
    def kind(self) -> str:
        return source_kind(self.hparams.source, self.hparams.train_files)

    @property
    def data_dir(self) -> Path | None:
        return Path(self.hparams.data_dir).expanduser() if self.hparams.data_dir else default_glue_dir()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name)
            if self._tokenizer.eos_token_id is None:
                raise CoaloraError(
                    f"tokenizer of '{self.hparams.model_name}' has no eos token; pick another model"
                )
        return self._tokenizer

    # ------------------------------------------------------------------------------------------- loading

    def _documents(self, split: str) -> list[str] | None:
        hp = self.hparams
        files = {"train": hp.train_files, "val": hp.val_files, "test": hp.test_files}[split]
        if files:
            return read_documents([files] if isinstance(files, str) else files, self.data_dir)
        if self.kind == "hub" and split != "test":
            count = hp.hub_train_documents if split == "train" else hp.hub_eval_documents
            hub_split = "train" if split == "train" else "validation"
            return stream_hub_documents(hp.hub_dataset, hp.hub_config, hub_split, count)
        return None

    def _blocks(self, documents: list[str], what: str) -> torch.Tensor:
        with quiet_transformers():  # "sequence longer than the model's maximum": packing cuts it anyway
            ids = self.tokenizer(documents, add_special_tokens=False)["input_ids"]
        blocks = pack_documents(ids, self.tokenizer.eos_token_id, self.hparams.block_size)
        if len(blocks) == 0:
            tokens = sum(len(i) + 1 for i in ids)
            raise CoaloraError(
                f"the {what} text has {tokens} tokens, fewer than one block of {self.hparams.block_size}; "
                "add text or use a smaller block_size"
            )
        return blocks

    def prepare_data(self) -> None:
        """Fail early on a missing or unreadable file (local), before the model trains."""
        for split in ("train", "val", "test"):
            files = getattr(self.hparams, f"{split}_files")
            if files:
                read_documents([files] if isinstance(files, str) else files, self.data_dir)

    def _setup_train(self) -> None:
        documents = self._documents("train")
        assert documents is not None  # __init__ requires train_files or the hub
        blocks = self._blocks(documents, "training")
        search = self.hparams.search_blocks
        if search >= len(blocks):
            raise CoaloraError(
                f"search_blocks={search} leaves no training blocks (the training text makes {len(blocks)}); "
                f"use search_blocks < {len(blocks)} or add text"
            )
        train, held_out = split_search(len(blocks), search, self.hparams.seed)
        self.train_set = BlockDataset(blocks[train[: self.hparams.train_limit]])
        self.search_set = BlockDataset(blocks[held_out])

    def _eval_set(self, split: str) -> BlockDataset | None:
        documents = self._documents(split)
        if documents is None:
            return None
        return BlockDataset(self._blocks(documents, split)[: self.hparams.eval_limit])

    def setup(self, stage: str | None = None) -> None:
        """Tokenize and pack what ``stage`` needs; idempotent."""
        if stage in (None, "fit") and self.train_set is None:
            self._setup_train()
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._eval_set("val")
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._eval_set("test")

    # --------------------------------------------------------------------------------------- dataloaders

    def _loader(self, dataset: BlockDataset | None, batch_size: int, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise CoaloraError("the data module is not set up; call setup() (the Trainer does) first")
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.train_sampler(dataset, self.hparams.seed, batch_size) if shuffle else None,
            generator=torch.Generator().manual_seed(self.hparams.seed),
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation files if given, else the held-out search split (never the test text), cut to
        ``eval_limit`` blocks like any evaluated split.

        The fallback keeps a run without validation text able to watch its training (and its checkpoint
        callbacks able to monitor ``val/*``); being the blocks the search scored, it is no report, so
        ``coalora evaluate`` refuses it (:func:`evaluation_split`).
        """
        if self.val_set is None and not self.hparams.val_files and self.kind == "local":
            search = self._search_set()
            return self._loader(
                BlockDataset(search.blocks[: self.hparams.eval_limit]), self.hparams.eval_batch_size
            )
        return self._loader(self.val_set, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None and not self.hparams.test_files:
            raise CoaloraError("no test text: set data.test_files to the files to report perplexity on")
        return self._loader(self.test_set, self.hparams.eval_batch_size)

    def _search_set(self) -> BlockDataset:
        if self.hparams.search_blocks == 0:
            raise CoaloraError("the search split is disabled (search_blocks=0); set search_blocks > 0")
        if self.search_set is None:
            self._setup_train()
        assert self.search_set is not None
        return self.search_set

    def search_dataloader(self, batch_size: int | None = None, by_length: bool = False) -> DataLoader:
        """The held-out search blocks, in a fixed order, for scoring quantization configurations
        (``by_length`` changes nothing: every block has the same length)."""
        return self._loader(self._search_set(), batch_size or self.hparams.eval_batch_size)
