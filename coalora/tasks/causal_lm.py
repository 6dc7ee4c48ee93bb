"""Causal language modelling (LLaMA, Qwen2, Mistral-style decoders): the paper's LLM experiments (SPEC §7).

Next-token cross-entropy on packed text blocks; perplexity = exp(mean token NLL over every evaluation
token) per evaluation configuration, through :class:`~coalora.tasks.lm_metrics.TokenPerplexity` (it
accumulates the total NLL and the token count, so it is not a mean of per-batch perplexities). Only LoRA
and the mapper train: ``lm_head`` and the embeddings stay frozen, tied or not.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MetricCollection

from coalora.data.text_datamodule import TextDataModule
from coalora.errors import CoaloraError
from coalora.pretrained import ENCODER_TYPES, load_causal_lm, model_type
from coalora.tasks.base import CoALoRATask
from coalora.tasks.lm_metrics import IGNORE_INDEX, TokenPerplexity
from coalora.utils import model_inputs

#: the text data module's arguments that a checkpoint's saved data arguments may set
TEXT_ARGUMENTS = frozenset(inspect.signature(TextDataModule.__init__).parameters) - {"self"}


def next_token_targets(batch: dict) -> torch.Tensor:
    """Token t+1 as the target of position t; padded positions (attention mask 0) are ignored."""
    ids = batch["input_ids"]
    targets = ids[:, 1:].clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        targets[mask[:, 1:] == 0] = IGNORE_INDEX
    return targets


class CausalLMTask(CoALoRATask):
    """CoA-LoRA (or a baseline) on an ``AutoModelForCausalLM`` backbone.

    Every other argument is :class:`~coalora.tasks.base.CoALoRATask`'s; target matrices are q, k, v, o,
    gate, up and down of every block.
    """

    task_type = "causal_lm"
    trains_head = False
    datamodule_class = "coalora.data.text_datamodule.TextDataModule"

    def __init__(
        self,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            dtype: the frozen base's weights (``bfloat16`` when training in bf16 halves its memory).
            gradient_checkpointing: recompute each block's activations in backward (long blocks, big models).
            **kwargs: the base class's arguments (method, rank, budgets, ...).
        """
        if (
            gradient_checkpointing
            and not kwargs.get("backward_per_config", True)
            and kwargs.get("configs_per_step", 2) > 1
            and kwargs.get("method", "coalora") == "coalora"
        ):
            # one backward of the K summed losses: each recomputed block would read the weights of the
            # configuration set last, not its own, so the gradients would be wrong
            raise CoaloraError(
                "gradient_checkpointing with configs_per_step > 1 needs backward_per_config: true (one "
                "backward of the summed losses recomputes every block with the last configuration's weights)"
            )
        super().__init__(**kwargs)

    def load_backbone(self) -> nn.Module:
        kind = model_type(self.hparams.model_name)
        if kind in ENCODER_TYPES:  # transformers would load e.g. BERT as a (never pretrained) LM head model
            raise CoaloraError(
                f"'{self.hparams.model_name}' is an encoder ({kind}), not a causal LM; "
                "use coalora.tasks.ClassificationTask for it, or pass a decoder (LLaMA, Qwen2, Mistral)"
            )
        model: Any = load_causal_lm(self.hparams.model_name, self.hparams.dtype)
        if self.hparams.gradient_checkpointing:
            # non-reentrant checkpointing lets gradients reach LoRA though the inputs need none
            settings = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name for the switch
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
            model.config.use_cache = False
        return model

    def forward(self, batch: dict, config: Any) -> torch.Tensor:
        """Logits ``(B, T, V)``; no KV cache during training and evaluation."""
        self.activate(config)
        return self.model(config, use_cache=False, **model_inputs(self.model.backbone, batch)).logits

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        logits = outputs[:, :-1].float()
        targets = next_token_targets(batch)
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )

    def distillation_loss(self, outputs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL(teacher ‖ student) of the next-token distributions, averaged over positions."""
        vocab = outputs.shape[-1]
        student = outputs.float().log_softmax(dim=-1).reshape(-1, vocab)
        target = teacher.float().log_softmax(dim=-1).reshape(-1, vocab)
        return nn.functional.kl_div(student, target, log_target=True, reduction="batchmean")

    def new_metrics(self) -> MetricCollection:
        return MetricCollection({"ppl": TokenPerplexity(ignore_index=IGNORE_INDEX)})

    def metric_inputs(self, outputs: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits in their own dtype (the metric casts a slice at a time) and the next tokens."""
        return outputs[:, :-1], next_token_targets(batch)

    def data_module(self, **overrides: Any) -> TextDataModule:
        hp = self.hparams
        known = {k: v for k, v in overrides.items() if k in TEXT_ARGUMENTS}
        return TextDataModule(**{**known, "model_name": hp.model_name, "seed": hp.seed})

    @property
    def evaluation_name(self) -> str:
        return "lm"

    @property
    def main_metric(self) -> str:
        return "ppl"

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["input_ids"])
