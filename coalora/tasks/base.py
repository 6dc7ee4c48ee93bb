"""The task base class: CoA-LoRA and its baselines on one quantized backbone (SPEC §4, §6, §7).

In the style of torchgeo's ``trainers/base.py``: :class:`CoALoRATask` owns what every task shares — the
configuration sets (training and evaluation), drawing K configurations per step, the quantized-weight
cache (through :class:`~coalora.nn.model.CoALoRAModel`), LQ-LoRA's pinned base, the optimizer and the
checkpoint hooks. A subclass owns the backbone's Auto class (:meth:`load_backbone`), the loss and the
metrics. What each method trains and serves is one row of :data:`~coalora.tasks.methods.METHODS`.

The configuration sets are part of the task's state and of every checkpoint; CoA-LoRA's and
Shared-LoRA's are allocated on first use, so a task loaded from a checkpoint never runs the allocator.
"""

from __future__ import annotations

import functools
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection

from coalora.errors import CoaloraError
from coalora.nn.model import CoALoRAModel
from coalora.nn.weight_cache import CacheMode
from coalora.pretrained import DEFAULT_MODEL
from coalora.quant.allocate import check_space_budget
from coalora.quant.error_weighting import ErrorWeighting
from coalora.quant.lqlora import init_lqlora_adapters, lqlora_residuals
from coalora.quant.qconfig import QConfig
from coalora.quant.rounding import Rounding
from coalora.quant.targets import target_weights, weights_fingerprint
from coalora.tasks.backward import PerConfigurationBackward, backward_now, check_backward_strategy
from coalora.tasks.calibrated import CalibratedRounding
from coalora.tasks.checkpoint_state import CheckpointState
from coalora.tasks.configurations import ConfigurationSets
from coalora.tasks.methods import Method, MethodSpec, method_spec
from coalora.tasks.metrics import ConfigurationMetrics
from coalora.tasks.optimizer import build_optimizer
from coalora.tasks.seeding import BatchSeededDropout
from coalora.tasks.validation import check_task_arguments
from coalora.tasks.weighted_allocation import WeightedAllocation
from coalora.utils import budget_label, model_inputs

#: Lightning precision -> the dtype autocast computes in (dense quantized weights are held in it)
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
#: task name (stored in checkpoints) -> task class; subclasses register themselves by ``task_type``
TASK_TYPES: dict[str, type[CoALoRATask]] = {}


class CoALoRATask(
    ConfigurationMetrics,
    PerConfigurationBackward,
    BatchSeededDropout,
    CalibratedRounding,
    WeightedAllocation,
    CheckpointState,
    L.LightningModule,
    ABC,
):
    """Configuration-aware LoRA fine-tuning of a quantized Hugging Face backbone."""

    #: the name checkpoints record, so the one checkpoint reader rebuilds the right task
    task_type: ClassVar[str] = ""
    #: whether the backbone's task head trains with the adapter (a classifier's does; an LM head does not)
    trains_head: ClassVar[bool] = True
    #: the LightningDataModule the CLI pairs with this task, and the task arguments linked into it
    datamodule_class: ClassVar[str] = "coalora.data.glue_datamodule.GLUEDataModule"
    linked_arguments: ClassVar[tuple[str, ...]] = ("model_name", "seed")

    if TYPE_CHECKING:  # Lightning types hparams as a plain mapping; ours are attribute-accessed arguments

        @property
        def hparams(self) -> Any: ...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.task_type:
            TASK_TYPES[cls.task_type] = cls

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        method: Method = "coalora",
        rank: int = 8,
        alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        mapper_lr: float | None = None,
        configs_per_step: int = 2,
        train_budgets: list[float] | None = None,
        eval_budgets: list[float] | None = None,
        train_budget: float | None = None,
        qconfig: str | None = None,
        code_family: str = "nf",
        lqlora_iters: int = 2,
        mapper_embed_dim: int = 8,
        mapper_hidden: int = 128,
        quant_cache_gb: float = 4.0,
        quant_cache_mode: CacheMode = "auto",
        seed: int = 42,
        use_mapper: bool = True,
        mapper_sees_config: bool = True,
        low_bit_draw: float | None = None,
        distill_weight: float = 0.0,
        backward_per_config: bool = True,
        rounding: Rounding = "nearest",
        calibration_examples: int = 128,
        error_weighting: ErrorWeighting = "none",
    ) -> None:
        """
        Args:
            model_name: hub name or local folder of the backbone (offline first).
            method: what trains and serves; see :mod:`coalora.tasks.methods`.
            rank, alpha, lora_dropout: the LoRA adapter; its scaling is alpha / rank.
            lr, weight_decay, mapper_lr: AdamW over LoRA, mapper and head; the mapper at mapper_lr if set.
            configs_per_step: K, CoA-LoRA's configurations per training step.
            train_budgets: CoA-LoRA's training budgets (default the grid 2.25, 2.35, ..., 7.15).
            eval_budgets: budgets validated and tested at (default 2.5, 3.0, 3.5, 4.0).
            train_budget, qconfig: QLoRA/LQ-LoRA's one configuration (a budget, or a qconfig file).
            code_family: ``nf`` (NormalFloat), ``int`` codes, or ``gguf`` (one llama.cpp type per matrix).
            lqlora_iters: alternations of LQ-LoRA's decomposition.
            mapper_embed_dim, mapper_hidden: the configuration-aware network.
            quant_cache_gb, quant_cache_mode: bound of the quantized-weight cache, and whether it holds
                dequantized weights (``dense``), packed codes (``packed``, dequantized per activation)
                or dense until the bound is reached, then packed (``auto``); :mod:`coalora.nn.weight_cache`.
            seed: the run's seed (each step's draw of configurations; the data module follows it).
            use_mapper: False switches CoA-LoRA's mapper off (M = I): one shared adapter trained exactly as
                CoA-LoRA trains, the ablation that isolates the mapper's contribution.
            mapper_sees_config: False feeds the mapper only which matrix it adjusts, never the
                configuration: a configuration-independent r×r factor (the mapper's capacity control).
            low_bit_draw: budget-stratified sampling: one of each step's K configurations is drawn from
                those under this many bits (None: all K uniformly from the training set).
            distill_weight: weight of in-step distillation from the full-precision model (same adapter, no
                mapper, no gradient) into every configuration of the step; 0 turns it off.
            backward_per_config: run each of a step's K configurations' backward before the next one's
                forward, so one graph is alive at a time (K = 2 peaks like K = 1) with the same averaged
                gradient, clipping and accumulation; False: one backward of the summed losses (all K graphs
                alive). Single-device and DDP strategies only (:mod:`coalora.tasks.backward`).
            rounding: how every configuration's codes are chosen, in training and in serving:
                ``nearest`` or ``gptq`` (activation-aware, same grid and bytes; :mod:`.calibrated`).
            calibration_examples: training examples whose target inputs give GPTQ's statistics.
            error_weighting: the error table the sets are allocated from: ``none`` (plain squared error),
                ``fisher`` or ``activation`` (from training rows; :mod:`.weighted_allocation`).
        """
        super().__init__()
        self.method: MethodSpec = method_spec(method)
        self.save_hyperparameters()
        check_task_arguments(self.hparams)  # every range and conflict, before the backbone loads
        backbone = self.load_backbone()
        self.model = CoALoRAModel(
            backbone,
            model_name,
            rank=rank,
            alpha=alpha,
            dropout=lora_dropout,
            use_mapper=self.method.uses_mapper and use_mapper,
            mapper_sees_config=mapper_sees_config,
            mapper_embed_dim=mapper_embed_dim,
            mapper_hidden=mapper_hidden,
            code_family=code_family,
            cache_bytes=int(quant_cache_gb * (1 << 30)),
            cache_mode=quant_cache_mode,
            train_head=self.trains_head,
            rounding=rounding,
        )
        weights = target_weights(backbone, self.model.space.targets)
        self.fingerprint = weights_fingerprint(weights)
        self._error_table: torch.Tensor | None = None
        #: LQ-LoRA's Q(W − L) for its one configuration (empty for other methods)
        self.pinned_weights: dict[str, torch.Tensor] = {}
        self.configs = ConfigurationSets(
            self.model.space, self.method, self.error_table, eval_budgets, train_budgets
        )
        if self.method.fixed:  # one configuration at most, and LQ-LoRA's init needs it now
            self._allocate_fixed(weights)
        self.configure_metrics(self.configs.labels)

    # -- what a subclass provides ------------------------------------------------------------------------
    @abstractmethod
    def load_backbone(self) -> nn.Module:
        """The pretrained backbone with its task head (the Auto class is the subclass's), in train mode."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        """The training objective of ``outputs`` (what :meth:`forward` returns) on ``batch``, in fp32."""

    @abstractmethod
    def new_metrics(self) -> MetricCollection:
        """A fresh set of the task's evaluation metrics (one per evaluation configuration is kept)."""

    @abstractmethod
    def metric_inputs(self, outputs: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predictions, targets)`` the metrics are updated with, from the model's outputs on ``batch``."""

    @abstractmethod
    def data_module(self, **overrides: Any) -> L.LightningDataModule:
        """The task's data module, for ``coalora evaluate``: the training run's data arguments (saved in
        the checkpoint) with ``overrides``, the model and seed the task's own."""

    @property
    @abstractmethod
    def evaluation_name(self) -> str:
        """What reports call the task (the GLUE task, ``lm``): it picks the reported metric."""

    def distillation_loss(self, outputs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """How far ``outputs`` are from the full-precision ``teacher``'s (for ``distill_weight`` > 0)."""
        raise CoaloraError(f"{type(self).__name__} does not support distill_weight; set it to 0")

    @property
    @abstractmethod
    def main_metric(self) -> str:
        """The metric the progress bar shows and runs are ranked by."""

    # -- configurations ----------------------------------------------------------------------------------
    @property
    def eval_configs(self) -> dict[str, QConfig | None]:
        """Evaluation configurations by label (the budget, or "fp")."""
        return self.configs.eval

    @eval_configs.setter
    def eval_configs(self, configs: dict[str, QConfig | None]) -> None:
        self.configs.eval = configs

    @property
    def train_configs(self) -> list[QConfig]:
        """The configurations training draws from (the search callback replaces them between epochs)."""
        return self.configs.train

    @train_configs.setter
    def train_configs(self, configs: Sequence[QConfig]) -> None:
        self.configs.train = configs

    @property
    def trained_on(self) -> list[QConfig]:
        """Every configuration a training step has drawn (saved in checkpoints): evaluation's "seen"."""
        return self.configs.trained_on

    def _allocate_fixed(self, weights: dict[str, torch.Tensor]) -> None:
        """fp, QLoRA and LQ-LoRA: the one configuration they train and evaluate at."""
        hp = self.hparams
        if not self.method.quantized:
            self.configs.fix(None)
            return
        label = None  # a qconfig file is labelled by its average bits
        if hp.qconfig is not None:
            config = self.model.space.load(hp.qconfig)
        else:
            check_space_budget(self.model.space, hp.train_budget)
            config, label = self.configs.allocate(hp.train_budget), budget_label(hp.train_budget)
        self.configs.fix(config, label)
        if self.method.lqlora_init:
            self._init_lqlora(config, weights)

    def _init_lqlora(self, config: QConfig, weights: dict[str, torch.Tensor]) -> None:
        """Initialise A, B from LQ-LoRA's decomposition and pin Q(W − L) as the base weights."""
        hp = self.hparams
        self.pinned_weights = init_lqlora_adapters(
            self.model.layers, self.model.space.names, config, weights, hp.lqlora_iters, hp.code_family
        )
        self.model.set_fixed_weights(self.pinned_weights, config)

    @property
    def own_config(self) -> QConfig | None:
        """The one configuration a qlora/lqlora adapter was trained for (None: not such a method, or fp)."""
        return self.train_configs[0] if self.method.train_set == "own" else None

    def set_training_configs(self, configs: Sequence[QConfig]) -> None:
        """Replace the training configuration set (the search callback calls this between epochs)."""
        if not configs:
            raise CoaloraError("the training configuration set cannot be empty")
        self.configs.train = configs

    def sample_configs(self) -> list[QConfig | None]:
        """This step's configurations, seeded by the global step: DDP ranks and resumed runs agree."""
        if not self.method.quantized:
            return [None]
        if self.method.train_set == "own":
            return [self.train_configs[0]]
        k = (
            1
            if self.method.per_step == "one"
            else min(self.hparams.configs_per_step, len(self.train_configs))
        )
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        return list(self.configs.draw(k, generator, self.hparams.low_bit_draw))

    def activate(self, config: QConfig | None) -> None:
        """Set the backbone's weights for ``config``: LQ-LoRA's pinned base, else the quantized weights."""
        if config is self.model.active_config:
            return
        if self.method.lqlora_init and config is not None:
            device = self.model.layers[0].weight.device
            self.model.set_fixed_weights({n: w.to(device) for n, w in self.pinned_weights.items()}, config)
        else:
            self.model.set_config(config)

    @torch.no_grad()
    def weights_to_quantize(self, config: QConfig) -> dict[str, torch.Tensor]:
        """W for every target; for LQ-LoRA the residual W − L whose quantization the adapter trained on."""
        weights = target_weights(self.model.backbone, self.model.space.targets)
        if not self.method.lqlora_init:
            return weights
        hp = self.hparams
        return lqlora_residuals(
            weights, config, self.pinned_weights, self.model.layers[0].rank, hp.lqlora_iters, hp.code_family
        )

    def setup(self, stage: str) -> None:
        """Training under ``rounding: gptq`` calibrates on the data module's training examples first; a
        weighted error table (allocated at fit start) reads them too."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and self.allocation_data is None:  # a weighted table's statistics
            self.use_allocation_data(datamodule)
        if stage == "fit" and not self.model.rounder.ready and datamodule is not None:
            self.serve_with(self.hparams.rounding, datamodule)
        if self._trainer is not None:  # dense weights in the autocast dtype: no cast per forward (#25)
            self.model.set_dense_dtype(AUTOCAST_DTYPES.get(str(self._trainer.precision)))

    def on_fit_start(self) -> None:
        """Every DDP rank trains on rank 0's configuration sets (allocation is deterministic, but be sure)."""
        check_backward_strategy(self.trainer.strategy, self.hparams.backward_per_config)
        if self.trainer.world_size > 1:
            self.train_configs, self.eval_configs = self.trainer.strategy.broadcast(
                (self.train_configs, self.eval_configs), src=0
            )

    # -- steps ------------------------------------------------------------------------------------------
    def forward(self, batch: dict, config: QConfig | None) -> torch.Tensor:
        """The backbone's logits for ``batch`` under ``config``: only the inputs its forward names (no
        ``labels``, no ``token_type_ids`` for a decoder) are passed to it."""
        self.activate(config)
        return self.model(config, **model_inputs(self.model.backbone, batch)).logits

    def batch_loss(self, batch: dict, config: QConfig | None) -> torch.Tensor:
        """The loss of ``batch`` under ``config`` (the search scores configurations with it)."""
        return self.loss(self(batch, config), batch)

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["input_ids"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The mean loss over the step's K configurations. With ``backward_per_config`` each share but the
        last is back-propagated here, before the next configuration's forward (:mod:`.backward`)."""
        configs = self.sample_configs()
        self.configs.record(configs)
        weight = self.hparams.distill_weight
        teacher = None
        if weight > 0:  # the sandwich rule's teacher: full precision, the same adapter, no gradient
            with torch.no_grad():
                teacher = self(batch, None)
        early = self.prepare_early_backward(batch_idx)
        shares = []
        for index, config in enumerate(configs):
            outputs = self(batch, config)
            loss = self.loss(outputs, batch)
            if teacher is not None:
                loss = loss + weight * self.distillation_loss(outputs, teacher)
            share = loss / len(configs)
            if early and index < len(configs) - 1:
                backward_now(self._trainer, share)
                share = share.detach()  # its graph is freed now
            shares.append(share)
        total = functools.reduce(operator.add, shares)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=self.batch_size(batch))
        return shares[-1] if early else total

    def _eval_step(self, batch: dict, stage: str) -> None:
        for label, config in self.eval_configs.items():
            outputs = self(batch, config)
            self.update_metrics(label, outputs, batch)
            loss = self.loss(outputs, batch)
            self.log(f"{stage}/loss@{label}", loss, batch_size=self.batch_size(batch), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        per_label, means = self.epoch_metrics(list(self.eval_configs))
        for key, value in per_label.items():
            self.log(f"{stage}/{key}", value, sync_dist=True)
        for name, mean in means.items():
            self.log(f"{stage}/{name}", mean, prog_bar=name == self.main_metric, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.hparams.lr, self.hparams.weight_decay, self.hparams.mapper_lr)
