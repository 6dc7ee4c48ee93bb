"""The quantized-weight cache (issue #13, item 4): dense, packed and auto entries give the same weights,
respect the bound, and a packed cache trains exactly what a dense one does."""

from __future__ import annotations

import pytest
import torch

from coalora.errors import CoaloraError
from coalora.nn.weight_cache import QuantCache
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import fake_quantize
from coalora.tasks.classification import ClassificationTask

OPTIONS = [QuantOption(bits, 8, "fp16", 64, 256) for bits in (2, 3, 4, 8)]


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(64, 96, generator=generator) for i in range(3)}


@pytest.mark.parametrize("mode", ["dense", "packed", "auto"])
def test_every_mode_returns_the_fake_quantized_weight(mode):
    cache = QuantCache(max_bytes=1 << 20, mode=mode)
    for _ in range(2):  # misses, then hits
        for name, weight in _weights().items():
            for option in OPTIONS:
                assert torch.equal(cache.get(name, option, weight), fake_quantize(weight, option))
    assert cache.hits == cache.misses == 12


def test_packed_entries_hold_their_bits_not_fp32():
    dense, packed = QuantCache(1 << 30, mode="dense"), QuantCache(1 << 30, mode="packed")
    weight = _weights()["w0"]
    for option in OPTIONS:
        dense.get("w0", option, weight)
        packed.get("w0", option, weight)
    assert dense.nbytes == 4 * weight.numel() * 4
    bits = sum(o.bits for o in OPTIONS)
    assert bits * weight.numel() / 8 <= packed.nbytes <= 1.3 * bits * weight.numel() / 8


def test_auto_is_dense_until_its_bound_then_packed_within_it():
    weight = _weights()["w0"]  # 24 KiB in fp32
    cache = QuantCache(max_bytes=60_000, mode="auto")
    for option in OPTIONS[:2]:
        cache.get("w0", option, weight)
    assert not cache.packed and cache.nbytes == 2 * weight.numel() * 4
    for _ in range(2):  # twelve entries: 288 KiB dense, about 40 KiB packed
        for name, value in _weights().items():
            for option in OPTIONS:
                assert torch.equal(cache.get(name, option, value), fake_quantize(value, option))
    assert cache.packed and len(cache) == 12 and cache.nbytes <= 60_000


def test_an_unknown_mode_is_refused():
    with pytest.raises(CoaloraError, match="auto, dense, packed"):
        QuantCache(1 << 20, mode="compressed")  # type: ignore[arg-type]


def test_a_packed_cache_trains_the_same_gradient(tiny_models_dir):
    batch_ids = torch.randint(5, 200, (4, 10), generator=torch.Generator().manual_seed(1))
    batch = {
        "input_ids": batch_ids,
        "attention_mask": torch.ones_like(batch_ids),
        "labels": torch.tensor([0, 1] * 2),
    }
    grads = []
    for mode in ("dense", "packed"):
        torch.manual_seed(0)
        task = ClassificationTask(
            model_name=str(tiny_models_dir / "tiny-bert"), rank=4, train_budgets=[2.5, 3.3, 5.0],
            lora_dropout=0.0, quant_cache_mode=mode,
        ).train()  # fmt: skip
        torch.manual_seed(2)
        task.training_step(batch, 0).backward()
        assert task.model.cache.packed == (mode == "packed") and len(task.model.cache) > 0
        grads.append(torch.cat([p.grad.flatten() for p in task.model.trainable_parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("mode", ["dense", "packed", "auto"])
def test_a_bf16_cache_holds_what_autocast_would_cast_to(mode):
    """Issue #25: dense entries held in the compute dtype are the fp32 entries' bits after the cast, at
    half the bytes; packed entries are handed out in it too."""
    wide, narrow = QuantCache(1 << 30, mode=mode), QuantCache(1 << 30, mode=mode, dense_dtype=torch.bfloat16)
    for name, weight in _weights().items():
        for option in OPTIONS:
            got = narrow.get(name, option, weight)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, wide.get(name, option, weight).to(torch.bfloat16))
    if mode == "dense":
        assert narrow.nbytes * 2 == wide.nbytes
    assert (
        narrow.renewed().dense_dtype == torch.bfloat16
        and narrow.renewed(dense_dtype=None).dense_dtype is None
    )


def test_a_bf16_cache_gives_the_same_autocast_forward_and_trains_under_bf16_mixed(tiny_models_dir):
    """The same logits and gradients under bf16 autocast whether the dense entries are fp32 (cast on every
    forward) or bf16 (cast once); outside autocast a bf16 entry is widened to the input's dtype."""
    import lightning as L

    ids = torch.randint(5, 200, (4, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1] * 2)}
    torch.manual_seed(0)
    task = ClassificationTask(
        model_name=str(tiny_models_dir / "tiny-bert"), rank=4, train_budgets=[2.5, 3.3, 5.0], lora_dropout=0.0
    ).train()
    config = task.train_configs[0]
    results = []
    for dtype in (None, torch.bfloat16):
        task.model.set_dense_dtype(dtype)
        task.zero_grad()
        torch.manual_seed(2)  # the backbone's dropout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = task.batch_loss(batch, config)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in task.model.trainable_parameters()])
        results.append((loss.detach(), grads))
    assert task.model.layers[0].active_weight.dtype == torch.bfloat16
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with torch.no_grad():  # no autocast: the bf16 entry is used at the input's width
        assert task.batch_loss(batch, config).dtype == torch.float32

    trainer = L.Trainer(precision="bf16-mixed", accelerator="cpu", logger=False, enable_checkpointing=False)
    task.trainer = trainer
    task.setup("validate")
    assert task.model.cache.dense_dtype == torch.bfloat16
    task.trainer = L.Trainer(precision="32-true", accelerator="cpu", logger=False, enable_checkpointing=False)
    task.setup("validate")
    assert task.model.cache.dense_dtype is None
