"""Training with the ``gguf`` code family (issue #26 item 2): one llama.cpp type per matrix, end to end.

A tiny LLaMA with hidden 256 and intermediate 96: every attention and MLP input row takes any type, but
``down_proj``'s rows of 96 weights only the 32-weight types (Q4_0 .. Q8_0). ``coalora allocate --codes gguf``
meets its budget with types the rows take (the space, allocation, encoding and cache without a model are
tests/test_gguf_configs.py); ``coalora fit`` trains at K = 2 with the Pareto search; ``coalora evaluate``
scores the run; ``coalora adapt`` writes an artifact that ``coalora.load`` serves with the training model's
logits, and ``--format gguf`` writes each target in its configuration's type with the adapter folded for
it; bad runs are refused in one line before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coalora.cli import main
from coalora.quant.families import get_family
from coalora.quant.families.gguf_family import GGUFOption
from coalora.quant.qconfig import ConfigSpace, QConfig
from tests.gguf_tiny import tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONF = "tests/conf/gguf_tiny.yaml"
GGUF = get_family("gguf")
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
pytestmark = pytest.mark.usefixtures("module_cache")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama-256-96")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, hidden=256, inner=96).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _fits(space: ConfigSpace, config: QConfig) -> bool:
    return all(GGUF.allowed(config.matrices[t.name], t.in_features) for t in space.targets)


# -- end to end through the CLI ---------------------------------------------------------------------------
def test_the_allocate_command_writes_a_gguf_mix_within_the_budget(llama_dir, tmp_path, capsys):
    from coalora.pretrained import load_causal_lm
    from coalora.quant.targets import discover_targets

    out = tmp_path / "4bits.json"
    args = ["allocate", "--model", str(llama_dir), "--codes", "gguf", "--budget", "4.0", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "14 matrices x 10 options, plain gguf error table" in printed and "Q4_K" in printed
    space = ConfigSpace(discover_targets(load_causal_lm(str(llama_dir))), str(llama_dir), family="gguf")
    config = space.load(out)
    assert _fits(space, config) and space.avg_bits(config) <= 4.0
    assert main([*args[:-4], "--budget", "2.0", "--out", str(tmp_path / "x.json")]) == 2
    assert "outside the achievable range 2.6250..8.5000" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run(llama_dir, tmp_path_factory, module_cache) -> Path:
    """``coalora fit`` with tests/conf/gguf_tiny.yaml: K = 2, the Pareto search, 2 epochs of 2 steps."""
    import os

    out = tmp_path_factory.mktemp("gguf-run")
    here = os.getcwd()
    os.chdir(REPO)
    try:
        args = ["fit", "--config", CONF, "--model.model_name", str(llama_dir)]
        args += ["--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)]
        assert main(args) == 0
    finally:
        os.chdir(here)
    return next(out.rglob("last.ckpt"))


def test_fit_trains_on_gguf_configurations_with_the_mapper_and_the_search(run):
    from coalora.tasks.checkpoint import load_task

    task = load_task(run)
    space = task.model.space
    assert space.family_name == "gguf" and task.hparams.configs_per_step == 2
    assert [e.num_embeddings for e in task.model.mapper.field_embeddings] == [10]
    trained = task.trained_on
    assert len(trained) >= 2 and all(_fits(space, c) for c in trained)
    assert all(isinstance(o, GGUFOption) for c in trained for o in c.matrices.values())
    down = [n for n in space.names if n.endswith("down_proj")]
    assert all(c.matrices[n].type not in K_QUANTS for c in trained for n in down)
    assert any(c.matrices[n].type in K_QUANTS for c in trained for n in space.names)
    config = task.eval_configs["5.0"]
    assert _fits(space, config) and space.avg_bits(config) <= 5.0
    # the search ran: its archive holds one type index per matrix, each one its matrix's rows allow
    states = torch.load(run, weights_only=False)["callbacks"]
    search = next(v for k, v in states.items() if "ParetoConfigSearch" in k)
    archive = search["archive"]["encoded"].long()
    assert archive.shape[1:] == (len(space), 1) and len(archive) >= 3
    assert archive[:, :, 0].max() <= 9 and all(_fits(space, space.decode(e)) for e in archive)
    assert torch.isfinite(search["archive"]["f1"]).any()
    assert all(_fits(space, c) for c in task.train_configs)  # the search's training set


def test_evaluate_scores_the_run_at_its_budget(run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--ckpt", str(run), "--budgets", "5.0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "coalora 5.0" in text


def test_adapt_then_load_serves_the_training_models_logits(run, tmp_path):
    import coalora
    from coalora.tasks.checkpoint import load_task

    out = tmp_path / "artifact"
    assert main(["adapt", "--ckpt", str(run), "--budget", "5.0", "--out", str(out)]) == 0
    meta = json.loads((out / "coalora.json").read_text())
    assert meta["code_family"] == "gguf"
    deployed = coalora.load(out)
    task = load_task(run)
    config = task.model.space.load(out / "qconfig.json")
    assert config == task.eval_configs["5.0"]
    from safetensors.torch import load_file

    stored = load_file(out / "quantized.safetensors")
    assert {k.rsplit(".", 1)[1] for k in stored} == {"blocks"}
    batch = dict(deployed.tokenizer(["the plot is thin and"], return_tensors="pt"))
    with torch.no_grad():
        want = task(batch, config)
    torch.testing.assert_close(deployed.logits(batch), want, rtol=0, atol=1e-5)


def _adapt_gguf(run: Path, qconfig: Path, out: Path) -> int:
    """``coalora adapt --format gguf`` of ``run`` at the configuration a qconfig file names."""
    return main(
        ["adapt", "--ckpt", str(run), "--format", "gguf", "--qconfig", str(qconfig), "--out", str(out)]
    )


def test_adapt_format_gguf_writes_each_target_in_its_configurations_type(run, tmp_path):
    pytest.importorskip("gguf")
    from coalora.deploy.gguf_check import lora_deltas, read_tensors
    from coalora.deploy.gguf_names import from_llamacpp_rows, gguf_name
    from coalora.tasks.checkpoint import load_task

    out = tmp_path / "gguf"
    assert main(["adapt", "--ckpt", str(run), "--format", "gguf", "--budget", "5.0", "--out", str(out)]) == 0
    meta = json.loads((out / "coalora.json").read_text())
    task = load_task(run)
    config = task.eval_configs["5.0"]
    assert meta["tensor_types"] == {n: o.type for n, o in config.matrices.items()}
    assert meta["avg_bits"] == pytest.approx(task.model.space.avg_bits(config))
    stored, deltas = read_tensors(out / "model.gguf"), lora_deltas(out / "adapter.gguf")
    folded = task.model.folded_adapter(config)
    heads, kv_heads = (
        task.model.backbone.config.num_attention_heads,
        task.model.backbone.config.num_key_value_heads,
    )
    for name, layer in zip(task.model.space.names, task.model.layers, strict=True):
        kind, value = stored[gguf_name(name)]
        assert kind == config.matrices[name].type, name
        want = GGUF.fake_quantize(layer.weight.detach(), config.matrices[name])
        assert torch.equal(from_llamacpp_rows(value, name, heads, kv_heads), want), name
        a, b = folded[name]
        update = layer.scaling * (b.double() @ a.double()).float()
        torch.testing.assert_close(from_llamacpp_rows(deltas[gguf_name(name)], name, heads, kv_heads), update)
    # a qconfig names a configuration too; a mix the rows cannot take is refused before anything is written
    qconfig = tmp_path / "mix.json"
    task.model.space.save(config, qconfig)
    assert _adapt_gguf(run, qconfig, tmp_path / "q") == 0
    assert json.loads((tmp_path / "q" / "coalora.json").read_text())["tensor_types"] == meta["tensor_types"]
    bad = json.loads(qconfig.read_text())
    bad.pop("avg_bits")
    down = next(n for n in bad["matrices"] if n.endswith("down_proj"))
    bad["matrices"][down] = {"type": "Q4_K"}
    qconfig.write_text(json.dumps(bad))
    refused = tmp_path / "refused"
    assert _adapt_gguf(run, qconfig, refused) == 2
    assert not refused.exists()


def test_a_bad_gguf_run_is_refused_in_one_line_before_any_work(llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    base = ["fit", "--config", CONF, "--model.model_name", str(llama_dir)]
    base += [
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
    for flags, message in (
        (["--model.rounding", "gptq"], "gptq does not apply to code_family gguf"),
        (["--model.train_budgets", "[2.0]"], "budget 2 bits is outside the achievable range 2.625"),
        (["--model.eval_budgets", "[2.7]"], "outside what gguf options reach on this model (2.7955"),
        (["--model.code_family", "gguf4"], "model.code_family must be one of nf, int, gguf"),
    ):
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (flags, err)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def memorized_gguf_task(tmp_path_factory):
    """A memorized tiny LLaMA as a CoA-LoRA gguf run with the mapper and B far from zero (so the folded
    adapter differs per configuration), and its tokenizer."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (coalora[gguf-check])")
    from coalora.tasks.causal_lm import CausalLMTask
    from tests.gguf_tiny import memorize

    folder = tmp_path_factory.mktemp("memorized")
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, hidden=256, inner=96)
    memorize(model, tokenizer, steps=60, lr=5e-3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    task = CausalLMTask(
        model_name=str(folder),
        method="coalora",
        code_family="gguf",
        rank=8,
        alpha=16.0,
        train_budgets=[4.0, 5.0],
        eval_budgets=list(LLAMACPP_BUDGETS),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        torch.nn.init.normal_(task.model.mapper.net[-1].weight, std=0.05)
        for layer in task.model.layers:
            layer.lora_B.copy_(0.03 * torch.randn_like(layer.lora_B))
    task.eval()
    return task, tokenizer


#: three budgets whose allocations are three different type mixes on the 256/96 model
LLAMACPP_BUDGETS = (3.5, 4.0, 5.5)


@pytest.mark.slow
@pytest.mark.parametrize("budget", LLAMACPP_BUDGETS)
def test_llamacpp_runs_a_gguf_family_run_as_the_training_model_computes_it(
    memorized_gguf_task, budget, tmp_path
):
    """Three type mixes exported by ``adapt --format gguf``'s writer: llama.cpp's logits against the training
    model's own forward at each configuration (which ``coalora.load`` of the run's artifact equals to 1e-5,
    test_adapt_then_load_serves_the_training_models_logits), within the tolerance test_gguf_export.py holds
    llama.cpp to (its 8-bit activations are most of the difference); greedy next tokens equal."""
    from coalora.deploy.gguf_adapt import export_gguf
    from coalora.deploy.gguf_check import llamacpp_logits, load_llamacpp
    from coalora.utils import budget_label
    from tests.gguf_tiny import PROMPTS
    from tests.test_gguf_export import REL_TOL

    task, tokenizer = memorized_gguf_task
    meta = export_gguf(task, tmp_path / "gguf", budget=budget, tokenizer=tokenizer)
    config = task.eval_configs[budget_label(budget)]
    assert meta["tensor_types"] == {n: o.type for n, o in config.matrices.items()}
    assert len(set(meta["tensor_types"].values())) >= 2
    others = [task.eval_configs[k] for k in task.eval_configs if task.eval_configs[k] != config]
    assert len(others) == len(LLAMACPP_BUDGETS) - 1  # three different mixes
    llm = load_llamacpp(tmp_path / "gguf" / "model.gguf", tmp_path / "gguf" / "adapter.gguf", n_ctx=128)
    worst = largest = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            want = task({"input_ids": torch.tensor([ids])}, config)[0].numpy()
        got = llamacpp_logits(llm, ids)
        worst, largest = max(worst, float(abs(want - got).max())), max(largest, float(abs(want).max()))
        assert want[-1].argmax() == got[-1].argmax(), prompt
    print(
        f"{budget} bits: llama.cpp vs the training model: max |diff| {worst:.4g}, largest logit {largest:.4g}"
    )
    assert worst / largest < REL_TOL, (worst, largest)
