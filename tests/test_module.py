"""The LightningModule: methods, checkpoints (small, restorable, backbone-checked) and the training set."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from coalora.data.glue_datamodule import GLUEDataModule
from coalora.errors import CoaloraError
from coalora.tasks.classification import ClassificationTask
from coalora.utils import budget_label
from tests.tiny_models import tiny_glue_data

BUDGETS = [2.5, 3.3, 5.0]


def _module(tiny_models_dir, **kwargs) -> ClassificationTask:
    args = dict(model_name=str(tiny_models_dir / "tiny-bert"), rank=4, train_budgets=BUDGETS, lr=1e-3)
    return ClassificationTask(**{**args, **kwargs})


def _data(tiny_models_dir, glue_dir) -> GLUEDataModule:
    return tiny_glue_data(tiny_models_dir / "tiny-bert", glue_dir)


def _fit(module, data, tmp_path, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        default_root_dir=tmp_path, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data)
    return trainer


def test_budget_labels():
    assert [budget_label(b) for b in (2.5, 3.0, 4, 2.25, 7.15)] == ["2.5", "3.0", "4.0", "2.25", "7.15"]


def test_methods_allocate_the_right_configurations(tiny_models_dir):
    coalora = _module(tiny_models_dir)
    assert list(coalora.eval_configs) == ["2.5", "3.0", "3.5", "4.0"]
    assert len(coalora.train_configs) == len(BUDGETS)
    assert not set(coalora.train_configs) & set(coalora.eval_configs.values()) - {coalora.eval_configs["2.5"]}
    qlora = _module(tiny_models_dir, method="qlora", train_budget=3.0)
    assert list(qlora.eval_configs) == ["3.0"] and qlora.train_configs == [qlora.eval_configs["3.0"]]
    assert qlora.model.mapper is None
    assert _module(tiny_models_dir, method="fp").eval_configs == {"fp": None}
    with pytest.raises(CoaloraError, match="set train_budget or qconfig"):
        _module(tiny_models_dir, method="qlora")
    for bad in (
        {"eval_budgets": [1.5]},
        {"train_budgets": [3.0, 9.5]},
        {"method": "qlora", "train_budget": 1.0},
    ):
        with pytest.raises(CoaloraError, match="outside the achievable range"):
            _module(tiny_models_dir, **bad)  # at construction, though allocation itself is lazy


def test_sets_are_allocated_on_first_use_and_never_when_loading_a_checkpoint(
    tiny_models_dir, glue_dir, tmp_path, monkeypatch
):
    import coalora.tasks.configurations

    calls = []
    real = coalora.tasks.configurations.cached_allocate
    monkeypatch.setattr(
        coalora.tasks.configurations, "cached_allocate", lambda *a, **k: calls.append(a[-1]) or real(*a, **k)
    )
    module = _module(tiny_models_dir)
    assert calls == []
    assert len(module.train_configs) == len(BUDGETS) and calls == BUDGETS
    assert list(module.eval_configs) == ["2.5", "3.0", "3.5", "4.0"] and len(calls) == len(BUDGETS) + 4
    _fit(module, _data(tiny_models_dir, glue_dir), tmp_path, steps=1).save_checkpoint(tmp_path / "m.ckpt")
    calls.clear()
    restored = ClassificationTask.load_from_checkpoint(tmp_path / "m.ckpt")
    assert restored.train_configs == module.train_configs and restored.eval_configs == module.eval_configs
    assert calls == []


def test_step_sampling_is_a_function_of_the_global_step(tiny_models_dir):
    module = _module(tiny_models_dir, configs_per_step=2)
    first = module.sample_configs()
    assert len(first) == 2 and first[0] != first[1]
    assert module.sample_configs() == first


def test_set_training_configs_validates(tiny_models_dir):
    module = _module(tiny_models_dir)
    new = [module.model.space.random(torch.Generator().manual_seed(i)) for i in range(3)]
    module.set_training_configs(new)
    assert module.train_configs == new
    with pytest.raises(CoaloraError, match="cannot be empty"):
        module.set_training_configs([])


def test_checkpoint_is_small_and_restores_exactly(tiny_models_dir, glue_dir, tmp_path):
    module = _module(tiny_models_dir)
    trainer = _fit(module, _data(tiny_models_dir, glue_dir), tmp_path)
    new_set = [module.model.space.random(torch.Generator().manual_seed(7))]
    module.set_training_configs(new_set)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    kept = ("lora_", "mapper", "classifier", "pooler")
    assert all(any(part in k for part in kept) for k in saved["state_dict"])
    restored = ClassificationTask.load_from_checkpoint(path)
    assert restored.train_configs == new_set and restored.eval_configs == module.eval_configs
    ids = torch.randint(1000, 2000, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config = module.eval_configs["3.0"]
    module.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(module(batch, config), restored(batch, config))


def test_a_configuration_blind_mapper_survives_the_checkpoint(tiny_models_dir, glue_dir, tmp_path):
    """mapper_sees_config false (the mapper's capacity control) is restored from the checkpoint: every
    configuration gets the same trained, non-identity factors, so serving computes what training did."""
    module = _module(tiny_models_dir, mapper_sees_config=False)
    low, high = (module.eval_configs[b] for b in ("2.5", "4.0"))
    assert low != high
    with torch.no_grad():
        untrained = module.model.adjustments(high).clone()
    trainer = _fit(module, _data(tiny_models_dir, glue_dir), tmp_path)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = ClassificationTask.load_from_checkpoint(tmp_path / "m.ckpt")
    with torch.no_grad():
        factors = restored.model.adjustments(low)
        assert torch.equal(factors, restored.model.adjustments(high))
        assert torch.equal(factors, module.model.adjustments(high))
        assert not torch.equal(factors, untrained)  # the blind factors did train
    seeing = _module(tiny_models_dir)
    with torch.no_grad():
        assert not torch.equal(seeing.model.adjustments(low), seeing.model.adjustments(high))


def test_checkpoint_from_another_backbone_is_refused(tiny_models_dir, glue_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    module = _module(tiny_models_dir)
    trainer = _fit(module, _data(tiny_models_dir, glue_dir), tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    other = tmp_path / "other-bert"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models_dir / "tiny-bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.add_(0.1)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_models_dir / "tiny-bert").save_pretrained(other)
    with pytest.raises(CoaloraError, match="trained on another backbone"):
        ClassificationTask.load_from_checkpoint(tmp_path / "m.ckpt", model_name=str(other))


@pytest.mark.parametrize("method", ["coalora", "shared", "qlora", "lqlora", "fp"])
def test_every_method_trains_only_its_trainable_parameters(method, tiny_models_dir, glue_dir, tmp_path):
    budget = 3.0 if method in ("qlora", "lqlora") else None  # the others refuse a train_budget
    module = _module(tiny_models_dir, method=method, train_budget=budget)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _fit(module, _data(tiny_models_dir, glue_dir), tmp_path, steps=2)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= trainable
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)
    assert any("mapper" in k for k in changed) == (method == "coalora")


def test_every_budget_is_solved_without_a_time_limit(tiny_models_dir, monkeypatch):
    """A time-limited solve depends on the machine's load: neither the reported configurations nor the
    training grid may use one (issue 23 item 7; tests/test_knapsack_determinism.py checks HiGHS's path and
    the answers on a slow machine)."""
    import coalora.quant.knapsack as knapsack

    limits: list = []
    real = knapsack.milp

    def recording(*args, **kwargs):
        limits.append(kwargs["options"].get("time_limit"))
        return real(*args, **kwargs)

    monkeypatch.setattr(knapsack, "milp", recording)
    monkeypatch.setenv("COALORA_CACHE", str(tiny_models_dir.parent / "fresh-allocation-cache"))
    module = _module(tiny_models_dir, eval_budgets=[3.1, 3.7], train_budgets=[2.7])
    assert module.eval_configs and module.train_configs
    assert all(limit is None for limit in limits)  # the tiny model's sizes even skip HiGHS altogether


def test_stratified_draw_always_includes_a_low_bit_configuration(tiny_models_dir):
    module = _module(tiny_models_dir, train_budgets=[2.5, 2.9, 3.3, 4.0, 5.0, 6.0], configs_per_step=2)
    space, train = module.model.space, module.train_configs
    assert sum(space.avg_bits(c) < 3.0 for c in train) == 2
    for step in range(20):
        generator = torch.Generator().manual_seed(step)
        picks = module.configs.draw(2, generator, low_bit=3.0)
        assert len(set(picks)) == 2 and space.avg_bits(picks[0]) < 3.0
    uniform = module.configs.draw(2, torch.Generator().manual_seed(5))
    expected = [
        train[int(i)] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(5))[:2]
    ]
    assert uniform == expected  # the default draw is the one every earlier run used


def test_distillation_pulls_each_configuration_towards_full_precision(tiny_models_dir):
    module = _module(tiny_models_dir, distill_weight=1.0)
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    assert module.distillation_loss(logits, logits) == pytest.approx(0.0, abs=1e-7)
    assert module.distillation_loss(logits, -logits) > 0.5
    batch = {
        "input_ids": torch.randint(1000, 2000, (4, 8)),
        "attention_mask": torch.ones(4, 8, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    calls: list = []
    real = module.forward
    module.forward = lambda b, c: calls.append(c) or real(b, c)
    loss = module.training_step(batch, 0)
    assert calls[0] is None and len(calls) == 1 + len(module.sample_configs())  # teacher, then each config
    loss.backward()
    assert module.model.mapper.net[-1].weight.grad is not None
    with pytest.raises(CoaloraError, match="distill_weight must be >= 0"):
        _module(tiny_models_dir, distill_weight=-1.0)


def test_mapper_lr_moves_only_the_mapper_faster(tiny_models_dir):
    """One AdamW step: the mapper's parameters move by mapper_lr, the adapter's by lr (Adam's first step
    moves each entry by about its group's learning rate, whatever the gradient's size)."""
    torch.manual_seed(0)
    module = _module(tiny_models_dir, lr=1e-4, mapper_lr=1e-2, weight_decay=0.0)
    optimizer = module.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-2]
    mapper = {id(p) for p in module.model.mapper.parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == mapper
    batch = {
        "input_ids": torch.randint(1000, 2000, (4, 8)),
        "attention_mask": torch.ones(4, 8, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    with torch.no_grad():  # B starts at zero, which gives the mapper no gradient on the first step
        for name, p in module.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    module.batch_loss(batch, module.train_configs[0]).backward()
    optimizer.step()
    moved = {
        n: (p.detach() - before[n]).abs().max().item() for n, p in module.named_parameters() if n in before
    }
    lora_b = max(v for n, v in moved.items() if n.endswith("lora_B"))
    mapper_last = moved["model.mapper.net.3.weight"]
    assert lora_b == pytest.approx(1e-4, rel=0.05)
    assert mapper_last == pytest.approx(1e-2, rel=0.05)
    plain = _module(tiny_models_dir, lr=1e-4).configure_optimizers()
    assert len(plain.param_groups) == 1  # unset: one group at lr, as before


def test_lqlora_teacher_runs_on_the_full_precision_weights(tiny_models_dir):
    """With distillation, the sandwich's teacher is full precision: LQ-LoRA's pinned Q(W − L) must not
    survive ``set_config(None)`` (issue #23: the teacher was the quantized student, distillation a no-op)."""
    torch.manual_seed(0)
    module = _module(tiny_models_dir, method="lqlora", train_budget=3.0, distill_weight=1.0, lqlora_iters=1)
    batch = {
        "input_ids": torch.randint(1000, 2000, (4, 8)),
        "attention_mask": torch.ones(4, 8, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    module.eval()
    (config,) = module.sample_configs()
    student = module(batch, config)
    pinned = [layer.base_weight() for layer in module.model.layers]
    assert all(not torch.equal(p, layer.weight) for p, layer in zip(pinned, module.model.layers))
    teacher_weights: list[list[torch.Tensor]] = []
    real = module.forward

    def recording(b, c):
        out = real(b, c)
        teacher_weights.append([layer.base_weight() for layer in module.model.layers])
        return out

    module.forward = recording
    module.train()
    module.training_step(batch, 0)
    for used, layer in zip(teacher_weights[0], module.model.layers):  # the teacher: W itself
        assert torch.equal(used, layer.weight)
    for used, kept in zip(teacher_weights[1], pinned):  # then the student: Q(W − L) again
        assert torch.equal(used, kept)
    module.eval()
    teacher = module(batch, None)
    assert not torch.allclose(teacher, student, atol=1e-4)
