"""The model is fed only the tokenizer outputs its forward names (issue 23, item 6): a decoder saved with
a WordPiece tokenizer, whose output carries ``token_type_ids``, fits, adapts, loads, generates and
predicts; BERT, which names ``token_type_ids``, still gets them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from coalora.cli import main
from tests.tiny_models import save_wordpiece_llama, tiny_config, tiny_glue_data, untrained_task

REPO = Path(__file__).resolve().parents[1]
TEXT_TINY = "tests/conf/text_tiny.yaml"
TEXTS = ["the film is", "a gripping , funny and moving film"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def wordpiece_lm(tmp_path_factory) -> Path:
    return save_wordpiece_llama(tmp_path_factory.mktemp("wordpiece") / "llama-lm")


@pytest.fixture(scope="module")
def wordpiece_classifier(tmp_path_factory) -> Path:
    return save_wordpiece_llama(tmp_path_factory.mktemp("wordpiece") / "llama-cls", causal=False)


def _record_inputs(model: nn.Module) -> list[set[str]]:
    """The keyword names of every call to ``model`` from now on."""
    seen: list[set[str]] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    return seen


def _run_args(tmp_path: Path) -> list[str]:
    out = str(tmp_path / "run")
    return ["--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out]


# -- the helper ------------------------------------------------------------------------------------------


def _encoding(tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoding = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    assert "token_type_ids" in encoding
    return {**encoding, "labels": torch.tensor([0, 1])}


def test_bert_keeps_token_type_ids_and_llama_drops_them_values_unchanged(wordpiece_lm):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from coalora.utils import model_inputs

    encoding = _encoding(wordpiece_lm)
    bert = AutoModelForSequenceClassification.from_config(tiny_config("bert"))
    llama = AutoModelForCausalLM.from_pretrained(wordpiece_lm)
    kept = model_inputs(bert, encoding)
    assert set(kept) == {"input_ids", "attention_mask", "token_type_ids"}  # labels: never
    assert set(model_inputs(llama, encoding)) == {"input_ids", "attention_mask"}
    for key, value in [*kept.items(), *model_inputs(llama, encoding).items()]:
        assert value is encoding[key]


def test_a_forward_that_names_nothing_is_given_everything_but_labels():
    from coalora.utils import model_inputs

    class Wrapper(nn.Module):
        def forward(self, *args, **kwargs):
            return kwargs

    encoding = {"input_ids": torch.ones(1, 2), "token_type_ids": torch.zeros(1, 2), "labels": torch.ones(1)}
    assert set(model_inputs(Wrapper(), encoding)) == {"input_ids", "token_type_ids"}


# -- every place the model is fed tokenizer output --------------------------------------------------------


def test_deployed_and_adaptive_predict_feed_a_decoder_classifier_no_token_type_ids(wordpiece_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from coalora.deploy.adaptive import AdaptiveModel
    from coalora.deploy.loaded import DeployedModel

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_classifier)
    plain = AutoModelForSequenceClassification.from_pretrained(wordpiece_classifier).eval()
    deployed = DeployedModel(plain, tokenizer, {"label_names": ["negative", "positive"]}, None)
    seen = _record_inputs(plain)
    assert [r["label"] in ("negative", "positive") for r in deployed.predict(TEXTS)] == [True, True]
    task, config = untrained_task(wordpiece_classifier, causal=False)
    live = AdaptiveModel(task, tokenizer)
    live.adapt(config)
    seen_live = _record_inputs(task.model.backbone)
    assert len(live.predict(TEXTS)) == 2
    assert seen == seen_live == [{"input_ids", "attention_mask"}]


def test_deployed_and_adaptive_generate_with_a_wordpiece_tokenizer(wordpiece_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coalora.deploy.adaptive import AdaptiveModel
    from coalora.deploy.loaded import DeployedModel

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_lm)
    plain = AutoModelForCausalLM.from_pretrained(wordpiece_lm).eval()
    deployed = DeployedModel(plain, tokenizer, {"task_type": "causal_lm"}, None)
    texts = deployed.generate(TEXTS, max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    task, config = untrained_task(wordpiece_lm, causal=True)
    live = AdaptiveModel(task, tokenizer)
    live.adapt(config)
    assert len(live.generate(TEXTS, max_new_tokens=3)) == 2


def test_glue_training_batches_feed_a_decoder_no_token_type_ids(wordpiece_classifier, glue_dir):
    data = tiny_glue_data(wordpiece_classifier, glue_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert "token_type_ids" in batch  # the collator pads what the tokenizer gives; the task chooses
    task, config = untrained_task(wordpiece_classifier, causal=False)
    seen = _record_inputs(task.model.backbone)
    assert torch.isfinite(task.batch_loss(batch, config))
    assert seen == [{"input_ids", "attention_mask"}]


def test_the_fisher_lm_loss_feeds_a_decoder_no_token_type_ids(wordpiece_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coalora.quant.fisher import _lm_loss

    model = AutoModelForCausalLM.from_pretrained(wordpiece_lm)
    seen = _record_inputs(model)
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_lm)
    loss = _lm_loss(model, tokenizer, TEXTS, False, 32, torch.Generator().manual_seed(0))
    assert loss is not None and torch.isfinite(loss)
    assert seen == [{"input_ids", "attention_mask", "labels"}]


@pytest.mark.slow
def test_fit_adapt_load_generate_with_a_wordpiece_tokenizer(wordpiece_lm, tmp_path):
    """The new user's run of the issue: ``generate`` ended in transformers' "model_kwargs are not used by
    the model: ['token_type_ids']"."""
    from coalora import load
    from coalora.deploy.adaptive import AdaptiveModel

    name = ["--model.model_name", str(wordpiece_lm), "--trainer.max_epochs", "1"]
    assert main(["fit", "--config", TEXT_TINY, *name, *_run_args(tmp_path)]) == 0
    last = next((tmp_path / "run").rglob("last.ckpt"))
    out = tmp_path / "artifact"
    assert main(["adapt", "--ckpt", str(last), "--budget", "3.0", "--out", str(out)]) == 0
    texts = load(out).generate(["the film is"], max_new_tokens=4)
    assert len(texts) == 1 and isinstance(texts[0], str)
    live = AdaptiveModel.from_checkpoint(last)
    live.adapt(3.0)
    assert live.generate(["the film is"], max_new_tokens=4) == texts  # greedy: the same continuation
