"""``coalora adapt --format gguf`` (issue #26, item 3): a LLaMA run as llama.cpp's model.gguf + adapter.gguf.

The files are read back with the ``gguf`` package's reader (coalora's decoders are held to gguf's own in
test_gguf_types.py): every target in the asked type (or its fallback), the run's full-precision weights
quantized, the run's adapter, the average bits; a budget's allocation beats a uniform type it affords; runs
whose adapter depends on the configuration, encoders and bad requests are refused before anything is
written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coalora.cli import main
from coalora.deploy.gguf_adapt import allocated_types, check_gguf_request, export_gguf, uniform_types
from coalora.deploy.gguf_names import from_llamacpp_rows, gguf_name
from coalora.errors import CoaloraError
from coalora.quant import gguf_kernels
from coalora.quant.gguf_types import GGUF_TYPES
from tests.gguf_tiny import tiny_llama, tiny_tokenizer

pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA whose linear inputs are multiples of 256 (K-quants tile them), with its tokenizer."""
    folder = tmp_path_factory.mktemp("llama256")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp_task(llama_dir):
    from coalora.tasks.causal_lm import CausalLMTask

    task = CausalLMTask(model_name=str(llama_dir), method="fp", rank=4, alpha=8.0)
    with torch.no_grad():  # a trained adapter's B is not zero: make the update visible
        for layer in task.model.layers:
            layer.lora_B.copy_(0.05 * torch.randn_like(layer.lora_B))
    return task


def _targets(task) -> dict[str, torch.Tensor]:
    return {
        n: layer.weight.detach() for n, layer in zip(task.model.space.names, task.model.layers, strict=True)
    }


def test_a_uniform_type_writes_every_target_in_it_with_the_runs_adapter(fp_task, tmp_path):
    from coalora.deploy.gguf_check import lora_deltas, read_tensors

    out = tmp_path / "gguf"
    meta = export_gguf(fp_task, out, gguf_kind="q4_k")
    assert json.loads((out / "coalora.json").read_text())["format"] == "coalora.gguf/1"
    assert set(meta["tensor_types"].values()) == {"Q4_K"} and meta["avg_bits"] == 4.5
    stored = read_tensors(out / "model.gguf")
    deltas = lora_deltas(out / "adapter.gguf")
    layer0 = fp_task.model.layers[0]
    for (name, weight), layer in zip(_targets(fp_task).items(), fp_task.model.layers, strict=True):
        kind, value = stored[gguf_name(name)]
        assert kind == "Q4_K"
        want = gguf_kernels.dequantize(gguf_kernels.quantize(weight, "Q4_K"), "Q4_K", weight.shape)
        assert torch.equal(from_llamacpp_rows(value, name, 4, 2), want), name
        update = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).float()
        torch.testing.assert_close(from_llamacpp_rows(deltas[gguf_name(name)], name, 4, 2), update)
    assert meta["lora_alpha"] == pytest.approx(layer0.scaling * layer0.rank)
    assert not list(tmp_path.glob(".gguf.*"))  # nothing staged is left behind


def test_a_budget_allocates_types_that_beat_a_uniform_type_it_affords(fp_task):
    weights = _targets(fp_task)

    def total_error(types: dict[str, str]) -> float:
        return sum(
            float(
                (gguf_kernels.dequantize(gguf_kernels.quantize(w, types[n]), types[n], w.shape) - w)
                .square()
                .sum()
            )
            for n, w in weights.items()
        )

    numel = sum(w.numel() for w in weights.values())
    for budget, uniform in ((3.5, "Q3_K"), (5.0, "Q4_K")):
        types = allocated_types(weights, budget)
        bits = sum(GGUF_TYPES[types[n]].bits_per_weight * w.numel() for n, w in weights.items()) / numel
        assert bits <= budget + 1e-12
        assert total_error(types) <= total_error(uniform_types(weights, uniform))
        assert len(set(types.values())) >= 2  # a mix, not the uniform type
    with pytest.raises(CoaloraError, match="below this model's cheapest GGUF mix"):
        allocated_types({"w": torch.randn(8, 96)}, 3.0)  # rows of 96: only the 32-weight types, >= 4.5 bits


def test_k_quants_fall_back_per_tensor_where_rows_are_not_multiples_of_256():
    weights = {"a": torch.randn(4, 256), "b": torch.randn(4, 64), "c": torch.randn(4, 96)}
    assert uniform_types(weights, "Q4_K") == {"a": "Q4_K", "b": "Q5_0", "c": "Q5_0"}
    assert uniform_types(weights, "Q6_K") == {"a": "Q6_K", "b": "Q8_0", "c": "Q8_0"}
    assert uniform_types(weights, "Q8_0") == dict.fromkeys("abc", "Q8_0")
    with pytest.raises(CoaloraError, match="no GGUF block type tiles 'd'"):
        uniform_types({"d": torch.randn(4, 48)}, "Q8_0")


def test_refusals_come_before_anything_is_written(fp_task, llama_dir, tiny_models_dir, tmp_path):
    from coalora.tasks.causal_lm import CausalLMTask
    from coalora.tasks.classification import ClassificationTask

    out = tmp_path / "never"
    with pytest.raises(CoaloraError, match="--gguf-type TYPE"):
        check_gguf_request(None, None)
    with pytest.raises(CoaloraError, match="--gguf-type TYPE"):
        check_gguf_request("Q4_K", 4.0)
    with pytest.raises(CoaloraError, match="unknown GGUF type 'Q7_K'"):
        export_gguf(fp_task, out, gguf_kind="Q7_K")
    with pytest.raises(CoaloraError, match=r"must lie in \[2.625, 8.5\]"):
        export_gguf(fp_task, out, budget=2.0)
    mapped = CausalLMTask(
        model_name=str(llama_dir), rank=4, train_budgets=[2.5, 3.5, 5.0], eval_budgets=[3.0]
    )
    with pytest.raises(CoaloraError, match="has a mapper"):
        export_gguf(mapped, out, gguf_kind="Q4_K")
    bert = ClassificationTask(model_name=str(tiny_models_dir / "tiny-bert"), method="fp", rank=4)
    with pytest.raises(CoaloraError, match="encoders and classification heads"):
        export_gguf(bert, out, gguf_kind="Q4_K")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_adapt_command_writes_a_trained_fp_run(tiny_models_dir, tmp_path, monkeypatch, capsys):
    """fit (fp, the tiny text config) -> coalora adapt --format gguf; bad flag combinations exit 2."""
    monkeypatch.chdir(REPO)
    run = str(tmp_path / "run")
    model = str(tiny_models_dir / "tiny-llama-lm")
    fit = ["fit", "--config", "tests/conf/text_tiny.yaml", "--model.model_name", model]
    fit += ["--model.method", "fp", "--trainer.max_epochs", "1", "--trainer.callbacks", "[]"]
    fit += ["--trainer.default_root_dir", run, "--trainer.logger.init_args.save_dir", run]
    assert main(fit) == 0
    ckpt = str(sorted(Path(run).rglob("*.ckpt"))[-1])
    out = tmp_path / "gguf"
    assert main(["adapt", "--ckpt", ckpt, "--format", "gguf", "--gguf-type", "Q4_K", "--out", str(out)]) == 0
    meta = json.loads((out / "coalora.json").read_text())
    assert meta["method"] == "fp" and set(meta["tensor_types"].values()) == {"Q5_0"}  # rows of 64: fallback
    assert (out / "model.gguf").stat().st_size > 0 and (out / "adapter.gguf").stat().st_size > 0
    assert "avg bits 5.5000" in capsys.readouterr().out
    import coalora

    with pytest.raises(CoaloraError, match=r"is a GGUF export: run model\.gguf with llama\.cpp"):
        coalora.load(out)
    bad = tmp_path / "bad"
    for flags in (["--qconfig", ckpt, "--gguf-type", "Q4_K"], [], ["--gguf-type", "Q4_K", "--budget", "4"]):
        assert main(["adapt", "--ckpt", ckpt, "--format", "gguf", "--out", str(bad), *flags]) == 2
    assert main(["adapt", "--ckpt", ckpt, "--gguf-type", "Q4_K", "--out", str(bad)]) == 2
    assert not bad.exists()


@pytest.mark.slow
def test_llamacpp_runs_a_budget_export_as_coalora_computes_it(tmp_path):
    """The memorized tiny LLaMA as an fp run, exported at 4.0 bits (a type mix): llama.cpp's logits and
    greedy tokens against a float32 forward of the network the files describe (tolerance as in
    test_gguf_export.py: llama.cpp's 8-bit activations are most of the difference)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (coalora[gguf-check])")
    from coalora.deploy.gguf_adapt import plain_backbone
    from coalora.deploy.gguf_check import compare, load_llamacpp, reference_model
    from coalora.tasks.causal_lm import CausalLMTask
    from tests.gguf_tiny import PROMPTS, memorize
    from tests.test_gguf_export import REL_TOL

    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    memorize(model, tokenizer, steps=60, lr=5e-3)
    model.save_pretrained(tmp_path / "memorized")
    tokenizer.save_pretrained(tmp_path / "memorized")
    task = CausalLMTask(model_name=str(tmp_path / "memorized"), method="fp", rank=8, alpha=16.0)
    with torch.no_grad():
        for layer in task.model.layers:
            layer.lora_B.copy_(0.03 * torch.randn_like(layer.lora_B))
    meta = export_gguf(task, tmp_path / "gguf", budget=4.0, tokenizer=tokenizer)
    assert meta["avg_bits"] <= 4.0 and len(set(meta["tensor_types"].values())) >= 2
    base, adapter = tmp_path / "gguf" / "model.gguf", tmp_path / "gguf" / "adapter.gguf"
    llm = load_llamacpp(base, adapter, n_ctx=128, threads=2)
    reference = reference_model(plain_backbone(task), base, adapter)
    result = compare(reference, llm, [tokenizer(p)["input_ids"] for p in PROMPTS], n_greedy=6)
    assert result["max_rel_logit_diff"] < REL_TOL, result
    assert all(g["agree_prefix"] == 6 for g in result["greedy"]), result["greedy"]
