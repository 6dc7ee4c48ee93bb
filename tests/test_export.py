"""Adapt and export: artifacts, loading, in-process switching, PEFT interop and other methods' exports."""

from __future__ import annotations

import json

import pytest
import torch

from coalora.deploy.adaptive import AdaptiveModel
from coalora.deploy.export import export
from coalora.deploy.layout import ADAPTER_FILE, FULL_PRECISION_FILE, METADATA_FILE, QUANTIZED_FILE
from coalora.deploy.loaded import assemble, load
from coalora.deploy.reader import read_artifact
from coalora.deploy.sizes import packed_nbytes
from coalora.errors import CoaloraError
from coalora.pretrained import load_tokenizer
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import fake_quantize
from coalora.quant.targets import target_weights
from coalora.tasks.checkpoint import load_task
from tests.export_setup import (  # noqa: F401 (fixtures)
    ATOL,
    TEXTS,
    _method_ckpt,
    artifact_dir,
    batch,
    ckpt,
    config,
    module,
    module_logits,
    other_config,
    workdir,
)

pytestmark = pytest.mark.usefixtures("module_cache")


# ------------------------------------------------------------------------------------- artifact logits


@pytest.mark.parametrize("merge", [False, True])
def test_artifact_logits_equal_the_training_model_under_its_configuration(
    module, config, other_config, batch, artifact_dir, merge
):
    expected = module_logits(module, batch, config)
    got = load(artifact_dir, merge=merge).logits(batch)
    assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()
    # the comparison can fail: another configuration, or the adapter without M, gives other logits
    assert (module_logits(module, batch, other_config) - expected).abs().max() > 100 * ATOL
    artifact = read_artifact(artifact_dir)
    names = module.model.space.names
    artifact.adapter = {n: (layer.lora_A, layer.lora_B) for n, layer in zip(names, module.model.layers)}
    with torch.no_grad():
        unfolded = assemble(artifact, merge)(**batch).logits
    assert (unfolded - expected).abs().max() > 100 * ATOL


def test_artifact_adapter_is_the_folded_b_times_m(module, config, artifact_dir):
    artifact = read_artifact(artifact_dir)
    adjustments = module.model.adjustments(config).detach()
    for i, (name, layer) in enumerate(zip(module.model.space.names, module.model.layers)):
        lora_a, lora_b = artifact.adapter[name]
        assert torch.equal(lora_a, layer.lora_A.detach())
        mixer = torch.eye(len(adjustments[i])) + adjustments[i]
        assert torch.allclose(lora_b, layer.lora_B.detach() @ mixer, atol=1e-6)
        assert (lora_b - layer.lora_B.detach()).abs().max() > 1e-3  # M is far from I


def test_artifact_keeps_packed_weights_that_dequantize_to_the_training_weights(module, config, artifact_dir):
    artifact = read_artifact(artifact_dir)
    weights = target_weights(module.model.backbone, module.model.space.targets)
    assert artifact.qconfig == config
    for name, packed in artifact.packed.items():
        assert packed.codes.dtype == torch.uint8 and packed.scale_codes.dtype == torch.uint8
        assert torch.equal(packed.dequantize(), fake_quantize(weights[name], config.matrices[name]))


def test_artifact_size_matches_avg_bits_and_the_full_precision_parts(module, config, artifact_dir):
    meta = json.loads((artifact_dir / METADATA_FILE).read_text())
    space = module.model.space
    state = module.model.backbone.state_dict()
    lora = sum(state[f"{n}.lora_{p}"].numel() * 4 for n in space.names for p in "AB")
    full = sum(v.numel() * 4 for k, v in state.items() if not k.endswith(("lora_A", "lora_B"))) - sum(
        t.numel * 4 for t in space.targets
    )
    predicted = space.avg_bits(config) * space.total_numel / 8 + full + lora
    on_disk = sum(
        (artifact_dir / f).stat().st_size for f in (QUANTIZED_FILE, ADAPTER_FILE, FULL_PRECISION_FILE)
    )
    assert abs(on_disk - predicted) <= 0.02 * predicted
    # the packed payload is exactly what the options promise, and within 2% of avg_bits alone
    exact = sum(packed_nbytes(config.matrices[t.name], t.numel) for t in space.targets)
    assert meta["sizes"]["quantized"] == exact
    assert abs(exact - space.avg_bits(config) * space.total_numel / 8) <= 0.02 * exact
    assert meta["sizes"]["adapter"] == lora and meta["avg_bits"] == pytest.approx(space.avg_bits(config))
    assert meta["label_names"] == ["negative", "positive"] and meta["fingerprint"] == module.fingerprint


@pytest.mark.parametrize(
    "option",
    [
        QuantOption(2, 2, "bf16", 64, 256),
        QuantOption(3, 4, "fp16", 16, 16),
        QuantOption(8, 8, "fp32", 32, 64),
    ],
)
def test_packed_nbytes_is_exact(option):
    from coalora.quant.quantizer import quantize

    weight = torch.randn(37, 53)  # no multiple of any block size
    assert quantize(weight, option).nbytes == packed_nbytes(option, weight.numel())


def test_predict_gives_labels_and_probabilities_from_raw_text(artifact_dir, batch):
    model = load(artifact_dir)
    predictions = model.predict(TEXTS)
    probs = model.logits(batch).softmax(-1)
    assert [p["label"] for p in predictions] == [["negative", "positive"][int(i)] for i in probs.argmax(-1)]
    for p, row in zip(predictions, probs):
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["probability"] == pytest.approx(float(row.max()), abs=1e-6)


def test_reexport_replaces_a_previous_artifact(module, workdir, artifact_dir):
    out = workdir / "again"
    export(module, out, budget=3.0)
    export(module, out, budget=3.0)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in artifact_dir.iterdir())
    assert not [p for p in workdir.iterdir() if p.name.startswith(".again.")]  # no temporary leftovers


# ---------------------------------------------------------------------------------------- byte budgets


def test_byte_budget_picks_the_configuration_that_fits(module, workdir, artifact_dir):
    weights_at_3 = json.loads((artifact_dir / METADATA_FILE).read_text())["sizes"]["weights"]
    roomy = export(module, workdir / "bytes", max_bytes=weights_at_3 + 2000)
    assert weights_at_3 < roomy.metadata["sizes"]["weights"] <= weights_at_3 + 2000
    assert roomy.metadata["avg_bits"] > 3.0 and "byte budget" in roomy.metadata["configuration"]
    tight = export(module, workdir / "bytes-tight", max_bytes=weights_at_3)  # the 3.0-bit model just fits
    assert weights_at_3 - 64 <= tight.metadata["sizes"]["weights"] <= weights_at_3
    assert tight.metadata["avg_bits"] < roomy.metadata["avg_bits"]
    loaded = load(workdir / "bytes-tight")
    assert loaded.metadata["budget"] == tight.resolution.budget


def test_byte_budget_nothing_fits(module, workdir):
    with pytest.raises(CoaloraError, match=r"no configuration fits.*raise --max-bytes"):
        export(module, workdir / "nothing", max_bytes=1_000_000)
    assert not (workdir / "nothing").exists()


# -------------------------------------------------------------------------------------- in-process serve


@pytest.mark.parametrize("threads", [1, 2])
def test_adaptive_model_switches_configurations_like_the_module(
    ckpt, module, config, other_config, batch, workdir, threads
):
    served = AdaptiveModel.from_checkpoint(ckpt, threads=threads)
    assert served.threads == threads
    path = workdir / "other.json"
    other_config.save(path)
    for target, expected_config in ((3.0, config), (path, other_config), (config, config)):
        got_config = served.adapt(target)
        assert got_config == expected_config
        assert torch.allclose(served.logits(batch), module_logits(module, batch, expected_config), atol=ATOL)
    assert set(served.last_timings) == {"resolve", "quantize", "mapper"}
    misses = served.module.model.cache.misses
    served.adapt(other_config)  # seen before: nothing is quantized again
    assert served.module.model.cache.misses == misses
    assert [p["label"] for p in served.predict(TEXTS)] == [
        ["negative", "positive"][int(i)] for i in served.logits(batch).argmax(-1)
    ]


def test_adaptive_model_serves_from_a_packed_cache_with_the_same_logits(ckpt, config, other_config, batch):
    dense, packed = (
        AdaptiveModel.from_checkpoint(ckpt),
        AdaptiveModel.from_checkpoint(ckpt, cache_mode="packed"),
    )
    for target in (config, other_config, config):
        dense.adapt(target)
        packed.adapt(target)
        assert torch.equal(packed.logits(batch), dense.logits(batch))
    caches = dense.module.model.cache, packed.module.model.cache
    assert packed.module.model.cache.packed and caches[1].misses == caches[0].misses
    assert caches[1].nbytes < 0.4 * caches[0].nbytes  # codes of <= 8 bits against fp32 weights


def test_adaptive_model_export_matches_its_live_logits(ckpt, other_config, batch, workdir):
    served = AdaptiveModel.from_checkpoint(ckpt)
    served.adapt(other_config)
    live = served.logits(batch)
    served.adapt(3.0)
    served.export(other_config, workdir / "served")
    assert torch.allclose(load(workdir / "served").logits(batch), live, atol=ATOL)
    assert served.config is not None and served.avg_bits == pytest.approx(3.0, abs=1e-3)  # live one unchanged


def test_adaptive_model_rejects_an_unknown_target(ckpt):
    with pytest.raises(CoaloraError, match="cannot adapt to a dict"):
        AdaptiveModel.from_checkpoint(ckpt).adapt({"bits": 3})


# ------------------------------------------------------------------------------------------------ peft


def test_peft_export_runs_in_plain_peft_with_the_same_logits(module, config, batch, workdir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = workdir / "peft"
    export(module, out, budget=3.0, format="peft")
    base = AutoModelForSequenceClassification.from_pretrained(out / "base")
    with torch.no_grad():  # the head must come from the adapter (modules_to_save), not from the base
        base.classifier.weight.normal_()
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        got = model(**batch).logits
    assert torch.allclose(got, module_logits(module, batch, config), atol=ATOL)
    keys = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in k for k in keys) and sum("lora_A" in k for k in keys) == len(
        module.model.space
    )


# -------------------------------------------------------------------------------------- other methods


def test_checkpoint_of_another_backbone_is_refused(ckpt, tmp_path):
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["coalora"]["fingerprint"] = "0" * 16
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(CoaloraError, match="trained on another backbone"):
        load_task(tmp_path / "other.ckpt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"not a zip")
    with pytest.raises(CoaloraError, match="cannot read checkpoint"):
        load_task(tmp_path / "x.ckpt")
    with pytest.raises(CoaloraError, match="does not exist"):
        load_task(tmp_path / "y.ckpt")


@pytest.mark.parametrize("method", ["qlora", "lqlora"])
def test_single_configuration_methods_export_only_their_own(
    method, module, config, other_config, batch, tiny_models_dir, tmp_path
):
    own = tmp_path / "own.json"
    config.save(own)
    path = _method_ckpt(tmp_path / "m.ckpt", str(tiny_models_dir / "tiny-bert"), method, qconfig=str(own))
    trained = load_task(path)
    report = export(trained, tmp_path / "out")  # no configuration given: its own
    assert report.resolution.source == "its own configuration"
    expected = module_logits(trained, batch, trained.train_configs[0])
    assert torch.allclose(load(tmp_path / "out").logits(batch), expected, atol=ATOL)
    export(trained, tmp_path / "same", qconfig=own)  # asking for it explicitly is fine
    with pytest.raises(CoaloraError, match=f"{method} adapter trained for one configuration"):
        export(trained, tmp_path / "other", qconfig=other_config)
    served = AdaptiveModel.from_checkpoint(path)
    assert torch.allclose(served.logits(batch), expected, atol=ATOL)
    with pytest.raises(CoaloraError, match="needs its own adapter"):
        served.adapt(other_config)


def test_fp_checkpoint_serves_full_precision_and_any_configuration_post_training(
    tiny_models_dir, batch, other_config, tmp_path
):
    """fine-tune, then quantize: with no configuration an fp checkpoint exports full precision; with one,
    its adapter over the base quantized at that configuration (round-to-nearest here)."""
    path = _method_ckpt(tmp_path / "fp.ckpt", str(tiny_models_dir / "tiny-bert"), "fp")
    trained = load_task(path)
    report = export(trained, tmp_path / "out")
    assert report.metadata["avg_bits"] == 32.0 and not (tmp_path / "out" / QUANTIZED_FILE).exists()
    assert report.metadata["predicted_weights"] == report.metadata["sizes"]["weights"]
    expected = module_logits(trained, batch, None)
    assert torch.allclose(load(tmp_path / "out").logits(batch), expected, atol=ATOL)
    quantized = export(trained, tmp_path / "q", qconfig=other_config)
    assert quantized.metadata["rounding"] == "nearest" and (tmp_path / "q" / QUANTIZED_FILE).exists()
    at_config = module_logits(trained, batch, other_config)
    assert (at_config - expected).abs().max() > 20 * ATOL  # the quantized base shows
    assert torch.allclose(load(tmp_path / "q").logits(batch), at_config, atol=ATOL)
    served = AdaptiveModel.from_checkpoint(path)
    served.adapt(other_config)
    assert torch.allclose(served.logits(batch), at_config, atol=ATOL)


def test_shared_checkpoint_serves_any_configuration(
    module, config, other_config, batch, tiny_models_dir, tmp_path
):
    from coalora.tasks.classification import ClassificationTask

    torch.manual_seed(2)
    shared = ClassificationTask(
        model_name=str(tiny_models_dir / "tiny-bert"), method="shared", rank=4, eval_budgets=[]
    )
    shared.eval_configs, shared.train_configs = {"3.0": config}, [config]
    with torch.no_grad():
        for layer in shared.model.layers:
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    checkpoint = {"state_dict": shared.state_dict(), "hyper_parameters": dict(shared.hparams)}
    shared.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "shared.ckpt")
    trained = load_task(tmp_path / "shared.ckpt")
    with pytest.raises(CoaloraError, match="choose one with --budget"):
        export(trained, tmp_path / "none")
    export(trained, tmp_path / "out", qconfig=other_config)
    expected = module_logits(trained, batch, other_config)
    assert torch.allclose(load(tmp_path / "out").logits(batch), expected, atol=ATOL)


@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_other_backbones_round_trip_through_artifact_and_peft(kind, tiny_models_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from coalora.tasks.classification import ClassificationTask

    name = str(tiny_models_dir / f"tiny-{kind}")
    torch.manual_seed(3)
    module = ClassificationTask(model_name=name, rank=4, train_budgets=[], eval_budgets=[]).eval()
    with torch.no_grad():
        torch.nn.init.normal_(module.model.mapper.net[-1].weight, std=0.05)
        for layer in module.model.layers:
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    config = module.model.space.uniform(QuantOption(3, 4, "fp16", 32, 64))
    batch = dict(load_tokenizer(name)(TEXTS, padding=True, return_tensors="pt"))
    expected = module_logits(module, batch, config)
    export(module, tmp_path / "artifact", qconfig=config)
    assert torch.allclose(load(tmp_path / "artifact").logits(batch), expected, atol=ATOL)
    export(module, tmp_path / "peft", qconfig=config, format="peft")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "peft" / "base")
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()(**batch).logits
    assert torch.allclose(got, expected, atol=ATOL)
