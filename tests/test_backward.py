"""One backward per configuration (issue #13, item 3): the same gradient and the same Lightning training,
with one configuration's graph alive at a time."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from coalora.data.glue_datamodule import GLUEDataModule
from coalora.errors import CoaloraError
from coalora.tasks.backward import check_backward_strategy
from coalora.tasks.classification import ClassificationTask
from tests.tiny_models import tiny_glue_data

BUDGETS = [2.5, 3.3, 5.0]


def _task(tiny_models_dir, **kwargs) -> ClassificationTask:
    torch.manual_seed(0)  # the same LoRA, mapper and head initialisation for every task of a test
    args = dict(model_name=str(tiny_models_dir / "tiny-bert"), rank=4, train_budgets=BUDGETS, lr=1e-2)
    return ClassificationTask(**{**args, **kwargs})


def _batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (6, 12), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1] * 3)}


def _step_gradient(task: ClassificationTask) -> torch.Tensor:
    task.train()
    torch.manual_seed(2)  # the backbone's dropout: the same masks, forward by forward, in either mode
    task.training_step(_batch(), 0).backward()
    return torch.cat([p.grad.flatten() for p in task.model.trainable_parameters()])


@pytest.mark.parametrize("distill_weight", [0.0, 0.5])
def test_one_backward_per_configuration_gives_the_summed_gradient(tiny_models_dir, distill_weight):
    sequential = _task(tiny_models_dir, configs_per_step=3, distill_weight=distill_weight)
    summed = _task(
        tiny_models_dir, configs_per_step=3, distill_weight=distill_weight, backward_per_config=False
    )
    assert len(sequential.sample_configs()) == 3
    expected = _step_gradient(summed)
    got = _step_gradient(sequential)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def _step_gradient_bf16_mixed(task: ClassificationTask) -> torch.Tensor:
    """As Lightning's bf16-mixed runs a step: the step inside CPU autocast, the returned loss's backward
    outside it. Autocast's cast cache is off here: with it, the summed path's K forwards share one bf16
    copy of each fp32 head weight, whose gradient then adds up the K shares in bf16 (the sequential
    path adds them in fp32); that is the reference's rounding, not the defect under test."""
    task.train()
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        loss = task.training_step(_batch(), 0)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in task.model.trainable_parameters()])


def test_one_backward_per_configuration_gives_the_summed_gradient_in_bf16_mixed(tiny_models_dir):
    """The early backwards leave the autocast region as Lightning's does: under bf16-mixed the shares add
    up to the summed loss's gradient (issue #23: the mapper's and h + D·h's backward ran in bf16)."""
    sequential = _task(tiny_models_dir, configs_per_step=3)
    summed = _task(tiny_models_dir, configs_per_step=3, backward_per_config=False)
    expected = _step_gradient_bf16_mixed(summed)
    got = _step_gradient_bf16_mixed(sequential)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


class _SavedBytes:
    """Bytes autograd holds for backward, and their peak, through saved-tensor hooks."""

    def __init__(self) -> None:
        self.alive = self.peak = 0

    def pack(self, tensor: torch.Tensor) -> object:
        counter = self
        size = tensor.numel() * tensor.element_size()

        class Held:
            def __init__(self) -> None:
                self.tensor = tensor
                counter.alive += size
                counter.peak = max(counter.peak, counter.alive)

            def __del__(self) -> None:
                counter.alive -= size

        return Held()

    @staticmethod
    def unpack(held: object) -> torch.Tensor:
        return held.tensor  # type: ignore[attr-defined]


def _peak_saved_bytes(task: ClassificationTask) -> int:
    task.train()
    counter = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        task.training_step(_batch(), 0).backward()
    assert counter.alive == 0
    return counter.peak


def test_k_configurations_hold_one_graph_at_a_time(tiny_models_dir):
    one = _peak_saved_bytes(_task(tiny_models_dir, configs_per_step=1))
    sequential = _peak_saved_bytes(_task(tiny_models_dir, configs_per_step=3))
    summed = _peak_saved_bytes(_task(tiny_models_dir, configs_per_step=3, backward_per_config=False))
    assert sequential <= 1.05 * one  # one configuration's graph alive at a time
    assert summed >= 2.5 * one  # what it replaces: all three alive until the one backward


def _data(tiny_models_dir, glue_dir) -> GLUEDataModule:
    return tiny_glue_data(tiny_models_dir / "tiny-bert", glue_dir, train_limit=48)


def _trained(task: ClassificationTask, data: GLUEDataModule, tmp_path, **trainer_args) -> torch.Tensor:
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        default_root_dir=tmp_path, enable_model_summary=False, limit_val_batches=0, **trainer_args,
    )  # fmt: skip
    L.seed_everything(3, verbose=False)  # the same shuffling and dropout masks for every run
    trainer.fit(task, data)
    return torch.cat([p.detach().flatten() for p in task.model.trainable_parameters()])


def test_clipping_and_accumulation_train_the_same_parameters(tiny_models_dir, glue_dir, tmp_path):
    """Three optimizer steps, each accumulating two batches of K = 2, with clipping that bites."""
    settings = dict(accumulate_grad_batches=2, gradient_clip_val=0.05)
    data = _data(tiny_models_dir, glue_dir)
    start = torch.cat([p.detach().flatten() for p in _task(tiny_models_dir).model.trainable_parameters()])
    summed = _trained(_task(tiny_models_dir, backward_per_config=False), data, tmp_path, **settings)
    sequential = _trained(_task(tiny_models_dir), data, tmp_path, **settings)
    unclipped = _trained(_task(tiny_models_dir), data, tmp_path, accumulate_grad_batches=2)
    assert not torch.allclose(summed, start) and not torch.allclose(unclipped, summed, atol=1e-6)
    torch.testing.assert_close(sequential, summed, rtol=1e-4, atol=1e-6)


def test_sharded_strategies_are_refused_with_the_way_out():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    check_backward_strategy(SingleDeviceStrategy(device=torch.device("cpu")), True)
    check_backward_strategy(DDPStrategy(), True)
    check_backward_strategy(FSDPStrategy(), False)
    with pytest.raises(CoaloraError, match="backward_per_config false"):
        check_backward_strategy(FSDPStrategy(), True)
