"""``rounding: nearest | gptq`` wherever a configuration is quantized (issue #24, items 2-4): the weight
cache, training, checkpoints, evaluate, adapt, AdaptiveModel and the artifact agree on the codes."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from coalora.cli import main
from coalora.deploy import load
from coalora.deploy.adaptive import AdaptiveModel
from coalora.deploy.export import export
from coalora.errors import CoaloraError
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import fake_quantize, quantize
from coalora.quant.rounding import Rounder
from coalora.tasks.checkpoint import load_task
from coalora.tasks.classification import ClassificationTask
from tests.tiny_models import tiny_glue_data

OPTION = QuantOption(3, 8, "fp16", 64, 256)


def test_nearest_rounder_is_the_plain_quantizer_and_gptq_needs_statistics():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    nearest = Rounder("nearest")
    assert torch.equal(nearest.dense("w", weight, OPTION), fake_quantize(weight, OPTION))
    assert torch.equal(nearest.packed("w", weight, OPTION).codes, quantize(weight, OPTION).codes)
    gptq = Rounder("gptq")
    assert not gptq.ready
    with pytest.raises(CoaloraError, match="calibration statistics"):
        gptq.dense("w", weight, OPTION)
    with pytest.raises(CoaloraError, match="rounding must be one of nearest, gptq"):
        Rounder("stochastic")  # type: ignore[arg-type]


def test_gptq_rounder_keeps_the_bytes_and_lowers_the_activation_weighted_error():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=generator)
    inputs = torch.randn(512, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    hessian = inputs.T @ inputs / len(inputs)
    gptq = Rounder("gptq", hessians={"w": hessian})
    packed, dense = gptq.packed("w", weight, OPTION), gptq.dense("w", weight, OPTION)
    assert torch.equal(packed.dequantize(), dense)
    assert packed.nbytes == quantize(weight, OPTION).nbytes

    def error(q: torch.Tensor) -> float:
        e = weight - q
        return float(torch.trace(e @ hessian @ e.T))

    assert error(dense) < 0.7 * error(fake_quantize(weight, OPTION))


def _task(tiny_models_dir, **kwargs) -> ClassificationTask:
    torch.manual_seed(0)
    args = dict(model_name=str(tiny_models_dir / "tiny-bert"), rank=4, lr=1e-2, method="qlora")
    return ClassificationTask(**{**args, "train_budget": 3.0, **kwargs})


def test_a_run_trained_under_gptq_serves_the_codes_it_trained_on(tiny_models_dir, glue_dir, tmp_path):
    """Training rounds once, with the base model's statistics; loading the checkpoint recomputes exactly
    those (adapter off), so evaluation, AdaptiveModel and the artifact use the training weights."""
    task = _task(tiny_models_dir, rounding="gptq", calibration_examples=16)
    data = tiny_glue_data(tiny_models_dir / "tiny-bert", glue_dir, train_limit=32, search_size=0)
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        default_root_dir=tmp_path, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(task, data)
    (config,) = task.train_configs
    task.activate(config)
    trained_weights = [layer.active_weight.clone() for layer in task.model.layers]
    nearest = [
        fake_quantize(layer.weight, config.matrices[n])
        for n, layer in zip(task.model.space.names, task.model.layers)
    ]
    assert not all(torch.equal(a, b) for a, b in zip(trained_weights, nearest))
    path = tmp_path / "gptq.ckpt"
    trainer.save_checkpoint(path)

    loaded = load_task(path)
    assert loaded.model.rounder.method == "gptq"
    loaded.activate(config)
    for kept, layer in zip(trained_weights, loaded.model.layers):
        assert torch.equal(layer.active_weight, kept)
    batch = {
        "input_ids": torch.randint(1000, 2000, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    expected = loaded(batch, config)
    export(loaded, tmp_path / "art")
    assert json.loads((tmp_path / "art" / "coalora.json").read_text())["rounding"] == "gptq"
    assert torch.allclose(load(tmp_path / "art").logits(batch), expected, atol=1e-5)
    served = AdaptiveModel.from_checkpoint(path)
    assert torch.allclose(served.logits(batch), expected, atol=1e-5)
    as_nearest = load_task(path, rounding="nearest")  # for comparison: the same adapter, RTN codes
    as_nearest.activate(config)
    assert torch.equal(as_nearest.model.layers[0].active_weight, nearest[0])


def _fit_fp(tiny_models_dir, glue_dir, tmp_path) -> str:
    from tests.test_cli import BASE_CONFIGS, _tiny_args

    args = ["fit", "--config", BASE_CONFIGS[0], "--config", "configs/baselines/fp.yaml"]
    args += _tiny_args(tiny_models_dir, glue_dir, tmp_path)
    assert main([*args, "--trainer.max_steps", "2", "--trainer.max_epochs", "1"]) == 0
    return str(next((tmp_path / "run").rglob("last.ckpt")))


def test_an_fp_checkpoint_is_evaluated_post_training_at_budgets_under_both_roundings(
    tiny_models_dir, glue_dir, tmp_path, monkeypatch
):
    from tests.test_cli import REPO

    monkeypatch.chdir(REPO)
    ckpt = _fit_fp(tiny_models_dir, glue_dir, tmp_path)
    rows = {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / f"eval-{rounding}"
        common = ["--eval-limit", "16", "--glue-dir", str(glue_dir), "--out", str(out)]
        argv = ["evaluate", "--ckpt", ckpt, "--budgets", "2.5", "3.0", "--rounding", rounding, *common]
        assert main(argv) == 0
        rows[rounding] = json.loads((out / "eval.json").read_text())["results"]
    assert [(r["kind"], r["label"]) for r in rows["gptq"]] == [
        ("fp", "fp"),
        ("budget", "2.5"),
        ("budget", "3.0"),
    ]
    assert {r["run"] for r in rows["gptq"]} == {"fp-gptq"} and {r["run"] for r in rows["nearest"]} == {"fp"}
    assert all(r["rounding"] == "gptq" for r in rows["gptq"])
    assert rows["gptq"][0]["loss"] == pytest.approx(rows["nearest"][0]["loss"])  # full precision: no rounding
    assert rows["gptq"][1]["loss"] != pytest.approx(rows["nearest"][1]["loss"], rel=1e-6)


def test_bad_rounding_arguments_are_refused_in_one_line(tiny_models_dir):
    with pytest.raises(CoaloraError, match=r"model\.rounding must be one of nearest, gptq"):
        _task(tiny_models_dir, rounding="magic")
    with pytest.raises(CoaloraError, match="does not apply to lqlora"):
        _task(tiny_models_dir, method="lqlora", rounding="gptq")
    with pytest.raises(CoaloraError, match="calibration_examples"):
        _task(tiny_models_dir, calibration_examples=0)
