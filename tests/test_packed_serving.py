"""Packed serving: artifacts load with their targets still packed (``PackedLoRALinear``), give the dense
path's logits, hold about the artifact's bytes, and ``dequantize=True``/``merge=True`` keep the dense model.

Tasks are built untrained (B and the mapper's last layer moved off zero so the adapter matters) and
exported at a random configuration, which mixes bit widths, block sizes and bf16/fp16/fp32 second-level
scales across the matrices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from coalora.deploy.export import export
from coalora.deploy.loaded import assemble, load
from coalora.deploy.reader import read_artifact
from coalora.errors import CoaloraError
from coalora.nn.lora import LoRALinear, lora_layer
from coalora.nn.packed_lora import PackedLoRALinear
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import fake_quantize, quantize
from tests.tiny_models import untrained_task

TEXTS = ["a gripping , funny and moving film", "the plot is thin and the acting is wooden and far too long"]
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("module_cache")


def _artifact(model_dir: Path, out: Path, causal: bool, seed: int = 0, **task_args) -> Path:
    """An artifact of an untrained CoA-LoRA task at a random configuration (no allocator run)."""
    task, config = untrained_task(model_dir, causal, seed, **task_args)
    export(task, out, qconfig=config)
    return out


@pytest.fixture(scope="module")
def bert_dir(tiny_models_dir, tmp_path_factory) -> Path:
    return _artifact(tiny_models_dir / "tiny-bert", tmp_path_factory.mktemp("packed") / "bert", False)


@pytest.fixture(scope="module")
def llama_dir(tiny_models_dir, tmp_path_factory) -> Path:
    return _artifact(tiny_models_dir / "tiny-llama-lm", tmp_path_factory.mktemp("packed") / "llama", True)


def _batch(deployed) -> dict:
    return dict(deployed.tokenizer(TEXTS, padding=True, return_tensors="pt"))


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (a tied tensor counted once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _targets(model: nn.Module, layer_class: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, layer_class)]


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_packed_logits_equal_the_dequantized_path(which, request):
    folder = request.getfixturevalue(f"{which}_dir")
    packed, dense = load(folder), load(folder, dequantize=True)
    batch = _batch(packed)
    assert len(_targets(packed.model, PackedLoRALinear)) == len(packed.metadata["targets"])
    assert not _targets(dense.model, PackedLoRALinear)
    difference = (packed.logits(batch) - dense.logits(batch)).abs().max()
    assert float(difference) <= ATOL


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_packed_model_holds_no_full_size_target_weight(which, request):
    folder = request.getfixturevalue(f"{which}_dir")
    deployed = load(folder)
    meta = deployed.metadata
    largest_layer = max(out * inp for out, inp in meta["targets"].values()) * 4
    held = _tensor_bytes(deployed.model)
    assert held <= 1.1 * meta["sizes"]["weights"] + largest_layer
    for name, (out, inp) in meta["targets"].items():
        layer = deployed.model.get_submodule(name)
        tensors = [*layer.parameters(), *layer.buffers()]
        assert isinstance(layer, PackedLoRALinear)
        assert not [t for t in tensors if t.is_floating_point() and t.numel() >= out * inp]
        assert _tensor_bytes(layer) <= 0.5 * out * inp * 4  # even 8-bit codes are a quarter of fp32
    dense = load(folder, dequantize=True)  # for scale: the dense model holds every target in fp32
    targets_fp32 = sum(out * inp * 4 for out, inp in meta["targets"].values())
    assert _tensor_bytes(dense.model) >= held + 0.8 * targets_fp32


def test_packed_causal_lm_generates_what_the_dequantized_one_does(llama_dir):
    packed, dense = load(llama_dir), load(llama_dir, dequantize=True)
    texts = packed.generate(["the film", "a small town was"], max_new_tokens=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts == dense.generate(["the film", "a small town was"], max_new_tokens=5)


def test_packed_tied_lm_head_stays_tied(tiny_models_dir, tmp_path):
    folder = _artifact(tiny_models_dir / "tiny-qwen2-lm", tmp_path / "qwen2", True, seed=1)
    packed, dense = load(folder), load(folder, dequantize=True)
    assert packed.model.lm_head.weight is packed.model.model.embed_tokens.weight
    batch = dict(packed.tokenizer(["the river was built in 1901 ."], return_tensors="pt"))
    assert float((packed.logits(batch) - dense.logits(batch)).abs().max()) <= ATOL


def test_a_bf16_causal_lm_serves_packed_in_bf16_like_the_dequantized_one(tiny_models_dir, tmp_path):
    folder = _artifact(tiny_models_dir / "tiny-llama-lm", tmp_path / "bf16", True, dtype="bfloat16")
    packed, dense = load(folder), load(folder, dequantize=True)
    layer = _targets(packed.model, PackedLoRALinear)[0]
    assert layer.lora_A.dtype == torch.bfloat16 and layer.base_weight().dtype == torch.bfloat16
    batch = dict(packed.tokenizer(["the film was"], return_tensors="pt"))
    assert torch.equal(packed.logits(batch), dense.logits(batch))


def test_packed_predict_equals_the_dequantized_predict(bert_dir):
    packed, dense = load(bert_dir), load(bert_dir, dequantize=True)
    got, expected = packed.predict(TEXTS), dense.predict(TEXTS)
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    for a, b in zip(got, expected):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)


def test_dequantize_and_merge_keep_the_dense_model(bert_dir):
    artifact = read_artifact(bert_dir)
    dense = assemble(artifact, dequantize=True)
    layers = _targets(dense, LoRALinear)
    assert layers and not any(isinstance(layer, PackedLoRALinear) for layer in layers)
    name = next(iter(artifact.packed))
    weight = dense.get_submodule(name).weight
    assert torch.equal(weight, artifact.packed[name].dequantize())
    merged = assemble(artifact, merge=True)  # merging needs dense weights: implies dequantize
    assert not _targets(merged, LoRALinear)
    assert isinstance(merged.get_submodule(name), nn.Linear)
    batch = dict(artifact.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        packed_logits = assemble(artifact)(**batch).logits
        assert torch.allclose(merged(**batch).logits, packed_logits, atol=ATOL)


def test_state_dict_names_mirror_the_artifact_and_round_trip(bert_dir):
    artifact = read_artifact(bert_dir)
    model = assemble(artifact)
    state = model.state_dict()
    name = next(iter(artifact.packed))
    for part in ("codes", "scale_codes", "scale2", "offset", "bias", "lora_A", "lora_B"):
        assert f"{name}.{part}" in state
    assert f"{name}.weight" not in state
    assert torch.equal(state[f"{name}.codes"], artifact.packed[name].codes)
    again = assemble(read_artifact(bert_dir))
    again.load_state_dict(state)  # the same keys, shapes and dtypes


def test_an_artifact_missing_a_tensor_is_refused_in_packed_mode(bert_dir):
    artifact = read_artifact(bert_dir)
    name = next(iter(artifact.packed))
    del artifact.full_precision[f"{name}.bias"]
    with pytest.raises(CoaloraError, match=f"misses tensor '{name}.bias'"):
        assemble(artifact)


def test_fp_artifacts_load_dense_as_before(tiny_models_dir, tmp_path):
    from coalora.tasks.classification import ClassificationTask

    torch.manual_seed(4)
    task = ClassificationTask(model_name=str(tiny_models_dir / "tiny-bert"), method="fp", rank=4).eval()
    with torch.no_grad():
        for layer in task.model.layers:
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    export(task, tmp_path / "fp")
    deployed = load(tmp_path / "fp")
    assert _targets(deployed.model, LoRALinear) and not _targets(deployed.model, PackedLoRALinear)
    batch = _batch(deployed)
    with torch.no_grad():
        assert torch.allclose(deployed.logits(batch), task(batch, None), atol=ATOL)


OPTION = QuantOption(3, 4, "bf16", 32, 16)


def _layer(option: QuantOption = OPTION) -> tuple[nn.Linear, PackedLoRALinear]:
    torch.manual_seed(5)
    base = nn.Linear(48, 20)
    a, b = torch.randn(4, 48), torch.randn(20, 4)
    return base, PackedLoRALinear.from_packed(quantize(base.weight, option), base.bias, a, b, 0.5)


def test_packed_layer_computes_the_frozen_dense_layer(tmp_path):
    base, packed = _layer()
    dense_base = nn.Linear(48, 20)
    with torch.no_grad():
        dense_base.weight.copy_(fake_quantize(base.weight, OPTION))
        dense_base.bias.copy_(base.bias)
    dense = LoRALinear.frozen(dense_base, packed.lora_A, packed.lora_B, 0.5)
    x = torch.randn(3, 7, 48)
    assert torch.equal(packed(x), dense(x))
    assert torch.equal(packed.weight, dense.weight)
    merged, dense_merged = packed.merged(), dense.merged()
    assert isinstance(merged, nn.Linear) and torch.equal(merged.weight, dense_merged.weight)
    assert "packed=3-bit nf" in repr(packed)


def test_dtype_casts_leave_the_quantized_format_exact():
    _, packed = _layer()
    expected = packed.packed().dequantize()
    packed.double()
    assert packed.scale2.dtype == torch.bfloat16 and packed.offset.dtype == torch.float32
    assert packed.offset.shape == () and packed.lora_A.dtype == torch.float64
    assert torch.equal(packed.packed().dequantize(), expected)
    assert packed(torch.randn(2, 48, dtype=torch.float64)).dtype == torch.float64
    packed.float()
    assert torch.equal(packed.base_weight(), expected)


def test_lora_layer_builds_a_trainable_packed_layer():
    base = nn.Linear(48, 20)
    layer = lora_layer(base, 4, 8.0, backend="packed", option=OPTION)
    assert isinstance(layer, PackedLoRALinear) and layer.scaling == 2.0
    assert layer.lora_A.requires_grad and not layer.lora_B.any() and not layer.bias.requires_grad
    x = torch.randn(5, 48)
    with torch.no_grad():
        assert torch.allclose(
            layer(x), nn.functional.linear(x, fake_quantize(base.weight, OPTION), base.bias)
        )
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None
    with pytest.raises(CoaloraError, match="option=QuantOption"):
        lora_layer(base, 4, 8.0, backend="packed")
    with pytest.raises(CoaloraError, match="dense, packed"):
        lora_layer(base, 4, 8.0, backend="nope")
