"""Which error table the allocator reads (issue 24, item 6): unweighted, Fisher- or activation-weighted.

- ``none``: ‖W − Q(W)‖² per matrix and option, every weight alike (what ``fit`` has always used).
- ``fisher``: Σ F (W − Q(W))², F the empirical Fisher of a language-model loss (:mod:`.fisher`): the
  weighting LQ-LoRA and the paper use.
- ``activation``: tr(E H Eᵀ), E = W − Q(W) and H = E[x xᵀ] of the matrix's input (:mod:`.calibration`,
  the statistics GPTQ rounds with): the mean squared error of the layer's outputs.

The weighted kinds read only *training* rows: in a task, the first :data:`FISHER_EXAMPLES` (Fisher) or
``calibration_examples`` (activation) of the seeded permutation :func:`~.calibration.calibration_indices`
draws, so the calibration examples are the first of the Fisher's. Each statistic is deterministic for a
run's weights, data and seed, so every DDP rank computes the same table (and each is cached on disk).
``coalora allocate``, which has no data module, reads a seeded subset of the texts it is given.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn

from coalora.errors import CoaloraError
from coalora.quant.calibration import DEFAULT_EXAMPLES, calibration_indices

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ErrorWeighting = Literal["none", "fisher", "activation"]
ERROR_WEIGHTINGS: tuple[str, ...] = get_args(ErrorWeighting)
#: training examples the Fisher is computed from (the default of ``coalora allocate --fisher-samples``)
FISHER_EXAMPLES = 256
#: tokens kept per text when texts are tokenized here (the Fisher's own limit)
TEXT_MAX_LENGTH = 128


def check_error_weighting(value: object, where: str = "error_weighting") -> ErrorWeighting:
    """``value`` if it names a weighting, else a one-line error listing them."""
    if value not in ERROR_WEIGHTINGS:
        raise CoaloraError(f"{where} must be one of {', '.join(ERROR_WEIGHTINGS)}, got {value!r}")
    return value  # type: ignore[return-value]


def training_texts(datamodule: Any, n_examples: int = FISHER_EXAMPLES, seed: int | None = None) -> list[str]:
    """The text of the first ``n_examples`` training examples of :func:`calibration_indices`' permutation
    (the Fisher's input): the data module's own tokens decoded, special tokens dropped, so the rows are
    exactly those it trains on (its search split and ``train_limit`` applied), whatever the data source."""
    indices = calibration_indices(datamodule, n_examples, seed)
    dataset, tokenizer = datamodule.train_set, datamodule.tokenizer
    return [tokenizer.decode(dataset[i]["input_ids"], skip_special_tokens=True) for i in indices]


def text_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    n_examples: int = DEFAULT_EXAMPLES,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = TEXT_MAX_LENGTH,
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches from raw texts (``coalora allocate`` has no data module): a seeded subset of
    ``n_examples`` non-empty texts in their order, each truncated to ``max_length`` tokens and padded per
    batch (the statistics drop padding)."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CoaloraError("no text to calibrate on; pass non-empty training sentences")
    if n_examples < 1:
        raise CoaloraError(f"n_examples={n_examples} is too small; calibrate on at least 1 example")
    if len(texts) > n_examples:
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), n_examples))]
    if tokenizer.pad_token_id is None:  # decoders often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return [
        dict(
            tokenizer(
                list(texts[start : start + batch_size]),
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
        )
        for start in range(0, len(texts), batch_size)
    ]


def backbone_hessians(
    backbone: nn.Module,
    model_name: str,
    batches: Sequence[dict[str, torch.Tensor]],
    fingerprint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """H = E[x xᵀ] of every target matrix's input of a plain backbone over ``batches``, by the one
    calibration pass (:func:`~.calibration_cache.cached_input_hessians`): the backbone is wrapped, in
    place, in a CoA-LoRA model whose adapter is seeded and scaled to 0, so the key is stable and the
    statistics are the backbone's own."""
    from coalora.nn.model import CoALoRAModel
    from coalora.quant.calibration_cache import cached_input_hessians

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CoALoRAModel(backbone, model_name, rank=1, use_mapper=False, train_head=False)
    for layer in model.layers:
        layer.scaling = 0.0
    return cached_input_hessians(model, batches, fingerprint=fingerprint, cache_dir=cache_dir)
