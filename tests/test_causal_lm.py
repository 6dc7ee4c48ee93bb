"""The causal-LM task end to end on tiny random LLaMA / Qwen2 decoders: text data, perplexity, frozen
heads, the search with the LM loss, adapt → load → generate, and bad inputs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from coalora.cli import main
from coalora.data.text_datamodule import TextDataModule, pack_documents
from coalora.data.text_files import read_documents
from coalora.errors import CoaloraError
from coalora.tasks.causal_lm import CausalLMTask

REPO = Path(__file__).resolve().parents[1]
TINY = "tests/conf/text_tiny.yaml"
TEXT = REPO / "tests" / "fixtures" / "text_tiny"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _run_args(tmp_path: Path) -> list[str]:
    out = str(tmp_path / "run")
    return ["--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out]


def _task(model: Path, **kwargs) -> CausalLMTask:
    defaults = dict(
        model_name=str(model), rank=4, alpha=8.0, train_budgets=[2.5, 3.3, 5.0], eval_budgets=[3.0]
    )
    return CausalLMTask(**{**defaults, **kwargs})


def _data(model: Path, **kwargs) -> TextDataModule:
    defaults = dict(
        model_name=str(model),
        train_files=[str(TEXT / "train.txt")],
        val_files=[str(TEXT / "valid.jsonl")],
        test_files=[str(TEXT / "test.txt")],
        block_size=32,
        batch_size=4,
        eval_batch_size=4,
        search_blocks=4,
    )
    return TextDataModule(**{**defaults, **kwargs})


@pytest.mark.parametrize("model", ["tiny-llama-lm", "tiny-qwen2-lm"])
def test_fit_validate_test_and_evaluate_through_main(model, tiny_models_dir, tmp_path, capsys):
    name = ["--model.model_name", str(tiny_models_dir / model)]
    assert main(["fit", "--config", TINY, *name, *_run_args(tmp_path)]) == 0
    last = next((tmp_path / "run").rglob("last.ckpt"))
    archive = json.loads(next((tmp_path / "run").rglob("search_archive.json")).read_text())
    assert archive["epoch"] == 0 and len(archive["entries"]) >= 3  # a round scored with the LM loss
    assert all(math.isfinite(e["f1"]) and e["f1"] > 0 for e in archive["entries"])
    for stage in ("validate", "test"):
        assert main([stage, "--config", TINY, *name, *_run_args(tmp_path), "--ckpt_path", str(last)]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--ckpt", str(last), "--random", "2", "--seen", "1", "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["task"] == "lm" and [r["kind"] for r in data["results"]] == [
        "budget",
        "random",
        "random",
        "seen",
    ]
    for row in data["results"]:
        assert row["ppl"] == pytest.approx(math.exp(row["loss"]), rel=1e-4)  # equal-size blocks
    summary = data["summary"]["coalora"]
    assert 0 < summary["hypervolume"] < 1 and summary["mean_ppl"] == pytest.approx(
        data["results"][0]["ppl"], 1e-3
    )
    assert (out / "eval.png").stat().st_size > 5000


def test_perplexity_is_exp_of_the_mean_nll_over_all_tokens(tiny_models_dir):
    task = _task(tiny_models_dir / "tiny-llama-lm", method="fp")
    torch.manual_seed(0)
    vocab = 300
    batches, nll, count = [], 0.0, 0
    for length, scale in ((6, 1.0), (9, 4.0)):  # two batches whose per-batch perplexities differ a lot
        logits = scale * torch.randn(2, length, vocab)
        ids = torch.randint(0, vocab, (2, length))
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # padding: ignored
        batches.append((logits, {"input_ids": ids, "attention_mask": mask}))
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        nll -= float(logp[keep].sum())
        count += int(keep.sum())
    metrics = task.new_metrics()
    per_batch = []
    for logits, batch in batches:
        metrics.update(*task.metric_inputs(logits, batch))
        per_batch.append(math.exp(float(task.loss(logits, batch))))
    ppl = float(metrics.compute()["ppl"])
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert abs(ppl - sum(per_batch) / 2) > 1.0  # not a mean of per-batch perplexities


@pytest.mark.parametrize("model, tied", [("tiny-llama-lm", False), ("tiny-qwen2-lm", True)])
def test_only_lora_and_the_mapper_train_and_the_lm_head_and_embeddings_stay_frozen(
    model, tied, tiny_models_dir
):
    task = _task(tiny_models_dir / model)
    backbone = task.model.backbone
    assert (backbone.lm_head.weight is backbone.get_input_embeddings().weight) == tied
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n or "mapper" in n) for n in trainable)
    frozen = {
        n: p.detach().clone() for n, p in task.named_parameters() if "lm_head" in n or "embed_tokens" in n
    }
    optimizer = task.configure_optimizers()
    ids = torch.randint(3, 300, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lora_before = task.model.layers[0].lora_A.detach().clone()
    for _ in range(2):
        loss = task.batch_loss(batch, task.train_configs[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(task.model.layers[0].lora_A, lora_before)
    for name, param in task.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    saved: dict = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(saved)
    assert not [k for k in saved["state_dict"] if "lm_head" in k or "embed_tokens" in k]


def test_packing_joins_documents_with_eos_and_drops_the_tail():
    blocks = pack_documents([[5, 6, 7], [8], [9, 10, 11, 12]], eos_id=2, block_size=4)
    assert blocks.tolist() == [[5, 6, 7, 2], [8, 2, 9, 10]]  # 11, 12, 2: less than a block, dropped


def test_blocks_and_the_search_split_are_deterministic_and_disjoint(tiny_models_dir):
    model = tiny_models_dir / "tiny-llama-lm"
    first, again, other = _data(model), _data(model), _data(model, seed=7)
    for data in (first, again, other):
        data.setup("fit")
    assert torch.equal(first.train_set.blocks, again.train_set.blocks)
    assert torch.equal(first.search_set.blocks, again.search_set.blocks)
    assert not torch.equal(first.search_set.blocks, other.search_set.blocks)
    train = {tuple(b) for b in first.train_set.blocks.tolist()}
    assert not train & {tuple(b) for b in first.search_set.blocks.tolist()}
    assert len(first.search_set) == 4
    loader = first.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch1 = [b["input_ids"] for b in loader]
    loader.sampler.set_epoch(1)  # a resumed run replays the epoch's order
    assert all(torch.equal(a, b) for a, b in zip(epoch1, [b["input_ids"] for b in loader], strict=True))


def test_documents_from_txt_jsonl_gzip_and_folders(tmp_path):
    assert read_documents([TEXT / "train.txt"])[0] == "= Article 0 ="
    records = read_documents([TEXT / "valid.jsonl"])
    assert len(records) == 12
    packed = tmp_path / "c4-train.00000-of-01024.json.gz"
    packed.write_bytes(gzip.compress(b'{"text": "one doc", "url": "u"}\n{"text": "two"}\n'))
    (tmp_path / "notes.md").write_text("ignored: not a text format")
    assert read_documents([tmp_path]) == ["one doc", "two"]
    assert read_documents(["text_tiny/valid.jsonl"], data_dir=TEXT.parent) == records


def test_adapt_then_load_gives_the_training_models_logits_and_generates(tiny_models_dir, tmp_path):
    from coalora import load
    from coalora.deploy.adaptive import AdaptiveModel

    name = ["--model.model_name", str(tiny_models_dir / "tiny-qwen2-lm"), "--trainer.max_epochs", "1"]
    assert main(["fit", "--config", TINY, *name, *_run_args(tmp_path)]) == 0
    last = next((tmp_path / "run").rglob("last.ckpt"))
    out = tmp_path / "artifact"
    assert main(["adapt", "--ckpt", str(last), "--budget", "3.0", "--out", str(out)]) == 0
    deployed = load(out)
    live = AdaptiveModel.from_checkpoint(last)
    live.adapt(3.0)
    batch = dict(deployed.tokenizer(["the river was built in 1901 ."], return_tensors="pt"))
    assert torch.allclose(deployed.logits(batch), live.logits(batch), atol=1e-5)
    texts = deployed.generate(["the film", "a small town was"], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert live.generate(["the film"], max_new_tokens=4) == texts[:1]  # greedy: the same continuation
    with pytest.raises(CoaloraError, match="generate"):
        deployed.predict(["a text"])
    peft_out = tmp_path / "peft"
    assert (
        main(["adapt", "--ckpt", str(last), "--budget", "3.0", "--out", str(peft_out), "--format", "peft"])
        == 0
    )
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(peft_out / "base")
    with torch.no_grad():
        logits = PeftModel.from_pretrained(base, peft_out / "adapter").eval()(**batch).logits
    assert torch.allclose(logits, deployed.logits(batch), atol=1e-5)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data.train_files", "[{no_text}]"], "has no 'text' field"),
        (["--data.train_files", "[{empty}]"], "corpus is empty"),
        (["--data.block_size", "4096"], "longer than the model's context"),
        (["--data.train_files", "[missing.txt]"], "does not exist"),
        (["--data.search_blocks", "500"], "leaves no training blocks"),
        (["--model.model_name", "{bert}"], "is an encoder"),
    ],
)
def test_bad_inputs_give_one_line_errors(flags, message, tiny_models_dir, tmp_path, capsys):
    files = {
        "no_text": _write(tmp_path / "bad.jsonl", '{"content": "no text field"}\n'),
        "empty": _write(tmp_path / "empty.txt", "\n \n"),
        "bert": tiny_models_dir / "tiny-bert",
    }
    flags = [f.format(**files) for f in flags]
    args = ["fit", "--config", TINY, "--model.model_name", str(tiny_models_dir / "tiny-llama-lm")]
    assert main([*args, *_run_args(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("coalora:")]
    assert len(error) == 1 and error[0].startswith("coalora: error:") and message in error[0], err
    assert "Traceback" not in err


def test_a_classifier_checkpoint_is_refused_by_the_causal_task(tiny_models_dir, tmp_path, capsys):
    bert = ["--model.model_name", str(tiny_models_dir / "tiny-bert"), "--trainer.max_epochs", "1"]
    assert main(["fit", "--config", "tests/conf/sst2_tiny.yaml", *bert, *_run_args(tmp_path / "cls")]) == 0
    ckpt = next((tmp_path / "cls" / "run").rglob("last.ckpt"))
    capsys.readouterr()
    args = ["validate", "--config", TINY, "--model.model_name", str(tiny_models_dir / "tiny-llama-lm")]
    assert main([*args, *_run_args(tmp_path), "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("coalora:")]
    assert len(error) == 1 and "classification" in error[0] and "Traceback" not in err


def test_gradient_checkpointing_gives_the_same_gradients_at_k_2(tiny_models_dir):
    """Each configuration's backward runs while its own weights are active, so the blocks recomputed
    by checkpointing see them; one backward of the summed losses would not, and is refused."""
    model = tiny_models_dir / "tiny-llama-lm"
    ids = torch.randint(3, 300, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        task = _task(model, configs_per_step=2, gradient_checkpointing=checkpointing).train()
        backbone = task.model.backbone
        assert (
            getattr(backbone, "is_activation_checkpointing", backbone.is_gradient_checkpointing)
            == checkpointing
        )
        configs = task.sample_configs()
        assert len(configs) == 2 and configs[0].matrices != configs[1].matrices
        task.training_step(batch, 0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in task.model.trainable_parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(CoaloraError, match="backward_per_config: true"):
        _task(model, configs_per_step=2, gradient_checkpointing=True, backward_per_config=False)


def test_allocate_for_a_decoder_with_a_fisher_from_text(tiny_models_dir, tmp_path, capsys):
    model = tiny_models_dir / "tiny-llama-lm"
    out = tmp_path / "qconfigs"
    args = ["allocate", "--model", str(model), "--budget", "3.0", "--out-dir", str(out)]
    assert main([*args, "--fisher-text", str(TEXT / "train.txt")]) == 0
    assert "Fisher" in capsys.readouterr().out
    task = _task(model)
    config = task.model.space.load(next(out.glob("*.json")))  # the task's matrix names
    assert abs(task.model.space.avg_bits(config) - 3.0) < 0.01


@pytest.fixture(scope="module")
def search_only_run(tiny_models_dir, tmp_path_factory) -> Path:
    """A trained tiny LM whose local text has neither val nor test files: training validated on the
    search split, as designed for watching a run."""
    root = tmp_path_factory.mktemp("search_only")
    args = ["fit", "--config", TINY, "--model.model_name", str(tiny_models_dir / "tiny-llama-lm")]
    args += ["--data.val_files", "null", "--data.test_files", "null", *_run_args(root)]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        assert main(args) == 0
    metrics = next((root / "run").rglob("metrics.csv")).read_text()
    assert "val/ppl" in metrics  # training-time validation ran, on the search split
    return next((root / "run").rglob("last.ckpt"))


def _with_test_files(ckpt: Path, folder: Path) -> Path:
    """A copy of ``ckpt`` whose saved data arguments also name the test text."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["test_files"] = [str(TEXT / "test.txt")]
    path = folder / "with_test.ckpt"
    torch.save(checkpoint, path)
    return path


def _listing(*folders: Path) -> set[Path]:
    return {p for folder in folders for p in folder.rglob("*")}


def test_evaluate_refuses_to_report_the_search_split(search_only_run, tmp_path, capsys, monkeypatch):
    """No val or test text: 'validate' would be the search split, which chose the training configurations.
    One line naming the fix, before any model loads, nothing written."""

    def no_work(path):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("coalora.tasks.checkpoint.load_task", no_work)
    with_test = _with_test_files(search_only_run, tmp_path)
    cases = [
        (["--ckpt", str(search_only_run)], "data.val_files (or data.test_files)"),
        (["--ckpt", str(search_only_run), "--split", "test"], "fit with data.test_files"),
        (["--ckpt", str(with_test), "--split", "validate"], "use --split test"),
        (["--ckpt", str(with_test), str(search_only_run), "--out", str(tmp_path / "eval")], "val_files"),
    ]
    for args, fix in cases:
        before = _listing(tmp_path, search_only_run.parents[1])
        capsys.readouterr()
        assert main(["evaluate", *args]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("coalora: error:") and fix in lines[0], err
        assert "Traceback" not in err
        assert _listing(tmp_path, search_only_run.parents[1]) == before
    assert "search split" in lines[0]


def test_eval_limit_caps_every_split(tiny_models_dir):
    """Validation, test and the search split standing in for validation all stop at eval_limit blocks;
    the search's own scoring keeps its search_blocks."""
    model = tiny_models_dir / "tiny-llama-lm"

    def blocks(loader) -> int:
        return sum(len(batch["input_ids"]) for batch in loader)

    data = _data(model, eval_limit=2, eval_batch_size=1)
    data.setup("fit")
    data.setup("test")
    assert blocks(data.val_dataloader()) == blocks(data.test_dataloader()) == 2
    search_only = _data(model, val_files=None, test_files=None, eval_limit=2, eval_batch_size=1)
    search_only.setup("fit")
    assert blocks(search_only.val_dataloader()) == 2
    assert blocks(search_only.search_dataloader()) == 4


def test_evaluate_applies_eval_limit_to_the_reported_split(search_only_run, tmp_path, monkeypatch):
    from coalora.commands import evaluate

    seen: list[int] = []
    evaluate_config = evaluate.evaluate_config

    def counting(module, loader, config):
        batches = list(loader)
        seen.append(sum(len(batch["input_ids"]) for batch in batches))
        return evaluate_config(module, batches, config)

    monkeypatch.setattr(evaluate, "evaluate_config", counting)
    ckpt = _with_test_files(search_only_run, tmp_path)
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--ckpt", str(ckpt), "--eval-limit", "3", "--batch-size", "2", "--out", str(out)])
        == 0
    )
    assert seen == [3]
    assert json.loads((out / "eval.json").read_text())["results"][0]["ppl"] > 1
