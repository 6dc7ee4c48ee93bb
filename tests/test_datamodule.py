"""GLUEDataModule: search split held out deterministically, dynamic padding, label dtypes, clear errors."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch

from coalora.data.batching import EpochShuffler, PadCollator, split_search
from coalora.data.glue_datamodule import GLUEDataModule
from coalora.errors import CoaloraError

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
DATA = Path(__file__).parents[1].parent / "shared" / "data"
STSA = DATA / "sst2" / "sentence" / "stsa.binary.train"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")


def stsa_module(**overrides) -> GLUEDataModule:
    args = {
        "task": "sst2",
        "glue_dir": str(DATA),
        "train_file": str(STSA),
        "search_size": 64,
        "train_limit": 300,
        "eval_limit": 100,
        "batch_size": 16,
    }
    return GLUEDataModule(**{**args, **overrides})


@pytest.fixture(scope="module")
def stsa() -> GLUEDataModule:
    module = stsa_module()
    module.setup("fit")
    return module


@needs_data
def test_stsa_sizes_and_search_split(stsa: GLUEDataModule) -> None:
    assert len(stsa.train_set) == 300
    assert len(stsa.search_set) == 64
    assert len(stsa.dev_set) == 100
    assert not set(stsa.train_indices) & set(stsa.search_indices)
    assert stsa.search_indices == sorted(stsa.search_indices)
    again = stsa_module(train_limit=None)
    again.setup("fit")
    assert again.search_indices == stsa.search_indices  # same seed, same held-out rows
    assert len(again.train_set) == 6_920 - 64
    assert sorted(again.train_indices + again.search_indices) == list(range(6_920))
    other = stsa_module(seed=7)
    other.setup("fit")
    assert other.search_indices != stsa.search_indices


@needs_data
def test_batches_are_dynamically_padded(stsa: GLUEDataModule) -> None:
    widths = set()
    for index, batch in enumerate(stsa.train_dataloader()):
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["labels"].dtype == torch.long
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] <= 16
        assert mask[:, 0].all() and mask.sum(1).max() == ids.shape[1]  # right-padded to the longest row
        assert (ids[mask == 0] == stsa.tokenizer.pad_token_id).all()
        widths.add(ids.shape[1])
        if index == 5:
            break
    assert len(widths) > 1


@needs_data
def test_loaders_are_deterministic(stsa: GLUEDataModule) -> None:
    twin = stsa_module()
    twin.setup("fit")
    first, second = next(iter(stsa.train_dataloader())), next(iter(twin.train_dataloader()))
    assert torch.equal(first["input_ids"], second["input_ids"])
    pairs = zip(stsa.search_dataloader(8), twin.search_dataloader(8))
    search = [torch.equal(a["input_ids"], b["input_ids"]) for a, b in pairs]
    assert len(search) == 8 and all(search)
    assert len(stsa.val_dataloader()) == len(stsa.test_dataloader()) == 2  # 100 dev rows in batches of 64


def _order(loader) -> list[int]:
    return list(iter(loader.sampler))


@needs_data
def test_shuffled_order_is_a_function_of_the_epoch(stsa: GLUEDataModule) -> None:
    loader = stsa.train_dataloader()
    epoch0 = _order(loader)
    assert sorted(epoch0) == list(range(300)) and epoch0 != list(range(300))
    assert _order(loader) == epoch0  # without set_epoch the order does not drift
    loader.sampler.set_epoch(1)
    epoch1 = _order(loader)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    fresh = stsa.train_dataloader()
    fresh.sampler.set_epoch(1)
    assert _order(fresh) == epoch1  # what a resumed run sees
    other = stsa_module(seed=7)
    other.setup("fit")
    assert _order(other.train_dataloader()) != epoch0


class _BatchRecorder(L.LightningModule):
    """Records the first tokens of every training batch per epoch; trains one throwaway weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[list[int]]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).append(batch["input_ids"][:, 1].tolist())
        return (self.weight * batch["labels"].float()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@needs_data
def test_a_resumed_run_sees_the_uninterrupted_runs_data_order(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(epochs: int, root: Path, ckpt: str | None = None, saver: ModelCheckpoint | None = None):
        module = _BatchRecorder()
        L.Trainer(
            max_epochs=epochs,
            limit_train_batches=3,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=saver is not None,
            callbacks=[saver] if saver else [],
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(root),
        ).fit(module, stsa_module(), ckpt_path=ckpt)
        return module.seen

    straight = fit(2, tmp_path / "a")
    assert straight[0] != straight[1]
    fit(1, tmp_path / "b", saver=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    resumed = fit(2, tmp_path / "c", ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert list(resumed) == [1] and resumed[1] == straight[1]


@needs_data
@pytest.mark.slow
def test_full_sst2_tokenizes_in_seconds() -> None:
    start = time.perf_counter()
    module = GLUEDataModule(task="sst2", glue_dir=str(DATA))
    module.setup("fit")
    assert (len(module.train_set), len(module.search_set), len(module.dev_set)) == (67_349 - 256, 256, 872)
    assert time.perf_counter() - start < 60


def test_pair_task_from_fixtures() -> None:
    module = GLUEDataModule(task="mnli", glue_dir=str(FIXTURES / "original"), search_size=1, batch_size=2)
    module.setup()
    assert (module.num_labels, module.is_regression, module.spec.name) == (3, False, "mnli")
    assert len(module.train_set) == 2 and len(module.search_set) == 1 and len(module.dev_set) == 2
    batch = next(iter(module.val_dataloader()))
    assert batch["labels"].tolist() == [0, 2]
    assert batch["token_type_ids"].max() == 1  # the hypothesis is segment 1


def test_regression_labels_are_float() -> None:
    module = GLUEDataModule(task="stsb", glue_dir=str(FIXTURES / "hf"), search_size=0)
    module.setup("fit")
    assert (module.num_labels, module.is_regression) == (1, True)
    batch = next(iter(module.train_dataloader()))
    assert batch["labels"].dtype == torch.float32
    assert sorted(batch["labels"].tolist()) == pytest.approx([0.0, 1.75, 4.8])
    with pytest.raises(CoaloraError, match="search_size=0"):
        module.search_dataloader()


def test_validate_stage_reads_dev_only() -> None:
    module = GLUEDataModule(task="rte", glue_dir=str(FIXTURES / "hf"), search_size=1)
    module.setup("validate")
    assert module.train_set is None and len(module.dev_set) == 2
    assert len(module.search_dataloader().dataset) == 1  # built on demand


def test_pad_collator() -> None:
    items = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": torch.tensor(1)},
        {"input_ids": [5], "attention_mask": [1], "labels": torch.tensor(0)},
    ]
    batch = PadCollator(pad_token_id=9)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "token_type_ids" not in batch
    assert batch["labels"].tolist() == [1, 0]


def test_split_search() -> None:
    train, search = split_search(10, 3, seed=0)
    assert len(search) == 3 and sorted(train + search) == list(range(10))
    assert split_search(10, 3, seed=0) == (train, search)
    assert split_search(4, 0, seed=0) == ([0, 1, 2, 3], [])
    with pytest.raises(CoaloraError, match="search_size=4 leaves no training rows"):
        split_search(4, 4, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "sst5"}, "unknown GLUE task"),
        ({"source": "web"}, "unknown data source"),
        ({"batch_size": 0}, "batch_size=0 is too small"),
        ({"train_limit": -1}, "train_limit=-1 is too small"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(CoaloraError, match=match):
        GLUEDataModule(glue_dir=str(FIXTURES / "hf"), **kwargs)


def test_missing_file_and_column(tmp_path: Path) -> None:
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.tsv").write_text("sentence1\tlabel\tidx\nA.\t0\t0\n")
    module = GLUEDataModule(task="rte", glue_dir=str(tmp_path))
    with pytest.raises(CoaloraError, match="no dev split") as info:
        module.prepare_data()
    assert "\n" not in str(info.value)
    with pytest.raises(CoaloraError, match="lacks column 'sentence2'"):
        module.setup("fit")
    missing = GLUEDataModule(task="rte", glue_dir=str(FIXTURES / "hf"), train_file=str(tmp_path / "nope.tsv"))
    with pytest.raises(CoaloraError, match=r"nope\.tsv does not exist"):
        missing.prepare_data()


def test_hyperparameters_and_cli_parsing() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(GLUEDataModule, "data")
    config = parser.parse_args(["--data.task", "rte", "--data.train_limit", "10", "--data.glue_dir", "x"])
    module = GLUEDataModule(**config.data.as_dict())
    assert module.hparams["task"] == "rte" and module.hparams["train_limit"] == 10
    assert module.hparams["search_size"] == 256


def test_epoch_shuffler_skips_once_and_only_in_its_epoch() -> None:
    sampler = EpochShuffler(range(10), seed=3)
    sampler.set_epoch(1)
    order = list(sampler)
    sampler.skip = 4
    assert list(sampler) == order[4:] and list(sampler) == order  # the skip is for one pass
    sampler.skip = 4
    sampler.set_epoch(2)  # a skip set for epoch 1 does not apply to epoch 2
    assert len(list(sampler)) == 10


@pytest.mark.parametrize("step", [2, 4, 6])
def test_a_run_resumed_mid_epoch_continues_the_epochs_batches(
    step: int, glue_dir: Path, tmp_path: Path
) -> None:
    """A step checkpoint mid-epoch (2, 6) or at an epoch's last batch (4): the resumed run trains on the
    batches the uninterrupted run trained on next, not on the epoch's first batches again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root: Path, ckpt: str | None = None, saver: ModelCheckpoint | None = None):
        module = _BatchRecorder()
        data = GLUEDataModule(
            glue_dir=str(glue_dir), train_file="sst2/sentence/stsa.binary.train", search_size=16, batch_size=8
        )
        L.Trainer(
            max_epochs=2,
            limit_train_batches=4,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=saver is not None,
            callbacks=[saver] if saver else [],
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(root),
        ).fit(module, data, ckpt_path=ckpt)
        return [batch for epoch in sorted(module.seen) for batch in module.seen[epoch]]

    saver = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    straight = fit(tmp_path / "a", saver=saver)
    assert len(straight) == 8 and straight[:4] != straight[4:]
    resumed = fit(tmp_path / "b", ckpt=str(tmp_path / "ckpt" / f"step={step}.ckpt"))
    assert resumed == straight[step:]
