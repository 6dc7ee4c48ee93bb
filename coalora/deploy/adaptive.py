"""Switching a checkpoint between configurations in process.

:class:`AdaptiveModel` keeps the training task alive and switches it with what training already uses:
the model's quantized-weight cache (an option a matrix has had before is never re-quantized) and one
batched mapper call for the r×r adjustments. Budgets are resolved by the allocator once and remembered;
the checkpoint's own evaluation budgets are known from the start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from coalora.deploy.export import ExportReport, export
from coalora.deploy.layout import Resolution
from coalora.deploy.loaded import generate_texts, predict_texts
from coalora.deploy.memory import keep_freed_memory
from coalora.deploy.resolve import resolve_config
from coalora.errors import CoaloraError
from coalora.nn.weight_cache import CacheMode
from coalora.pretrained import load_tokenizer
from coalora.quant.qconfig import ConfigSpace, QConfig
from coalora.tasks.checkpoint import load_task
from coalora.utils import intra_op_threads, model_inputs

if TYPE_CHECKING:
    from coalora.tasks.base import CoALoRATask


class AdaptiveModel:
    """A checkpoint served at any configuration its method supports; see :meth:`adapt`."""

    def __init__(self, module: CoALoRATask, tokenizer: Any = None, threads: int | None = 1) -> None:
        """``threads``: CPU threads while switching (None: torch's): the matrices of a switch are quantized
        on that many threads side by side, where the compiled quantizer runs, and torch's own ops (mapper,
        fold) on one, as they are too short to gain from more (each parallel region waits for a core).
        Dense cache entries keep their codes, so :meth:`export` of a configuration adapted to before
        packs nothing again. Freed weight buffers are kept in the process for the next switch
        (:func:`~coalora.deploy.memory.keep_freed_memory`)."""
        keep_freed_memory()
        self.module = module.eval()
        module.model.cache.keep_codes = True
        self.tokenizer = tokenizer
        self.threads = threads
        self.config: QConfig | None = None
        self.adapted = False
        #: seconds of the last :meth:`adapt`, by stage (resolve, quantize, mapper)
        self.last_timings: dict[str, float] = {}
        self._budgets: dict[float, Resolution] = {}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        cache_mode: CacheMode | None = None,
        rounding: str | None = None,
        data_overrides: dict | None = None,
        threads: int | None = 1,
    ) -> AdaptiveModel:
        """``cache_mode`` ``packed`` keeps every configuration adapted to as packed codes (its bits, not
        fp32; a switch back dequantizes it, a few ms) and only the live one dense; None: the
        checkpoint's own ``quant_cache_mode``. The full-precision base stays, to quantize new ones.
        ``rounding`` (default: the run's own) and ``data_overrides``: as :func:`load_task`'s (``gptq``
        calibrates once, at load, on the run's training examples); ``threads``: as the constructor's."""
        module = load_task(path, rounding, data_overrides).to(device)
        if cache_mode is not None:
            module.model.set_cache_mode(cache_mode)
        model = cls(module, threads=threads)
        if module.method.fixed:
            model.adapt(None)  # the one configuration it serves
        return model

    @property
    def space(self) -> ConfigSpace:
        return self.module.model.space

    @property
    def label_names(self) -> list[str]:
        return list(getattr(self.module, "label_names", []))

    @property
    def avg_bits(self) -> float | None:
        return None if self.config is None else self.space.avg_bits(self.config)

    def resolve(self, target: QConfig | float | str | os.PathLike | None) -> Resolution:
        """A configuration, a budget in bits (allocated once, then remembered) or a qconfig file path."""
        if target is None or isinstance(target, QConfig):
            return resolve_config(self.module, qconfig=target)
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            budget = float(target)
            if budget not in self._budgets:
                self._budgets[budget] = resolve_config(self.module, budget=budget)
            return self._budgets[budget]
        if isinstance(target, (str, os.PathLike)):
            return resolve_config(self.module, qconfig=Path(target))
        raise CoaloraError(
            f"cannot adapt to a {type(target).__name__}; pass a QConfig, a budget in bits or a qconfig path"
        )

    @torch.no_grad()
    def adapt(self, target: QConfig | float | str | os.PathLike | None) -> QConfig | None:
        """Switch the live model to a configuration, a bit budget or a qconfig file; return the config.

        ``None`` means the checkpoint's own configuration (qlora/lqlora) or full precision (fp).
        """
        start = time.perf_counter()
        config = self.resolve(target).config
        timings = {"resolve": time.perf_counter() - start}
        model = self.module.model
        model.cache.threads = torch.get_num_threads() if self.threads is None else self.threads
        with intra_op_threads(None if self.threads is None else 1):
            start = time.perf_counter()
            self.module.activate(config)  # quantized weights, or LQ-LoRA's pinned Q(W − L)
            timings["quantize"] = time.perf_counter() - start
            start = time.perf_counter()
            model.apply_adjustments(config)
            timings["mapper"] = time.perf_counter() - start
        self.config, self.adapted, self.last_timings = config, True, timings
        return config

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        """Logits of the live configuration for a tokenized batch (``labels`` ignored)."""
        if not self.adapted:
            raise CoaloraError("choose a configuration first: call adapt(budget or qconfig)")
        device = self.module.model.block_ids.device
        backbone = self.module.model.backbone
        inputs = {k: v.to(device) for k, v in model_inputs(backbone, batch).items()}
        return backbone(**inputs).logits

    def predict(
        self, texts: Sequence[str | tuple[str, str]], batch_size: int = 32, max_length: int = 128
    ) -> list[dict]:
        """Labels and probabilities for raw texts (or text pairs) under the live configuration."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.module.hparams.model_name)
        device = self.module.model.block_ids.device
        return predict_texts(
            self.logits, self.tokenizer, texts, self.label_names, device, batch_size, max_length
        )

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        """Continuations of ``prompts`` under the live configuration (causal-LM checkpoints; greedy)."""
        if not self.adapted:
            raise CoaloraError("choose a configuration first: call adapt(budget or qconfig)")
        if self.module.task_type != "causal_lm":
            raise CoaloraError("this checkpoint is a classifier: use predict(texts), not generate")
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.module.hparams.model_name)
        device = self.module.model.block_ids.device
        return generate_texts(
            self.module.model.backbone, self.tokenizer, prompts, device, max_new_tokens, **generate_kwargs
        )

    def export(
        self,
        target: QConfig | float | str | os.PathLike | None,
        out: str | os.PathLike,
        format: str = "coalora",
        embedding_dtype: str = "float32",
    ) -> ExportReport:
        """Write a deployable artifact (or a PEFT export) for a configuration; the live one is unchanged.
        ``embedding_dtype``: as :func:`coalora.deploy.export.export`'s."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.module.hparams.model_name)
        resolution = self.resolve(target)
        return export(
            self.module,
            out,
            format=format,
            tokenizer=self.tokenizer,
            resolution=resolution,
            embedding_dtype=embedding_dtype,
        )
