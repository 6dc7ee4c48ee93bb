"""fp16 embedding tables in artifacts (issue #13, item 5): half the bytes, served narrow and widened per
looked-up row, logits within fp16 rounding of the fp32 artifact; tied tables keep the model's dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from coalora.deploy.export import export
from coalora.deploy.layout import FULL_PRECISION_FILE
from coalora.deploy.loaded import load
from coalora.errors import CoaloraError
from tests.tiny_models import untrained_task

TEXTS = ["a gripping , funny and moving film", "the plot is thin and the acting is wooden"]


@pytest.fixture(scope="module")
def bert_pair(tiny_models_dir, tmp_path_factory):
    """The same task and configuration exported with fp32 and with fp16 embedding tables."""
    task, config = untrained_task(tiny_models_dir / "tiny-bert", causal=False)
    root = tmp_path_factory.mktemp("fp16")
    for dtype in ("float32", "float16"):
        export(task, root / dtype, qconfig=config, embedding_dtype=dtype)
    return root / "float32", root / "float16"


def test_fp16_tables_are_stored_narrow_and_halve_their_bytes(bert_pair):
    wide, narrow = (load_file(folder / FULL_PRECISION_FILE) for folder in bert_pair)
    meta = load(bert_pair[1]).metadata
    tables = meta["narrowed_embeddings"]
    assert "bert.embeddings.word_embeddings.weight" in tables and len(tables) == 3
    for key, value in narrow.items():
        assert value.dtype == (torch.float16 if key in tables else wide[key].dtype)
        assert torch.equal(value, wide[key].to(value.dtype))
    halved = sum(wide[key].numel() * 2 for key in tables)  # 4 bytes a weight down to 2
    wide_sizes = load(bert_pair[0]).metadata["sizes"]
    assert meta["sizes"]["embeddings"] == wide_sizes["embeddings"] - halved
    assert meta["sizes"]["weights"] == wide_sizes["weights"] - halved
    assert load(bert_pair[0]).metadata["narrowed_embeddings"] == []


def test_fp16_tables_serve_narrow_with_the_fp32_artifacts_logits(bert_pair):
    wide, narrow, narrow_dense = load(bert_pair[0]), load(bert_pair[1]), load(bert_pair[1], dequantize=True)
    table = narrow.model.get_input_embeddings().weight
    assert table.dtype == torch.float16  # at rest: not widened on load
    batch = dict(narrow.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    logits = narrow.logits(batch)
    assert logits.dtype == torch.float32
    assert float((logits - narrow_dense.logits(batch)).abs().max()) <= 1e-5  # packed == dense, same tables
    difference = float((logits - wide.logits(batch)).abs().max())
    assert 0 < difference <= 1e-2  # fp16 rounding of the tables, no more
    labels = [[row["label"] for row in model.predict(TEXTS)] for model in (narrow, wide)]
    assert labels[0] == labels[1]


def test_an_untied_causal_lm_generates_with_fp16_tables(tiny_models_dir, tmp_path):
    task, config = untrained_task(tiny_models_dir / "tiny-llama-lm", causal=True)
    export(task, tmp_path / "lm", qconfig=config, embedding_dtype="float16")
    packed, dense = load(tmp_path / "lm"), load(tmp_path / "lm", dequantize=True)
    assert packed.model.get_input_embeddings().weight.dtype == torch.float16
    assert packed.model.lm_head.weight.dtype == torch.float32
    prompts = ["the film", "a small town was"]
    assert packed.generate(prompts, max_new_tokens=4) == dense.generate(prompts, max_new_tokens=4)


def test_a_table_tied_to_the_lm_head_keeps_the_model_dtype(tiny_models_dir, tmp_path):
    task, config = untrained_task(tiny_models_dir / "tiny-qwen2-lm", causal=True, seed=1)
    export(task, tmp_path / "tied", qconfig=config, embedding_dtype="float16")
    packed = load(tmp_path / "tied")
    assert packed.metadata["narrowed_embeddings"] == []
    assert packed.model.lm_head.weight is packed.model.model.embed_tokens.weight
    assert packed.model.lm_head.weight.dtype == torch.float32


def test_an_unknown_embedding_dtype_is_refused_before_writing(tiny_models_dir, tmp_path):
    task, config = untrained_task(tiny_models_dir / "tiny-bert", causal=False)
    with pytest.raises(CoaloraError, match="float32, float16"):
        export(task, tmp_path / "out", qconfig=config, embedding_dtype="int8")
    assert not (tmp_path / "out").exists()
