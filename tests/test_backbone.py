"""Offline-first model resolution and target discovery on BERT, RoBERTa and LLaMA (SPEC §2.1)."""

from __future__ import annotations

import pytest

from coalora.errors import CoaloraError
from coalora.pretrained import DEFAULT_MODEL, load_classifier, resolve_model_path
from coalora.quant.targets import discover_targets, module_types, target_weights, weights_fingerprint


@pytest.mark.parametrize(
    "kind, per_block, prefix",
    [
        ("bert", 6, "bert.encoder.layer"),
        ("roberta", 6, "roberta.encoder.layer"),
        ("llama", 7, "model.layers"),
    ],
)
def test_targets_discovered_from_the_model(tiny_models_dir, kind, per_block, prefix):
    model = load_classifier(str(tiny_models_dir / f"tiny-{kind}"), num_labels=2)
    assert model.training
    targets = discover_targets(model)
    assert len(targets) == 2 * per_block
    assert all(t.name.startswith(prefix) for t in targets)
    assert [t.block_index for t in targets] == [0] * per_block + [1] * per_block
    types = module_types(targets)
    assert len(types) == per_block  # attention output and FFN output are distinct types
    assert "classifier" not in " ".join(t.name for t in targets)


def test_packaged_minilm_resolves_offline_and_has_36_targets():
    path = resolve_model_path(DEFAULT_MODEL)
    assert path != DEFAULT_MODEL
    model = load_classifier(DEFAULT_MODEL, num_labels=2)
    targets = discover_targets(model)
    assert len(targets) == 36 and sum(t.numel for t in targets) == 10_616_832


def test_fingerprint_changes_with_weights(tiny_models_dir):
    model = load_classifier(str(tiny_models_dir / "tiny-bert"), num_labels=2)
    targets = discover_targets(model)
    before = weights_fingerprint(target_weights(model, targets))
    assert before == weights_fingerprint(target_weights(model, targets))
    model.bert.encoder.layer[0].attention.self.query.weight.data[0, 0] += 1
    assert weights_fingerprint(target_weights(model, targets)) != before


def test_unknown_model_gives_one_line_error(tmp_path):
    with pytest.raises(CoaloraError, match="cannot load model") as info:
        load_classifier(str(tmp_path / "no-such-model"), num_labels=2)
    assert "\n" not in str(info.value)
