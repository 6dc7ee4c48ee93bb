"""``callbacks.AdapterWarmStart``: a run starts from another run's adapter (issue #24: fp → CoA-LoRA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coalora.cli import main
from coalora.errors import CoaloraError

REPO = Path(__file__).resolve().parents[1]
TINY = "tests/conf/sst2_tiny.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _fit(tmp_path: Path, name: str, model_dir: Path, *extra: str) -> Path:
    out = str(tmp_path / name)
    args = [
        "fit",
        "--config",
        TINY,
        *extra,
        "--model.model_name",
        str(model_dir),
        "--trainer.max_epochs",
        "1",
    ]
    args += ["--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out]
    assert main(args) == 0
    return next((tmp_path / name).rglob("last.ckpt"))


def _warm(checkpoint: Path) -> list[str]:
    return [
        "--trainer.callbacks+=callbacks.AdapterWarmStart",
        "--trainer.callbacks.checkpoint",
        str(checkpoint),
    ]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def fp_checkpoint(tiny_models_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("warm")
    return _fit(tmp, "fp", tiny_models_dir / "tiny-bert", "--config", "configs/baselines/fp.yaml")


def test_coalora_starts_from_the_fp_adapter(fp_checkpoint, tiny_models_dir, tmp_path):
    source = _state(fp_checkpoint)
    # lr 1e-12: the last checkpoint holds what the run started from (AdamW moves a weight by ~lr a step)
    last = _fit(tmp_path, "warm", tiny_models_dir / "tiny-bert", "--model.lr", "1e-12", *_warm(fp_checkpoint))
    warm = _state(last)
    factors = [k for k in source if k.endswith((".lora_A", ".lora_B"))]
    assert factors and any(source[k].abs().sum() > 0 for k in factors if k.endswith("lora_B"))
    for key in source:  # the checkpoint holds the trainables only: factors, pooler and classifier
        torch.testing.assert_close(warm[key], source[key], rtol=0, atol=1e-9)
    assert any(".mapper." in k for k in warm)  # the mapper the fp run lacks keeps its initialisation
    record = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]
    (state,) = [v for k, v in record.items() if k.startswith("AdapterWarmStart")]
    assert state["checkpoint"] == str(fp_checkpoint) and state["copied"] == len(source)


def test_without_the_warm_start_lora_b_starts_at_zero(tiny_models_dir, tmp_path):
    cold = _state(_fit(tmp_path, "cold", tiny_models_dir / "tiny-bert", "--model.lr", "1e-12"))
    assert all(v.abs().max() < 1e-9 for k, v in cold.items() if k.endswith(".lora_B"))


def test_a_missing_checkpoint_is_one_line_before_any_model_loads(tmp_path):
    from callbacks import AdapterWarmStart

    with pytest.raises(CoaloraError, match="does not exist"):
        AdapterWarmStart(str(tmp_path / "nope.ckpt"))


def test_another_rank_is_refused_at_fit_start(fp_checkpoint, tiny_models_dir, tmp_path, capsys):
    out = str(tmp_path / "bad")
    args = ["fit", "--config", TINY, "--model.model_name", str(tiny_models_dir / "tiny-bert")]
    args += [
        "--model.rank",
        "8",
        "--trainer.default_root_dir",
        out,
        "--trainer.logger.init_args.save_dir",
        out,
    ]
    assert main([*args, *_warm(fp_checkpoint)]) != 0
    assert "rank 4, this run 8" in capsys.readouterr().err
    assert not list((tmp_path / "bad").rglob("*.ckpt"))
