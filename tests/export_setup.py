"""The export tests' shared setup: a tiny CoA-LoRA checkpoint with a mapper and B far from zero, its
task, two configurations, a batch and an artifact. Test modules import the fixtures they use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coalora.deploy.export import export
from coalora.pretrained import load_tokenizer
from coalora.quant.options import QuantOption
from coalora.quant.qconfig import QConfig
from coalora.tasks.checkpoint import load_task

TEXTS = ["a gripping , funny and moving film", "the plot is thin and the acting is wooden and far too long"]
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("module_cache")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def ckpt(tiny_models_dir, glue_dir, workdir) -> Path:
    """A CoA-LoRA checkpoint trained 3 steps, with B and the mapper's last layer moved far from zero."""
    import lightning as L

    from coalora.data.glue_datamodule import GLUEDataModule
    from coalora.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    name = str(tiny_models_dir / "tiny-bert")
    module = ClassificationTask(model_name=name, rank=4, train_budgets=[2.5, 3.5, 5.0], eval_budgets=[3.0])
    data = GLUEDataModule(
        task="sst2",
        model_name=name,
        glue_dir=str(glue_dir),
        train_file=str(glue_dir / "sst2" / "sentence" / "stsa.binary.train"),
        train_limit=32,
        eval_limit=16,
        batch_size=8,
        search_size=0,
    )
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=workdir,
    )
    trainer.fit(module, data)
    with torch.no_grad():  # M != I and B != 0, so the fold really matters; a larger head shows it in logits
        torch.nn.init.normal_(module.model.mapper.net[-1].weight, std=0.05)
        for layer in module.model.layers:
            torch.nn.init.normal_(layer.lora_B, std=0.05)
        torch.nn.init.normal_(module.model.backbone.classifier.weight, std=1.0)
    path = workdir / "coalora.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def module(ckpt):
    return load_task(ckpt)


@pytest.fixture(scope="module")
def config(module) -> QConfig:
    return module.eval_configs["3.0"]


@pytest.fixture(scope="module")
def other_config(module, config) -> QConfig:
    """A second configuration (no allocator run): every matrix at 4-bit NF with fp16 scales."""
    return module.model.space.uniform(QuantOption(4, 8, "fp16", 32, 64))


@pytest.fixture(scope="module")
def batch(module) -> dict:
    tokenizer = load_tokenizer(module.hparams.model_name)
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def artifact_dir(module, workdir) -> Path:
    out = workdir / "artifact-3.0"
    export(module, out, budget=3.0)
    return out


@torch.no_grad()
def module_logits(module, batch: dict, config: QConfig | None) -> torch.Tensor:
    return module(batch, config)


def _method_ckpt(path: Path, model_name: str, method: str, **kwargs) -> Path:
    """A checkpoint of another method, built without training (B made non-zero so the adapter matters)."""
    from coalora.tasks.classification import ClassificationTask

    torch.manual_seed(1)
    module = ClassificationTask(model_name=model_name, method=method, rank=4, **kwargs)
    with torch.no_grad():
        for layer in module.model.layers:
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path
