"""The configuration-aware LoRA layer, the mapper and configuration switching (SPEC §3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coalora.nn.lora import LoRALinear
from coalora.nn.mapper import ConfigMapper
from coalora.nn.model import CoALoRAModel
from coalora.pretrained import load_classifier
from coalora.quant.lqlora import lqlora_decompose
from coalora.quant.options import NF4_DOUBLE_QUANT, QuantOption
from coalora.quant.quantizer import fake_quantize


@pytest.fixture
def tiny(tiny_models_dir) -> CoALoRAModel:
    torch.manual_seed(0)
    name = str(tiny_models_dir / "tiny-bert")
    model = CoALoRAModel(load_classifier(name, num_labels=2), name, rank=4, alpha=8)
    for layer in model.layers:
        nn.init.normal_(layer.lora_B, std=0.1)
    nn.init.normal_(model.mapper.net[-1].weight, std=0.05)
    return model


def _batch(n: int = 3, length: int = 7) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(1000, 2000, (n, length), generator=gen),
        "attention_mask": torch.ones(n, length),
    }


def test_layer_with_zero_adjustment_is_plain_lora_on_the_quantized_base():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, rank=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    option = QuantOption(3, 4, "bf16", 16, 16)
    layer.active_weight = fake_quantize(base.weight, option)
    x = torch.randn(5, 32)
    expected = x @ layer.active_weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.adjustment = torch.zeros(4, 4)  # M = I
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_folded_adapter_equals_the_unfolded_layer():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), rank=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    adjustment = 0.3 * torch.randn(4, 4)
    layer.adjustment = adjustment
    x = torch.randn(5, 32)
    folded_b = layer.folded_B(adjustment)
    assert torch.allclose(folded_b, layer.lora_B @ (torch.eye(4) + adjustment), atol=1e-6)
    folded = x @ layer.weight.T + layer.bias + layer.scaling * (x @ layer.lora_A.T @ folded_b.T)
    assert torch.allclose(layer(x), folded, atol=1e-5)


def test_a_small_adjustment_survives_bf16_autocast():
    """M = I + D formed in bf16 rounds 1 + 0.003 to 1.0; the layer must keep D in the forward pass."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), rank=8, alpha=16)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x)
        layer.adjustment = 0.003 * torch.eye(8)
        adjusted = layer(x)
        bf16_mixer = torch.eye(8, dtype=torch.bfloat16) + layer.adjustment.to(torch.bfloat16)
    assert torch.equal(bf16_mixer, torch.eye(8, dtype=torch.bfloat16))  # the rounding the fix avoids
    lora_plain = (adjusted - plain).float()
    assert lora_plain.abs().max() > 0  # the adjustment reaches the output
    # and by about the right amount: s·B·(0.003·A·x), measured in fp32
    expected = layer.scaling * 0.003 * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.corrcoef(torch.stack([lora_plain.flatten(), expected.flatten()]))[0, 1] > 0.5


def test_mapper_is_fp32_under_bf16_autocast():
    mapper = ConfigMapper(rank=8, num_blocks=2, num_types=3)
    options = torch.zeros(6, 5, dtype=torch.long)
    blocks, types = torch.arange(6) % 2, torch.arange(6) % 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = mapper(options, blocks, types)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, mapper(options, blocks, types))


def test_mapper_starts_near_identity_and_has_the_papers_size():
    mapper = ConfigMapper(rank=64, num_blocks=24, num_types=6)
    options = torch.zeros(144, 5, dtype=torch.long)
    adjustments = mapper(options, torch.arange(144) % 24, torch.arange(144) % 6)
    assert adjustments.shape == (144, 64, 64)
    assert adjustments.abs().max() < 0.05  # M = I + D starts near I
    assert 500_000 < sum(p.numel() for p in mapper.parameters()) < 560_000


def test_every_module_type_gets_its_own_embedding(tiny):
    types = tiny.types
    assert "attention.output.dense" in types and "output.dense" in types
    assert len(set(tiny.type_ids.tolist())) == len(types) == 6


def test_gradients_reach_mapper_lora_and_head_but_not_the_base(tiny):
    config = tiny.space.uniform(QuantOption(2, 4, "fp16", 32, 64))
    out = tiny(config, **_batch()).logits
    out.sum().backward()
    assert tiny.mapper.net[-1].weight.grad is not None and tiny.mapper.alpha.grad is not None
    assert all(layer.lora_A.grad is not None and layer.lora_B.grad is not None for layer in tiny.layers)
    assert tiny.backbone.classifier.weight.grad is not None
    assert all(layer.weight.grad is None and not layer.weight.requires_grad for layer in tiny.layers)
    assert tiny.backbone.bert.embeddings.word_embeddings.weight.grad is None


def test_configuration_switch_equals_quantizing_from_scratch(tiny, tiny_models_dir):
    gen = torch.Generator().manual_seed(3)
    a, b = tiny.space.random(gen), tiny.space.random(gen)
    batch = _batch()
    tiny.eval()
    with torch.no_grad():
        tiny(a, **batch)
        switched = tiny(b, **batch).logits  # a -> b through the cache
        for layer, name in zip(tiny.layers, tiny.space.names, strict=True):
            assert torch.equal(layer.active_weight, fake_quantize(layer.weight, b.matrices[name]))
        tiny.cache.clear()
        tiny.set_config(None)
        recomputed = tiny(b, **batch).logits
    assert torch.equal(switched, recomputed)


def test_unchanged_options_are_not_requantized(tiny):
    config = tiny.space.uniform(NF4_DOUBLE_QUANT)
    tiny.set_config(config)
    misses = tiny.cache.misses
    tiny.set_config(tiny.space.uniform(NF4_DOUBLE_QUANT))
    assert tiny.cache.misses == misses and tiny.cache.hits == 0
    tiny.set_config(tiny.space.uniform(QuantOption(2, 2, "bf16", 64, 256)))
    tiny.set_config(config)
    assert tiny.cache.hits == len(tiny.layers)


def test_cache_respects_its_memory_bound():
    from coalora.nn.weight_cache import QuantCache

    weight = torch.randn(64, 64)  # 16 KiB in fp32
    cache = QuantCache(max_bytes=40_000, mode="dense")
    for bits in (2, 3, 4, 8):
        cache.get("w", QuantOption(bits, 8, "fp32", 64, 256), weight)
    assert len(cache) == 2 and cache.nbytes <= 40_000


def test_full_precision_config_restores_the_base(tiny):
    batch = _batch()
    tiny.eval()
    with torch.no_grad():
        tiny(tiny.space.uniform(QuantOption(2, 2, "bf16", 64, 256)), **batch)
        after = tiny(None, **batch).logits
        assert all(layer.active_weight is None and layer.adjustment is None for layer in tiny.layers)
        tiny.cache.clear()
        assert torch.equal(after, tiny(None, **batch).logits)


def test_lqlora_decomposition_beats_plain_quantization():
    torch.manual_seed(0)
    u, v = torch.randn(64, 4), torch.randn(4, 128)
    w = u @ v * 0.1 + torch.randn(64, 128) * 0.01  # a low-rank matrix plus noise
    option = QuantOption(2, 8, "fp32", 64, 256)
    quantized, left, right = lqlora_decompose(w, option, rank=4, iters=3)
    plain = (w - fake_quantize(w, option)).norm()
    assert (w - quantized - left @ right).norm() < plain / 2


def test_a_mapper_blind_to_the_configuration_gives_each_matrix_one_factor_for_every_configuration():
    torch.manual_seed(0)
    seeing, blind = (ConfigMapper(rank=4, num_blocks=2, num_types=3, sees_config=s) for s in (True, False))
    torch.nn.init.normal_(seeing.net[-1].weight)  # far from the near-zero start, so outputs differ
    blind.load_state_dict(seeing.state_dict())  # the same parameters: only the input differs
    blocks, types = torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2])
    low, high = torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)
    assert torch.equal(blind(low, blocks, types), blind(high, blocks, types))
    assert not torch.allclose(seeing(low, blocks, types), seeing(high, blocks, types))
    assert torch.equal(blind(high, blocks, types), seeing(low, blocks, types))  # fields read as index 0
    per_matrix = blind(low, blocks, types)
    assert not torch.allclose(per_matrix[0], per_matrix[1])  # still one factor per matrix
