"""The causal-LM task's perplexity: exp(mean token NLL) from float64 sums of cross-entropy, finite whenever
the NLL is, skipping ignored positions, the same however the tokens are split into updates."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from coalora.tasks.causal_lm import CausalLMTask
from coalora.tasks.lm_metrics import IGNORE_INDEX, TokenPerplexity

VOCAB = 32


@pytest.fixture(scope="module")
def task(tiny_models_dir) -> CausalLMTask:
    model = str(tiny_models_dir / "tiny-llama-lm")
    return CausalLMTask(model_name=model, method="fp", rank=4, train_budgets=[], eval_budgets=[])


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean NLL of the counted tokens), all in float64."""
    nll = F.cross_entropy(
        logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return math.exp(float(nll))


def _sure_batch(length: int, extreme_at: int | None = None) -> tuple[torch.Tensor, dict]:
    """Logits that give every next token a high probability, except one token 110 nats unlikely."""
    ids = torch.randint(0, VOCAB, (1, length + 1), generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(1, length + 1, VOCAB)
    logits[0, torch.arange(length), ids[0, 1:]] = 10.0
    if extreme_at is not None:
        logits[0, extreme_at, ids[0, extreme_at + 1]] = -110.0
    return logits, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_one_extremely_unlikely_token_leaves_perplexity_finite(task):
    """1,000 tokens, one whose probability (e^-110) is below fp32's range: a softmax-then-log metric says
    inf, while exp(mean NLL) is about 1.12."""
    logits, batch = _sure_batch(1000, extreme_at=500)
    metrics = task.new_metrics()
    metrics.update(*task.metric_inputs(logits, batch))
    ppl = float(metrics.compute()["ppl"])
    expected = _reference(logits[:, :-1], batch["input_ids"][:, 1:])
    assert math.isfinite(ppl) and 1.05 < expected < 1.2
    assert ppl == pytest.approx(expected, rel=1e-6)


def test_ignored_positions_are_skipped(task):
    """Padded positions count for nothing, however absurd their logits are."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9))
    logits = torch.randn(3, 9, VOCAB)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    targets = ids[:, 1:]
    padded = mask[:, 1:] == 0
    logits[:, :-1][padded] = 0.0
    logits[:, :-1][(*padded.nonzero(as_tuple=True), targets[padded])] = -1e4  # inf-prone if counted
    metrics = task.new_metrics()
    metrics.update(*task.metric_inputs(logits, {"input_ids": ids, "attention_mask": mask}))
    kept = mask[:, 1:].bool()
    expected = _reference(logits[:, :-1][kept], targets[kept])
    assert float(metrics.compute()["ppl"]) == pytest.approx(expected, rel=1e-6)


def test_accumulating_several_updates_equals_one_update_of_all_the_tokens():
    torch.manual_seed(2)
    logits = 3.0 * torch.randn(6, 11, VOCAB)
    targets = torch.randint(0, VOCAB, (6, 11))
    targets[4, 7:] = IGNORE_INDEX
    whole = TokenPerplexity()
    whole.update(logits, targets)
    pieces = TokenPerplexity(chunk_elements=3 * VOCAB)  # three rows at a time: many slices per sequence
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        pieces.update(logits[rows], targets[rows])
    pieces.update(logits[:0], targets[:0])  # an empty batch adds nothing
    flat = TokenPerplexity()
    flat.update(logits.reshape(-1, VOCAB), targets.reshape(-1))  # (N, V) logits as well as (B, T, V)
    expected = _reference(logits, targets)
    for metric in (whole, pieces, flat):
        assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)
    assert whole.tokens.dtype == whole.total_nll.dtype == torch.float64
    assert int(whole.tokens) == 6 * 11 - 4


def test_bf16_logits_are_cast_a_few_rows_at_a_time(monkeypatch):
    """Low-precision logits go in as they are and give the perplexity of exactly those values; only
    ``chunk_elements`` of them are ever in fp32 at once (no softmax, no full fp32 copy)."""
    torch.manual_seed(3)
    logits = (4.0 * torch.randn(2, 40, VOCAB)).bfloat16()[:, :-1]  # a time slice, as the task passes it
    targets = torch.randint(0, VOCAB, (2, 39))
    seen: list[tuple[torch.dtype, int]] = []
    cross_entropy = F.cross_entropy

    def recording(rows: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append((rows.dtype, rows.numel()))
        return cross_entropy(rows, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", recording)
    metric = TokenPerplexity(chunk_elements=5 * VOCAB)
    metric.update(logits, targets)
    monkeypatch.undo()
    assert len(seen) == 2 * 8 and all(d == torch.float32 and n <= 5 * VOCAB for d, n in seen)
    assert float(metric.compute()) == pytest.approx(_reference(logits, targets), rel=1e-6)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        TokenPerplexity().update(torch.zeros(2, 5, VOCAB), torch.zeros(2, 4, dtype=torch.long))
