"""The LightningModule: CoA-LoRA and its baselines on one quantized backbone (SPEC §4, §6, §7).

``method`` picks what trains and under which configurations:

- ``coalora``: shared LoRA + mapper; each step runs K configurations drawn from the training set.
- ``shared``: shared LoRA, no mapper; each step one evaluation configuration drawn at random.
- ``qlora`` / ``lqlora``: one LoRA for one configuration (``train_budget`` or ``qconfig``); LQ-LoRA starts
  from the low-rank-plus-quantized decomposition.
- ``fp``: LoRA on the full-precision backbone (the ceiling).

The training and evaluation configurations are part of the module's state and of every checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from coalora.allocator import EVAL_BUDGETS, budget_grid, cached_allocate, cached_error_table, check_budget
from coalora.backbone import DEFAULT_MODEL, load_classifier, target_weights, weights_fingerprint
from coalora.errors import CoaloraError
from coalora.glue import get_task, glue_metrics, main_metric, predictions_from_logits
from coalora.lora import lqlora_decompose
from coalora.model import CoALoRAModel
from coalora.qconfig import QConfig

log = logging.getLogger(__name__)

METHODS = ("coalora", "qlora", "lqlora", "shared", "fp")
FP_LABEL = "fp"


def budget_label(budget: float) -> str:
    """'2.5', '3.0', '2.25': the suffix of per-configuration metric names (``val/accuracy@3.0``)."""
    text = f"{budget:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


class CoALoRAModule(L.LightningModule):
    """Configuration-aware LoRA fine-tuning of a quantized Hugging Face classifier."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        task: str = "sst2",
        method: str = "coalora",
        rank: int = 8,
        alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
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
        seed: int = 42,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise CoaloraError(f"unknown method '{method}'; use one of: {', '.join(METHODS)}")
        if method in ("qlora", "lqlora") and train_budget is None and qconfig is None:
            raise CoaloraError(f"method '{method}' trains for one configuration: set train_budget or qconfig")
        if configs_per_step < 1:
            raise CoaloraError(f"configs_per_step must be >= 1, got {configs_per_step}")
        self.save_hyperparameters()
        self.spec = get_task(task)
        backbone = load_classifier(model_name, num_labels=self.spec.num_labels)
        self.model = CoALoRAModel(
            backbone,
            model_name,
            rank=rank,
            alpha=alpha,
            dropout=lora_dropout,
            use_mapper=method == "coalora",
            mapper_embed_dim=mapper_embed_dim,
            mapper_hidden=mapper_hidden,
            code_family=code_family,
            cache_bytes=int(quant_cache_gb * (1 << 30)),
        )
        weights = target_weights(backbone, self.model.space.targets)
        self.fingerprint = weights_fingerprint(weights)
        self._eval_configs: dict[str, QConfig | None] | None = None
        self._train_configs: list[QConfig] | None = None
        self._error_table: torch.Tensor | None = None
        if method != "fp":  # a bad budget fails now, not at the first (lazy) allocation
            for budget in (
                *self._budgets(),
                *(train_budgets or []),
                *([train_budget] if train_budget else []),
            ):
                check_budget(budget)
        if method in ("fp", "qlora", "lqlora"):  # one configuration at most, and LQ-LoRA's init needs it now
            self._allocate_fixed(weights)
        labels = list(self._eval_configs) if self._eval_configs is not None else self._budget_labels()
        self.metrics = nn.ModuleDict({_key(label): glue_metrics(task) for label in labels})

    # -- configurations ----------------------------------------------------------------------------------
    # CoA-LoRA's and Shared-LoRA's sets are allocated on first use: a module loaded from a checkpoint gets
    # them from the checkpoint and never runs the allocator (minutes on a fresh machine for the budget grid).

    @property
    def eval_configs(self) -> dict[str, QConfig | None]:
        """Evaluation configurations by label (the budget, or "fp")."""
        if self._eval_configs is None:
            self._eval_configs = {
                label: self._at(b) for label, b in zip(self._budget_labels(), self._budgets())
            }
        return self._eval_configs

    @eval_configs.setter
    def eval_configs(self, configs: dict[str, QConfig | None]) -> None:
        self._eval_configs = dict(configs)

    @property
    def train_configs(self) -> list[QConfig]:
        """The configurations training draws from (the search callback replaces them between epochs)."""
        if self._train_configs is None:
            if self.hparams.method == "shared":
                self._train_configs = list(self.eval_configs.values())
            else:
                grid = budget_grid() if self.hparams.train_budgets is None else self.hparams.train_budgets
                self._train_configs = list(dict.fromkeys(self._at(b) for b in grid))
        return self._train_configs

    @train_configs.setter
    def train_configs(self, configs: Sequence[QConfig]) -> None:
        self._train_configs = list(configs)

    def _budgets(self) -> tuple[float, ...]:
        return EVAL_BUDGETS if self.hparams.eval_budgets is None else tuple(self.hparams.eval_budgets)

    def _budget_labels(self) -> list[str]:
        return [budget_label(b) for b in self._budgets()]

    def error_table(self) -> torch.Tensor:
        """The allocator's error table for this backbone (cached on disk, and here after the first use)."""
        if self._error_table is None:
            weights = target_weights(self.model.backbone, self.model.space.targets)
            self._error_table = cached_error_table(weights, family=self.hparams.code_family)
        return self._error_table

    def _at(self, budget: float) -> QConfig:
        """The allocated configuration for ``budget`` (error table and allocation cached on disk)."""
        return cached_allocate(self.model.space, self.error_table(), budget)

    def _allocate_fixed(self, weights: dict[str, torch.Tensor]) -> None:
        """fp, QLoRA and LQ-LoRA: the one configuration they train and evaluate at."""
        hp = self.hparams
        if hp.method == "fp":
            self._eval_configs, self._train_configs = {FP_LABEL: None}, []
            return
        space = self.model.space
        if hp.qconfig is not None:
            config = space.load(hp.qconfig)
            label = budget_label(space.avg_bits(config))
        else:
            config, label = self._at(hp.train_budget), budget_label(hp.train_budget)
        self._eval_configs, self._train_configs = {label: config}, [config]
        if hp.method == "lqlora":
            self._init_lqlora(config, weights)

    def _init_lqlora(self, config: QConfig, weights: dict[str, torch.Tensor]) -> None:
        """Initialise A, B from LQ-LoRA's decomposition and pin Q(W − L) as the base weights."""
        fixed = {}
        for name, layer in zip(self.model.space.names, self.model.layers, strict=True):
            quantized, left, right = lqlora_decompose(
                weights[name],
                config.matrices[name],
                layer.rank,
                self.hparams.lqlora_iters,
                self.hparams.code_family,
            )
            root = layer.scaling**0.5
            with torch.no_grad():
                layer.lora_B.copy_(left / root)
                layer.lora_A.copy_(right / root)
            fixed[name] = quantized.to(layer.weight.dtype)
        self._lqlora_weights = fixed
        self.model.set_fixed_weights(fixed, config)

    def set_training_configs(self, configs: Sequence[QConfig]) -> None:
        """Replace the training configuration set (the search callback calls this between epochs)."""
        if not configs:
            raise CoaloraError("the training configuration set cannot be empty")
        self.train_configs = [self.model.space.validate(c) for c in configs]

    def _sample_configs(self) -> list[QConfig | None]:
        """This step's configurations, seeded by the global step: DDP ranks and resumed runs agree."""
        hp = self.hparams
        if hp.method == "fp":
            return [None]
        if hp.method in ("qlora", "lqlora"):
            return [self.train_configs[0]]
        k = 1 if hp.method == "shared" else min(hp.configs_per_step, len(self.train_configs))
        generator = torch.Generator().manual_seed(hp.seed * 1_000_003 + self.global_step)
        picks = torch.randperm(len(self.train_configs), generator=generator)[:k]
        return [self.train_configs[int(i)] for i in picks]

    def _prepare(self, config: QConfig | None) -> None:
        if self.hparams.method == "lqlora" and config is not None and self.model.active_config is not config:
            device = self.model.layers[0].weight.device
            fixed = {n: w.to(device) for n, w in self._lqlora_weights.items()}
            self.model.set_fixed_weights(fixed, config)

    def on_fit_start(self) -> None:
        """Every DDP rank trains on rank 0's configuration sets (allocation is deterministic, but be sure)."""
        if self.trainer.world_size > 1:
            self.train_configs, self.eval_configs = self.trainer.strategy.broadcast(
                (self.train_configs, self.eval_configs), src=0
            )

    # -- steps ------------------------------------------------------------------------------------------
    def forward(self, batch: dict, config: QConfig | None) -> torch.Tensor:
        self._prepare(config)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(config, **inputs).logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.spec.is_regression:
            return nn.functional.mse_loss(logits.view(-1).float(), labels.float())
        return nn.functional.cross_entropy(logits.float(), labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        configs = self._sample_configs()
        loss = sum(self.loss(self(batch, c), batch["labels"]) for c in configs) / len(configs)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        for label, config in self.eval_configs.items():
            logits = self(batch, config)
            loss = self.loss(logits, batch["labels"])
            self.metrics[_key(label)].update(
                predictions_from_logits(logits, self.hparams.task), batch["labels"]
            )
            self.log(f"{stage}/loss@{label}", loss, batch_size=len(batch["labels"]), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        totals: dict[str, float] = {}
        for label in self.eval_configs:
            values = self.metrics[_key(label)].compute()
            self.metrics[_key(label)].reset()
            for name, value in values.items():
                self.log(f"{stage}/{name}@{label}", value, sync_dist=True)
                totals[name] = totals.get(name, 0.0) + float(value) / len(self.eval_configs)
        for name, value in totals.items():
            self.log(
                f"{stage}/{name}", value, prog_bar=name == main_metric(self.hparams.task), sync_dist=True
            )

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.model.trainable_parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    # -- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save what training changed (LoRA, mapper, head) and the configuration sets, not the frozen
        backbone: loading rebuilds it from ``model_name`` and checks the weights' fingerprint."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["coalora"] = {
            "fingerprint": self.fingerprint,
            "train_configs": [c.to_json() for c in self.train_configs],
            "eval_configs": {k: None if c is None else c.to_json() for k, c in self.eval_configs.items()},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("coalora")
        if state is None:
            raise CoaloraError("checkpoint has no coalora state; was it written by `coalora fit`?")
        if state["fingerprint"] != self.fingerprint:
            raise CoaloraError(
                f"checkpoint was trained on another backbone (weights {state['fingerprint']}, "
                f"this model {self.fingerprint}); pass the model_name it was trained with"
            )
        for key, value in self.state_dict().items():  # the frozen backbone, verified by the fingerprint above
            checkpoint["state_dict"].setdefault(key, value)
        space = self.model.space
        self.train_configs = [space.validate(QConfig.from_json(c)) for c in state["train_configs"]]
        self.eval_configs = {
            k: None if c is None else space.validate(QConfig.from_json(c))
            for k, c in state["eval_configs"].items()
        }


def _key(label: str) -> str:
    return "at_" + label.replace(".", "_")


def describe(module: CoALoRAModule) -> str:
    """One JSON line summarising what the module trains (for logs)."""
    space = module.model.space
    return json.dumps(
        {
            "method": module.hparams.method,
            "targets": len(space),
            "train_configs": len(module.train_configs),
            "eval": {
                k: None if c is None else round(space.avg_bits(c), 4) for k, c in module.eval_configs.items()
            },
            "trainable": sum(p.numel() for p in module.model.trainable_parameters()),
        }
    )
