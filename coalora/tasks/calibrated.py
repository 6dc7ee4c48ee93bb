"""The task's side of activation-aware rounding: which statistics a model's GPTQ rounding uses, and when.

Two cases, one rule: GPTQ rounds with the statistics of the model whose weights it rounds *for*.

- Trained under ``rounding: gptq``: the weight cache rounds every (matrix, option) once, at fit start,
  with the inputs of the base model (the adapter starts at zero, B = 0). Serving recomputes exactly those
  (adapter off), so the served codes are the ones the adapter trained against.
- Trained under ``nearest`` (any method, ``fp`` included) and served with ``gptq`` (post-training
  rounding): the fine-tuned model's statistics, its adapter active at full precision, are the inputs the
  rounded matrices will see.

Calibration reads only the run's *training* examples (never the search split, dev or test).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from coalora.errors import CoaloraError
from coalora.quant.rounding import Rounding, check_rounding

if TYPE_CHECKING:
    from coalora.nn.model import CoALoRAModel


@contextlib.contextmanager
def adapter_off(model: CoALoRAModel) -> Iterator[None]:
    """The base model's forward: every LoRA path scaled by 0 for the duration."""
    scalings = [layer.scaling for layer in model.layers]
    try:
        for layer in model.layers:
            layer.scaling = 0.0
        yield
    finally:
        for layer, scaling in zip(model.layers, scalings, strict=True):
            layer.scaling = scaling


class CalibratedRounding:
    """Mixin for the task: ``serve_with`` switches the model's rounding, calibrating first if needed."""

    if TYPE_CHECKING:
        model: CoALoRAModel
        fingerprint: str

        @property
        def hparams(self) -> Any: ...

    def calibration_uses_adapter(self, rounding: Rounding) -> bool:
        """Post-training rounding reads the fine-tuned model; a run trained under gptq, the base model."""
        return not (rounding == "gptq" and self.hparams.get("rounding", "nearest") == "gptq")

    def serve_with(self, rounding: str, datamodule: Any = None) -> None:
        """Quantize every later configuration with ``rounding``; ``gptq`` needs the run's data module
        (its training examples) unless statistics are already set."""
        rounding = check_rounding(rounding)
        if rounding == "nearest":
            self.model.set_rounding("nearest")
            return
        if datamodule is None:
            raise CoaloraError(
                "gptq rounding needs the run's training data for calibration; pass the data module "
                "(coalora evaluate/adapt build it from the checkpoint's data arguments)"
            )
        self.model.set_rounding("gptq", self.calibration_hessians(datamodule, rounding))

    def calibration_hessians(self, datamodule: Any, rounding: Rounding) -> dict:
        """H = E[x xᵀ] of every target's input over ``calibration_examples`` training examples (cached on
        disk by :mod:`coalora.quant.calibration`), of the model ``rounding`` rounds for."""
        return self.input_statistics(datamodule, adapter=self.calibration_uses_adapter(rounding))

    def input_statistics(self, datamodule: Any, adapter: bool) -> dict:
        """H over the ``calibration_examples`` training examples, of the fine-tuned model (``adapter``) or
        of the base model (every LoRA path scaled by 0: what activation-weighted allocation reads)."""
        from coalora.quant.calibration import calibration_batches
        from coalora.quant.calibration_cache import cached_input_hessians

        hp = self.hparams
        batches = calibration_batches(datamodule, hp.get("calibration_examples", 128), hp.seed)
        was_training = self.model.training
        try:
            # the adapter's scaling is part of the disk cache's key: base and fine-tuned statistics differ
            if adapter:
                return cached_input_hessians(self.model, batches, fingerprint=self.fingerprint)
            with adapter_off(self.model):
                return cached_input_hessians(self.model, batches, fingerprint=self.fingerprint)
        finally:
            self.model.train(was_training)
