"""A Hugging Face backbone with configuration-aware LoRA on every target matrix.

:class:`CoALoRAModel` owns the injected layers, the mapper and a memory-bounded cache of dequantized
weights, and switches the whole backbone to a configuration in one call: an unchanged option is never
re-quantized, a cached one is never recomputed, nothing is ever read from disk.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from coalora.nn.lora import LoRALinear, fold_all, lora_layer
from coalora.nn.mapper import ConfigMapper
from coalora.nn.weight_cache import CacheMode, QuantCache
from coalora.quant.qconfig import ConfigSpace, QConfig
from coalora.quant.rounding import Rounder, Rounding
from coalora.quant.targets import TargetMatrix, discover_targets, module_types


def inject_lora(
    model: nn.Module, targets: list[TargetMatrix], rank: int, alpha: float, dropout: float
) -> None:
    """Replace every target ``nn.Linear`` of ``model`` by a :class:`LoRALinear` in place."""
    for target in targets:
        parent_name, _, child = target.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, lora_layer(getattr(parent, child), rank, alpha, dropout))


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of the task head: everything outside the base model, plus a pooler if there is one.

    BERT's pooler plays the role of RoBERTa's head dense layer, so it trains with the head.
    """
    base_prefix = getattr(model, "base_model_prefix", "")
    names = []
    for name, _ in model.named_parameters():
        if not name.startswith(base_prefix + ".") or ".pooler." in name:
            names.append(name)
    return names


def train_head_in_fp32(model: nn.Module, names: list[str]) -> None:
    """Make the trainable head parameters ``names`` fp32 master weights, whatever the base's dtype.

    AdamW's update at a fine-tuning learning rate is about one bf16 ulp, so a bf16 head would lose much of
    each step (issue #23). A module whose own parameters are widened gets a pre-hook that widens its
    floating inputs too, so a bf16 backbone without autocast still runs; its output is then fp32.
    """
    widened: set[str] = set()
    for name in names:
        parameter = model.get_parameter(name)
        if parameter.dtype.is_floating_point and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            widened.add(name.rpartition(".")[0])
    for module_name in sorted(widened):
        model.get_submodule(module_name).register_forward_pre_hook(_widen_inputs)


def _widen_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _lora_at(model: nn.Module, name: str) -> LoRALinear:
    layer = model.get_submodule(name)
    assert isinstance(layer, LoRALinear), name  # inject_lora put it there
    return layer


class CoALoRAModel(nn.Module):
    """Backbone + shared LoRA + (optional) mapper, switchable between quantization configurations."""

    block_ids: torch.Tensor  # (N,) block index of every target matrix (a buffer)
    type_ids: torch.Tensor  # (N,) module-type index of every target matrix (a buffer)

    def __init__(
        self,
        backbone: nn.Module,
        model_name: str,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_mapper: bool = True,
        mapper_sees_config: bool = True,
        mapper_embed_dim: int = 8,
        mapper_hidden: int = 128,
        code_family: str = "nf",
        cache_bytes: int = 4 << 30,
        train_head: bool = True,
        cache_mode: CacheMode = "auto",
        rounding: Rounding = "nearest",
    ) -> None:
        """``train_head``: the task head (everything outside the base model) trains; False for causal LMs,
        whose ``lm_head`` (tied to the embeddings or not) stays frozen like the rest of the backbone."""
        super().__init__()
        targets = discover_targets(backbone)
        self.space = ConfigSpace(targets, model=model_name, family=code_family)
        self.types = module_types(targets)
        backbone.requires_grad_(False)
        inject_lora(backbone, targets, rank, alpha, dropout)
        head = head_parameter_names(backbone) if train_head else []
        for name in head:
            backbone.get_parameter(name).requires_grad_(True)
        train_head_in_fp32(backbone, head)
        self.backbone = backbone
        self.layers: list[LoRALinear] = [_lora_at(backbone, t.name) for t in targets]
        self.register_buffer(
            "block_ids", torch.tensor([t.block_index for t in targets], dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "type_ids", torch.tensor([self.types.index(t.module_type) for t in targets]), persistent=False
        )
        num_blocks = max(t.block_index for t in targets) + 1
        self.mapper = (
            ConfigMapper(
                rank,
                num_blocks,
                len(self.types),
                mapper_embed_dim,
                mapper_hidden,
                self.space.family.field_sizes,
                sees_config=mapper_sees_config,
            )
            if use_mapper
            else None
        )
        #: how every configuration's codes are chosen (gptq: after :meth:`set_calibration`)
        self.rounder = Rounder(rounding, code_family)
        self.cache = QuantCache(cache_bytes, code_family, cache_mode, self.rounder)
        self._active: list[Any] = [None] * len(self.layers)  # each layer's option (None: full precision)
        #: whether layers hold weights pinned by :meth:`set_fixed_weights` (never a cached option's)
        self._pinned = False
        self.active_config: QConfig | None = None

    def set_cache_mode(self, mode: CacheMode) -> None:
        """Hold the quantized weights of later switches ``dense``, ``packed`` or ``auto``
        (:mod:`coalora.nn.weight_cache`); the cache starts empty, its bound unchanged."""
        self.cache = self.cache.renewed(mode=mode)
        self.set_config(None)

    def set_dense_dtype(self, dtype: torch.dtype | None) -> None:
        """Hold dense quantized weights in ``dtype`` (the autocast dtype; None: the weights' own), so that
        no forward casts them again; the cache restarts empty if this changes it."""
        if dtype != self.cache.dense_dtype:
            self.cache = self.cache.renewed(dense_dtype=dtype)
            self.set_config(None)

    def set_rounding(self, rounding: Rounding, hessians: dict[str, torch.Tensor] | None = None) -> None:
        """Quantize later switches with ``rounding`` (``gptq``: with these targets' input statistics);
        every cached weight is dropped, since it was rounded the old way."""
        self.rounder = Rounder(rounding, self.cache.family, hessians)
        self.cache = self.cache.renewed(rounder=self.rounder)
        self.set_config(None)

    def _apply(self, fn, recurse: bool = True):
        """Moving devices or dtypes invalidates every cached dequantized weight (and block absmax)."""
        self.cache.clear()
        self.cache.absmax.clear()
        for layer in self.layers:
            layer.active_weight = None
        self._active = [None] * len(self.layers)
        self._pinned = False
        self.active_config = None
        return super()._apply(fn, recurse)

    # -- configuration switching --------------------------------------------------------------------
    def set_config(self, config: QConfig | None) -> None:
        """Quantize the backbone for ``config`` (None: full precision). Cheap when options repeat."""
        options = (
            [None] * len(self.layers) if config is None else [config.matrices[n] for n in self.space.names]
        )
        pinned, self._pinned = self._pinned, False
        # GPTQ rounds a configuration's missing matrices together; round-to-nearest spreads them over
        # threads where the compiled pass runs (on one thread, get() takes them one by one)
        if self.rounder.method != "nearest" or self.cache.threads > 1:
            self.cache.prefetch(
                [
                    (self.space.names[i], option, layer.weight)
                    for i, (layer, option) in enumerate(zip(self.layers, options, strict=True))
                    if option is not None
                    and (pinned or option != self._active[i] or layer.active_weight is None)
                ]
            )
        for i, (layer, option) in enumerate(zip(self.layers, options, strict=True)):
            current = option == self._active[i] and (option is None or layer.active_weight is not None)
            if current and not pinned:
                continue
            name = self.space.names[i]
            layer.active_weight = None if option is None else self.cache.get(name, option, layer.weight)
            self._active[i] = option
        self.active_config = config

    def set_fixed_weights(self, weights: dict[str, torch.Tensor], config: QConfig) -> None:
        """Pin precomputed dequantized weights (LQ-LoRA's Q(W − L)) for one configuration."""
        for i, layer in enumerate(self.layers):
            layer.active_weight = weights[self.space.names[i]]
            self._active[i] = None
        # the next set_config replaces every pinned weight, full precision (None) included: else
        # set_config(None) would keep Q(W − L) and a "full-precision" teacher would be the student
        self._pinned = True
        self.active_config = config

    def adjustments(self, config: QConfig) -> torch.Tensor:
        """D (M = I + D) for every target matrix under ``config``, in one batched mapper call: (N, r, r)."""
        assert self.mapper is not None
        encoded = self.space.encode(config).to(self.block_ids.device)
        return self.mapper(encoded, self.block_ids, self.type_ids)

    def apply_adjustments(self, config: QConfig | None) -> None:
        adjustments = self.adjustments(config) if (self.mapper is not None and config is not None) else None
        for i, layer in enumerate(self.layers):
            layer.adjustment = None if adjustments is None else adjustments[i]

    def forward(self, config: QConfig | None = None, **batch) -> object:
        """Run the backbone under ``config`` (already-set config if it is the active one)."""
        if config is not self.active_config:
            self.set_config(config)
        self.apply_adjustments(config)
        return self.backbone(**batch)

    # -- deployment ------------------------------------------------------------------------------------
    @torch.no_grad()
    def folded_adapter(
        self, config: QConfig | None, adjustments: torch.Tensor | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (A, B·M): a plain LoRA adapter for ``config`` (``adjustments``: the mapper's output for
        it, if already computed)."""
        if adjustments is None and self.mapper is not None and config is not None:
            adjustments = self.adjustments(config)
        each = [None] * len(self.layers) if adjustments is None else list(adjustments)
        folded = fold_all(self.layers, each)
        return {
            name: (layer.lora_A.detach().clone(), b.clone())
            for name, layer, b in zip(self.space.names, self.layers, folded, strict=True)
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
