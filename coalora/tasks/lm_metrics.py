"""Perplexity for causal language modelling: exp(total token NLL / token count) over every evaluation token.

torchmetrics' ``Perplexity`` takes a softmax and then a log, so one target token whose probability is
below fp32's range gives -log 0 = inf (one such token among a thousand turns a finite exp(mean NLL) into
inf, and a mean over configurations with it), and it materialises a ``(B·T, V)`` fp32 softmax. Here the
NLL comes from ``cross_entropy`` (a log-softmax: finite for any finite logits), summed a few rows at a time
so only a bounded fp32 slice of the logits ever exists, and accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F
from torchmetrics import Metric

#: label value the loss and the perplexity skip (padding, and the position after a block's last token)
IGNORE_INDEX = -100
#: about how many logits one fp32 slice holds (2**24 floats = 64 MiB, plus as much for its log-softmax)
CHUNK_ELEMENTS = 2**24


def _row_chunks(
    logits: torch.Tensor, targets: torch.Tensor, rows: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(rows, V)`` slices of ``logits`` with their targets, as views: a reshape of a time-sliced
    ``(B, T, V)`` tensor would copy the whole of it, so each sequence is sliced on its own."""
    vocab = logits.shape[-1]
    sequences = logits.reshape(-1, *logits.shape[-2:]) if logits.dim() > 2 else logits.unsqueeze(0)
    labels = targets.reshape(sequences.shape[:-1])
    for sequence, label in zip(sequences, labels, strict=True):
        for start in range(0, len(label), rows):
            yield sequence[start : start + rows].reshape(-1, vocab), label[start : start + rows]


class TokenPerplexity(Metric):
    """exp(sum of token NLLs / number of tokens), positions labelled ``ignore_index`` skipped.

    The two sums are float64 states reduced by summing, so under DDP it is the perplexity of every rank's
    tokens together (not a mean of per-rank or per-batch perplexities).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    total_nll: torch.Tensor
    tokens: torch.Tensor

    def __init__(self, ignore_index: int = IGNORE_INDEX, chunk_elements: int = CHUNK_ELEMENTS, **kwargs: Any):
        """
        Args:
            ignore_index: the target value of positions that do not count.
            chunk_elements: about how many logits are cast to fp32 at once (memory, not results).
            **kwargs: torchmetrics' ``Metric`` arguments.
        """
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.chunk_elements = chunk_elements
        self.add_state("total_nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: ``logits`` ``(..., T, V)`` in any float dtype, ``targets`` ``(..., T)``."""
        if logits.shape[:-1] != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
        rows = max(1, self.chunk_elements // max(1, logits.shape[-1]))
        total = torch.zeros((), dtype=torch.float64, device=self.total_nll.device)
        for chunk, labels in _row_chunks(logits.detach(), targets, rows):
            nll = F.cross_entropy(chunk.float(), labels, ignore_index=self.ignore_index, reduction="sum")
            total += nll.to(total)
        self.total_nll += total
        self.tokens += (targets != self.ignore_index).sum().to(self.tokens)

    def compute(self) -> torch.Tensor:
        """exp(mean token NLL), in float64 (nan before any token)."""
        return torch.exp(self.total_nll / self.tokens)
