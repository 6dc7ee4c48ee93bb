"""The search callback tests' shared setup: a tiny BERT, a CoA-LoRA module built once and copied, a tiny
SST-2 data module, a fast callback and trainer. Test modules import the fixtures and helpers they use."""

from __future__ import annotations

import hashlib
import json
import os
from copy import deepcopy
from pathlib import Path

import pytest
import torch

from callbacks import ParetoConfigSearch
from coalora.quant.qconfig import QConfig


@pytest.fixture(scope="module")
def tiny_bert(tiny_models_dir, tmp_path_factory) -> str:
    os.environ["COALORA_CACHE"] = str(tmp_path_factory.mktemp("coalora_cache"))
    return str(tiny_models_dir / "tiny-bert")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and far faster when other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_module(model: str, **overrides):
    from coalora.tasks.classification import ClassificationTask

    args = {"model_name": model, "rank": 4, "train_budgets": [2.5, 3.5, 5.0], "eval_budgets": [3.0]}
    return ClassificationTask(**{**args, **overrides})


@pytest.fixture(scope="module")
def pristine(tiny_bert):
    """One CoA-LoRA module built once (allocation takes seconds); tests train deep copies of it."""
    return tiny_module(tiny_bert)


def fresh(module, lr: float | None = None):
    copy = deepcopy(module)
    if lr is not None:
        copy.hparams.lr = lr
    return copy


def tiny_data(model: str, glue_dir: Path):
    from coalora.data.glue_datamodule import GLUEDataModule

    return GLUEDataModule(
        task="sst2",
        model_name=model,
        glue_dir=str(glue_dir),
        train_file=str(Path(glue_dir) / "sst2" / "sentence" / "stsa.binary.train"),
        train_limit=64,
        eval_limit=32,
        batch_size=16,
        search_size=32,
    )


def tiny_callback(**overrides) -> ParetoConfigSearch:
    args = {"score_batches": 2, "score_batch_size": 16, "num_starts": 3, "max_steps": 5, "gp_maxiter": 30}
    # one-epoch runs below exercise a round; the default skips the round after the last epoch
    return ParetoConfigSearch(**{**args, "final_round": True, **overrides})


def trainer(root: Path, callbacks: list, epochs: int, **overrides):
    import lightning as L

    args = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
        "callbacks": callbacks,
    }
    return L.Trainer(**{**args, **overrides})


def set_hash(configs: list[QConfig]) -> str:
    text = json.dumps([c.to_json() for c in configs], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
