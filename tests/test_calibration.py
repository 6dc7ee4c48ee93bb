"""Calibration statistics for activation-aware rounding (issue 24, item 1): H = E[x xᵀ] per input site over
real training tokens, shared within a site, deterministic, cached on disk, on an encoder and a decoder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coalora.data.text_datamodule import TextDataModule
from coalora.errors import CoaloraError
from coalora.nn.model import CoALoRAModel
from coalora.quant.calibration import (
    calibration_batches,
    calibration_indices,
    input_hessians,
    input_sites,
    shared_sites,
    weighted_error,
)
from coalora.quant.calibration_cache import cached_input_hessians, calibration_cache_path
from tests.tiny_models import SENTENCES, tiny_glue_data, untrained_task

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "tests" / "fixtures" / "text_tiny"
MODELS = ("tiny-bert", "tiny-llama-lm")
#: per block: the sites, each a tuple of module types reading one input
SITES = {
    "tiny-bert": [
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    ],
    "tiny-llama-lm": [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ],
}


@pytest.fixture(scope="module")
def models(tiny_models_dir) -> dict[str, CoALoRAModel]:
    """Each tiny backbone in a CoA-LoRA model whose adapter and mapper are off zero."""
    return {
        name: untrained_task(tiny_models_dir / name, causal=name.endswith("-lm"))[0].model for name in MODELS
    }


def _padded_batch(tiny_models_dir: Path, name: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models_dir / name)
    batch = dict(tokenizer(SENTENCES[:3], padding=True, return_tensors="pt"))
    assert (batch["attention_mask"] == 0).any()  # the batch really has padding to drop
    return batch


def _one_by_one(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each example of a padded batch alone, its padding cut off."""
    examples = []
    for i, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        examples.append({k: v[i : i + 1, :length] for k, v in batch.items()})
    return examples


def _captured_hessians(
    model: CoALoRAModel, batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Brute force: every matrix's whole input captured, unpadded batches only, then XᵀX / n."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in model.space.names}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args, n=name: rows[n].append(args[0].reshape(-1, m.in_features))
        )
        for name, layer in zip(model.space.names, model.layers)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(None, **{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, parts in rows.items():
        x = torch.cat(parts).double()
        result[name] = (x.T @ x / len(x)).float()
    return result


def _names(model: CoALoRAModel, block: int, module_types: tuple[str, ...]) -> list[str]:
    by_type = {(t.block_index, t.module_type): t.name for t in model.space.targets}
    return [by_type[(block, kind)] for kind in module_types]


@contextlib.contextmanager
def _perturbed(model: CoALoRAModel, block: int) -> Iterator[None]:
    """The adapter of every matrix in ``block`` moved (as training would), restored afterwards."""
    layers = [layer for t, layer in zip(model.space.targets, model.layers) if t.block_index == block]
    saved = [layer.lora_B.detach().clone() for layer in layers]
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.add_(0.5 * torch.randn(layer.lora_B.shape, generator=generator))
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, b in zip(layers, saved):
                layer.lora_B.copy_(b)


@pytest.mark.parametrize("name", MODELS)
def test_hessian_is_the_mean_outer_product_over_real_tokens(name, models, tiny_models_dir):
    model = models[name]
    batch = _padded_batch(tiny_models_dir, name)
    hessians = input_hessians(model, [batch])
    expected = _captured_hessians(model, _one_by_one(batch))
    assert list(hessians) == model.space.names
    for target, layer in zip(model.space.names, model.layers):
        h = hessians[target]
        assert h.dtype == torch.float32 and h.shape == (layer.in_features, layer.in_features)
        torch.testing.assert_close(h, expected[target], rtol=1e-4, atol=1e-5)
    assert not model.training  # left in the mode it was in


@pytest.mark.parametrize("name", MODELS)
def test_matrices_reading_one_input_share_one_tensor(name, models, tiny_models_dir):
    model = models[name]
    batch = _padded_batch(tiny_models_dir, name)
    hessians = input_hessians(model, [batch])
    blocks = 1 + max(t.block_index for t in model.space.targets)
    expected = {}
    for block in range(blocks):
        for kinds in SITES[name]:
            members = _names(model, block, kinds)
            assert all(hessians[m] is hessians[members[0]] for m in members)
            expected[members[0]] = members
    assert shared_sites(hessians) == expected == input_sites(model, batch)
    assert len({id(h) for h in hessians.values()}) == blocks * len(SITES[name])


@pytest.mark.parametrize("name", MODELS)
def test_adapter_and_configuration_change_only_downstream_statistics(name, models, tiny_models_dir):
    model = models[name]
    batch = _padded_batch(tiny_models_dir, name)
    before = input_hessians(model, [batch])
    first = _names(model, 0, SITES[name][0])[0]  # reads the embeddings: no adapter or quantization before it
    later = _names(model, 1, SITES[name][0])[0]
    with _perturbed(model, block=0):
        trained = input_hessians(model, [batch])
    assert torch.equal(trained[first], before[first])
    assert not torch.allclose(trained[later], before[later], rtol=1e-3)
    config = model.space.random(torch.Generator().manual_seed(3))
    quantized = input_hessians(model, [batch], config)
    assert model.active_config is config
    assert torch.equal(quantized[first], before[first])
    assert not torch.allclose(quantized[later], before[later], rtol=1e-3)
    model.set_config(None)


def test_a_site_whose_sequence_is_reshaped_inside_falls_back_to_every_row(models, tiny_models_dir):
    model = models["tiny-bert"]
    batch = _padded_batch(tiny_models_dir, "tiny-bert")
    masked = input_hessians(model, [batch])
    (name,) = _names(model, 0, ("intermediate.dense",))
    layer = model.layers[model.space.names.index(name)]
    shapes: list[torch.Size] = []
    rows: list[torch.Tensor] = []

    def flatten(module, args):  # as a model packing its tokens inside would: (B·T, in), padding included
        shapes.append(args[0].shape[:-1])
        return (args[0].reshape(-1, module.in_features),)

    handles = [
        layer.register_forward_pre_hook(flatten),
        layer.register_forward_hook(lambda module, args, out: out.view(*shapes.pop(), -1)),
    ]
    try:
        with pytest.warns(UserWarning, match="include padding"):
            hessians = input_hessians(model, [batch])
        handles.append(layer.register_forward_pre_hook(lambda module, args: rows.append(args[0])))
        with torch.no_grad():
            model(None, **batch)
    finally:
        for handle in handles:
            handle.remove()
    x = rows[0].double()
    torch.testing.assert_close(hessians[name], (x.T @ x / len(x)).float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(hessians[name], masked[name], rtol=1e-3)
    others = [n for n in model.space.names if n != name]
    assert all(torch.equal(hessians[n], masked[n]) for n in others)  # every other site still masked


def test_cache_hit_skips_the_forward_and_a_changed_adapter_misses(models, tiny_models_dir, tmp_path):
    model = models["tiny-bert"]
    batch = _padded_batch(tiny_models_dir, "tiny-bert")
    forwards = []
    handle = model.backbone.register_forward_hook(lambda *_: forwards.append(1))
    try:
        fresh = cached_input_hessians(model, [batch], cache_dir=tmp_path)
        computed = len(forwards)
        assert computed > 0 and len(list(tmp_path.glob("calibration-*.safetensors"))) == 1
        cached = cached_input_hessians(model, iter([batch]), cache_dir=tmp_path)
        assert len(forwards) == computed  # read from disk, the model never ran
        assert list(cached) == list(fresh) and all(torch.equal(cached[n], fresh[n]) for n in fresh)
        assert shared_sites(cached) == shared_sites(fresh)  # one tensor per site, also from the file
        (file,) = tmp_path.glob("calibration-*.safetensors")
        file.write_bytes(b"not a safetensors file")  # a damaged cache is recomputed and rewritten
        again = cached_input_hessians(model, [batch], cache_dir=tmp_path)
        assert len(forwards) == 2 * computed and all(torch.equal(again[n], fresh[n]) for n in fresh)
        computed = len(forwards)
        with _perturbed(model, block=0):
            trained = cached_input_hessians(model, [batch], cache_dir=tmp_path)
            assert len(forwards) > computed
        later = _names(model, 1, SITES["tiny-bert"][0])[0]
        assert not torch.equal(trained[later], fresh[later])
    finally:
        handle.remove()
    path = calibration_cache_path(model, [batch], cache_dir=tmp_path)
    config = model.space.random(torch.Generator().manual_seed(3))
    fewer = {k: v[:2] for k, v in batch.items()}
    assert calibration_cache_path(model, [batch], config, cache_dir=tmp_path) != path
    assert calibration_cache_path(model, [fewer], cache_dir=tmp_path) != path
    assert len(list(tmp_path.glob("calibration-*.safetensors"))) == 2
    scalings = [layer.scaling for layer in model.layers]
    for layer in model.layers:  # the adapter switched off by its scaling, its parameters unchanged
        layer.scaling = 0.0
    assert calibration_cache_path(model, [batch], cache_dir=tmp_path) != path
    for layer, scaling in zip(model.layers, scalings):
        layer.scaling = scaling
    assert calibration_cache_path(model, [batch], cache_dir=tmp_path) == path


def test_the_rounding_of_a_quantized_base_is_part_of_the_key(models, tiny_models_dir, tmp_path):
    model = models["tiny-bert"]
    if not hasattr(model, "set_rounding"):
        pytest.skip("this model has one rounding only")
    batch = _padded_batch(tiny_models_dir, "tiny-bert")
    config = model.space.random(torch.Generator().manual_seed(3))
    nearest = calibration_cache_path(model, [batch], config, cache_dir=tmp_path)
    full_precision = calibration_cache_path(model, [batch], cache_dir=tmp_path)
    hessians = input_hessians(model, [batch])
    try:
        model.set_rounding("gptq", hessians)
        gptq = calibration_cache_path(model, [batch], config, cache_dir=tmp_path)
        assert gptq != nearest
        assert calibration_cache_path(model, [batch], cache_dir=tmp_path) == full_precision  # no rounding
        doubled = {name: 2 * h for name, h in hessians.items()}
        model.set_rounding("gptq", doubled)
        assert calibration_cache_path(model, [batch], config, cache_dir=tmp_path) != gptq
    finally:
        model.set_rounding("nearest")
    assert calibration_cache_path(model, [batch], config, cache_dir=tmp_path) == nearest


def test_calibration_rows_are_training_rows_never_search_rows(tiny_models_dir, glue_dir):
    data = tiny_glue_data(tiny_models_dir / "tiny-bert", glue_dir, search_size=16, train_limit=None)
    indices = calibration_indices(data, n_examples=40, seed=0)
    assert len(set(indices)) == 40 and indices == calibration_indices(data, n_examples=40, seed=0)
    rows = {data.train_indices[i] for i in indices}  # positions in the training file
    assert data.search_indices and rows.isdisjoint(data.search_indices)
    batches = calibration_batches(data, n_examples=40, seed=0, batch_size=8)
    assert sum(len(b["input_ids"]) for b in batches) == 40
    examples = [
        ids[mask.bool()].tolist() for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])
    ]
    assert examples == [data.train_set.features["input_ids"][i] for i in indices]
    again = calibration_batches(data, n_examples=40, seed=0, batch_size=8)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)
    assert len(calibration_indices(data, n_examples=10_000)) == len(data.train_set)  # at most all rows
    assert calibration_indices(data, n_examples=40) == calibration_indices(data, 40, seed=data.hparams.seed)
    with pytest.raises(CoaloraError, match="n_examples"):
        calibration_indices(data, n_examples=0)


def test_encoder_statistics_are_deterministic_across_calls(models, tiny_models_dir, glue_dir):
    model = models["tiny-bert"]
    data = tiny_glue_data(tiny_models_dir / "tiny-bert", glue_dir, search_size=16, train_limit=None)
    first = input_hessians(model, calibration_batches(data, n_examples=24, seed=1))
    second = input_hessians(model, calibration_batches(data, n_examples=24, seed=1))
    assert all(torch.equal(first[n], second[n]) for n in model.space.names)


def test_decoder_calibrates_on_unpadded_training_blocks(models, tiny_models_dir):
    model = models["tiny-llama-lm"]
    data = TextDataModule(
        model_name=str(tiny_models_dir / "tiny-llama-lm"),
        train_files=[str(TEXT / "train.txt")],
        val_files=[str(TEXT / "valid.jsonl")],
        block_size=16,
        search_blocks=4,
    )
    batches = calibration_batches(data, n_examples=6, seed=0, batch_size=4)
    assert [len(b["input_ids"]) for b in batches] == [4, 2]
    assert data.train_set is not None and data.search_set is not None
    train = {tuple(row.tolist()) for row in data.train_set.blocks}
    search = {tuple(row.tolist()) for row in data.search_set.blocks}
    used = [tuple(row.tolist()) for b in batches for row in b["input_ids"]]
    assert all(b["attention_mask"].all() for b in batches)
    assert set(used) <= train and set(used).isdisjoint(search)
    first = input_hessians(model, batches)
    second = input_hessians(model, calibration_batches(data, n_examples=6, seed=0, batch_size=4))
    assert all(torch.equal(first[n], second[n]) for n in model.space.names)


def test_weighted_error_is_the_mean_squared_output_error():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 8, generator=generator)
    dequantized = weight + 0.1 * torch.randn(5, 8, generator=generator)
    x = torch.randn(50, 8, generator=generator)
    hessian = x.T @ x / len(x)
    per_token = ((x @ (weight - dequantized).T) ** 2).sum(dim=1).mean()
    assert weighted_error(weight, dequantized, hessian) == pytest.approx(float(per_token), rel=1e-5)
    assert weighted_error(weight, weight, hessian) == 0.0
    frobenius = float(((weight - dequantized) ** 2).sum())
    assert weighted_error(weight, dequantized, torch.eye(8)) == pytest.approx(frobenius, rel=1e-6)
    with pytest.raises(CoaloraError, match="shape"):
        weighted_error(weight, dequantized, torch.eye(5))


def test_no_batches_is_refused(models):
    with pytest.raises(CoaloraError, match="no calibration batches"):
        input_hessians(models["tiny-bert"], [])
