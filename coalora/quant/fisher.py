"""Empirical Fisher of the target matrices: mean squared gradients of a language-model loss (SPEC §2.5).

The Fisher weighs each weight's quantization error by how much the model's predictions depend on it. Like
the authors (masked-LM loss on C4 for RoBERTa) we take it from a language-model loss, but on text the user
provides, such as a GLUE task's training sentences: a masked-LM loss for encoders (15% of the non-special
tokens replaced by the mask token) and the next-token loss for decoders.

Checkpoints without an LM head (sentence-transformers models such as all-MiniLM-L6-v2 ship only the
encoder) get a freshly initialised head from ``transformers``; their gradients then reflect a random
head rather than the pretraining objective. That is reported as a warning, and such a Fisher is best
treated as a rough weighting (the plain, F = 1 table is the alternative).
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from coalora.errors import CoaloraError
from coalora.pretrained import load_tokenizer, resolve_model_path
from coalora.quant.targets import TargetMatrix, discover_targets, weights_fingerprint
from coalora.utils import model_inputs, quiet_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


MASK_RATE = 0.15


def empirical_fisher(
    model_name: str,
    texts: Sequence[str],
    targets: Sequence[TargetMatrix],
    num_samples: int = 256,
    batch_size: int = 1,
    max_length: int = 128,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean squared LM-loss gradient of every target matrix, keyed by the targets' (classifier) names.

    ``targets`` come from the classifier model (the names qconfig files use); the LM model's matrices are
    matched to them by block index and module type, which both models share even where their prefixes
    differ. At most ``num_samples`` texts (a seeded random subset) are used. With ``batch_size`` 1 this is
    the empirical Fisher (squared per-sample gradients); larger batches square minibatch gradients, which
    is cheaper but shrinks the per-sample noise part by about the batch size.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CoaloraError("no text to compute the Fisher from; pass non-empty training sentences")
    if num_samples < 1 or batch_size < 1 or max_length < 8:
        raise CoaloraError(
            f"Fisher needs num_samples >= 1, batch_size >= 1 and max_length >= 8; "
            f"got {num_samples}, {batch_size}, {max_length}"
        )
    rng = random.Random(seed)
    if len(texts) > num_samples:
        texts = [texts[i] for i in sorted(rng.sample(range(len(texts)), num_samples))]
    tokenizer = load_tokenizer(model_name)
    model, masked = _load_lm(model_name, tokenizer)
    params = _match_targets(model, targets, model_name)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    batches = 0
    for start in range(0, len(texts), batch_size):
        loss = _lm_loss(model, tokenizer, texts[start : start + batch_size], masked, max_length, generator)
        if loss is None:
            continue
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, grad in zip(params, grads, strict=True):
            sums[name].add_(grad.detach().float().square())
        batches += 1
    if batches == 0:
        raise CoaloraError("every Fisher text was empty after tokenisation; pass longer sentences")
    return {name: total / batches for name, total in sums.items()}


def _load_lm(model_name: str, tokenizer: PreTrainedTokenizerBase) -> tuple[nn.Module, bool]:
    """The backbone with its LM head, in eval mode (no dropout); True when it is a masked LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    path = resolve_model_path(model_name)
    try:
        config = AutoConfig.from_pretrained(path)
        masked = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and tokenizer.mask_token is not None
        loader = AutoModelForMaskedLM if masked else AutoModelForCausalLM
        with quiet_transformers():  # we report a missing head ourselves, in one line
            # with output_loading_info, from_pretrained returns (model, info); its stubs do not say so
            model, info = loader.from_pretrained(path, output_loading_info=True)  # type: ignore[misc]
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CoaloraError(
            f"cannot load '{model_name}' with a language-model head for the Fisher ({first}); "
            "use a checkpoint with an MLM or causal-LM head, or allocate without a Fisher"
        ) from err
    base = getattr(model, "base_model_prefix", "")
    fresh = [k for k in info.get("missing_keys", []) if not (base and k.startswith(base + "."))]
    if fresh:
        warnings.warn(
            f"'{model_name}' has no trained {'masked' if masked else 'causal'}-LM head "
            f"({len(fresh)} head tensors freshly initialised), so its Fisher reflects a random head; "
            "treat it as a rough weighting",
            stacklevel=3,
        )
    model.eval()
    return model, masked


def _match_targets(
    model: nn.Module, targets: Sequence[TargetMatrix], model_name: str
) -> dict[str, nn.Parameter]:
    """The LM model's weight for each target, matched by (block index, module type), checked by shape."""
    modules = dict(model.named_modules())
    by_position = {(t.block_index, t.module_type): t.name for t in discover_targets(model)}
    params = {}
    for target in targets:
        lm_name = by_position.get((target.block_index, target.module_type))
        weight = None if lm_name is None else modules[lm_name].weight
        if weight is None or tuple(weight.shape) != (target.out_features, target.in_features):
            raise CoaloraError(
                f"the LM model of '{model_name}' has no matrix matching '{target.name}'; "
                "compute the Fisher with the same backbone as the classifier"
            )
        params[target.name] = weight
    return params


def _lm_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    masked: bool,
    max_length: int,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """The batch's masked- or causal-LM loss, or None when it has no token to predict."""
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
        return_special_tokens_mask=True,
    )
    ids, attention = enc["input_ids"], enc["attention_mask"]
    if masked:
        eligible = (enc["special_tokens_mask"] == 0) & (attention == 1)
        inputs, labels = mask_tokens(ids, eligible, tokenizer.mask_token_id, generator)
    else:
        inputs, labels = ids, ids.masked_fill(attention == 0, -100)
        if int((labels[:, 1:] != -100).sum()) == 0:  # a one-token text predicts nothing
            return None
    if int((labels != -100).sum()) == 0:
        return None
    kwargs = {**model_inputs(model, enc), "input_ids": inputs}  # BERT's token_type_ids; no decoder's
    return model(labels=labels, **kwargs).loss


def mask_tokens(
    ids: torch.Tensor,
    eligible: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    rate: float = MASK_RATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``rate`` of the eligible tokens by the mask token; labels are -100 except there.

    Every text with an eligible token gets at least one mask, so short sentences still contribute.
    """
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & eligible
    lacking = eligible.any(dim=1) & ~chosen.any(dim=1)
    if lacking.any():
        scores = torch.rand(ids.shape, generator=generator).masked_fill(~eligible, -1.0)
        pick = scores.argmax(dim=1)
        chosen[lacking, pick[lacking]] = True
    return ids.masked_fill(chosen, mask_id), ids.masked_fill(~chosen, -100)


def cached_fisher(
    model_name: str,
    texts: Sequence[str],
    targets: Sequence[TargetMatrix],
    weights: dict[str, torch.Tensor],
    cache_dir: str | os.PathLike | None = None,
    num_samples: int = 256,
    batch_size: int = 1,
    max_length: int = 128,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """:func:`empirical_fisher`, cached on disk by backbone weights, texts and settings (it takes minutes
    on large models, and the error table's cache key needs it)."""
    from coalora.utils import default_cache_dir, save_atomic

    digest = hashlib.sha256()
    for part in (
        weights_fingerprint(weights),
        model_name,
        num_samples,
        batch_size,
        max_length,
        seed,
        MASK_RATE,
    ):
        digest.update(f"{part}\x00".encode())
    for text in texts:
        digest.update(text.encode() + b"\x00")
    path = (
        Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    ) / f"fisher-{digest.hexdigest()[:16]}.pt"
    names = [t.name for t in targets]
    if path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            if list(data) == names:
                return data
        except (OSError, RuntimeError, EOFError):
            pass
    fisher = empirical_fisher(model_name, texts, targets, num_samples, batch_size, max_length, seed)
    save_atomic(fisher, path)
    return fisher
