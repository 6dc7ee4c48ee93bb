"""Lean serving (issue #25): ``coalora.load`` and ``predict``/``generate`` import nothing of the training
stack, and the inference forward's reused dequantization buffer gives the same outputs as before.

Imports are checked in fresh subprocesses (this test process has Lightning loaded by conftest). A
package that plain transformers itself imports when it builds the same model (transformers 5 pulls scipy
through its loss module and sympy through torch.distributed's DTensor) cannot be avoided by serving
code, so for those the check is that coalora adds nothing to what the plain Hugging Face script loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coalora.deploy.export import export
from coalora.deploy.loaded import load
from coalora.nn import packed_lora
from coalora.nn.packed_lora import PackedLoRALinear
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import quantize
from tests.tiny_models import untrained_task

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a gripping , funny and moving film", "the plot is thin and the acting is wooden"]
PROMPTS = ["the film", "one of the best"]

#: never imported by serving, whatever transformers does
TRAINING_STACK = ("lightning", "pytorch_lightning", "torchmetrics", "botorch", "gpytorch", "matplotlib")
#: never imported by serving unless plain transformers imports them too (see the module docstring)
HEAVY = ("scipy", "sympy", "accelerate", "PIL")
#: what serving may add to the plain Hugging Face script's packages
ALLOWED_EXTRA = {"coalora", "safetensors", "tokenizers", "numpy"}

SERVE = """
import json, sys
import coalora
bert = coalora.load(sys.argv[1])
out = {"predictions": bert.predict(TEXTS)}
batch = dict(bert.tokenizer(TEXTS, padding=True, return_tensors="pt"))
out["logits"] = bert.logits(batch).tolist()
out["generated"] = coalora.load(sys.argv[2]).generate(PROMPTS, max_new_tokens=4)
coalora.load(sys.argv[1], merge=True).predict(TEXTS)
EXTRA
out["packages"] = sorted({name.partition(".")[0] for name in sys.modules})
out["coalora_modules"] = sorted(name for name in sys.modules if name.startswith("coalora"))
print(json.dumps(out))
"""

#: coalora modules an nf/int artifact's load, predict and generate never need (error tables, allocating,
#: llama.cpp's types): each costs a cold start milliseconds of imports
QUANTIZE_ONLY = (
    "coalora.quant.error_table",
    "coalora.quant.families.gguf_family",
    "coalora.quant.gguf_kernels",
    "coalora.quant.knapsack",
    "coalora.quant.allocate",
)

PLAIN_HF = """
import json, sys
import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
)
classes = (AutoModelForSequenceClassification, AutoModelForCausalLM)
with torch.no_grad():
    for folder, auto in zip(sys.argv[1:], classes):
        model = auto.from_config(AutoConfig.from_pretrained(folder)).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
        model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    model.generate(**encoded, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(json.dumps({"packages": sorted({name.partition(".")[0] for name in sys.modules})}))
"""


pytestmark = pytest.mark.usefixtures("module_cache")


@pytest.fixture(scope="module")
def folders(tiny_models_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT classifier and a tiny LLaMA LM artifact, each at a random mixed configuration."""
    root = tmp_path_factory.mktemp("lean")
    for name, causal in (("tiny-bert", False), ("tiny-llama-lm", True)):
        task, config = untrained_task(tiny_models_dir / name, causal)
        export(task, root / name, qconfig=config)
    return root / "tiny-bert", root / "tiny-llama-lm"


def _run(script: str, folders: tuple[Path, Path], extra: str = "") -> dict:
    code = script.replace("EXTRA", extra).replace("TEXTS", repr(TEXTS)).replace("PROMPTS", repr(PROMPTS))
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, folders)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def served(folders) -> dict:
    return _run(SERVE, folders)


@pytest.fixture(scope="module")
def plain_hf(folders) -> set[str]:
    return set(_run(PLAIN_HF, folders)["packages"])


def _stack_problems(packages: set[str], plain: set[str]) -> list[str]:
    """What serving imported that it must not: the training stack, heavy packages plain transformers
    does not import, and any package beyond the plain script's but the few serving needs."""
    problems = [f"{name} (training stack)" for name in TRAINING_STACK if name in packages]
    problems += [f"{name} (plain transformers does not)" for name in HEAVY if name in packages - plain]
    problems += [f"{name} (not in the plain script)" for name in sorted(packages - plain - ALLOWED_EXTRA)]
    return problems


def test_load_predict_and_generate_import_no_training_stack(served, plain_hf):
    assert _stack_problems(set(served["packages"]), plain_hf) == []


def test_serving_imports_no_quantize_only_module(served):
    assert "coalora.quant.quantizer" in served["coalora_modules"]  # the list is the serving process's
    assert [name for name in QUANTIZE_ONLY if name in served["coalora_modules"]] == []


def test_gguf_registers_on_first_use():
    """Asking for the gguf family (or listing the families) imports it, in a process that had not."""
    code = (
        "import sys; from coalora.quant.families import family_names, get_family; "
        "before = 'coalora.quant.families.gguf_family' in sys.modules; "
        "print(before, get_family('gguf').name, family_names())"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.split(" ", 2)[:2] == ["False", "gguf"], done.stderr[-2000:]
    assert "('nf', 'int', 'gguf')" in done.stdout


def test_the_check_sees_the_training_stack_when_serving_pulls_it_in(folders, plain_hf):
    """The check can fail: serving that also imports the checkpoint loader (Lightning) is caught."""
    found = _run(SERVE, folders, extra="import coalora.deploy.adaptive")
    assert "lightning (training stack)" in _stack_problems(set(found["packages"]), plain_hf)


def test_served_outputs_equal_the_dense_in_process_path(served, folders):
    """The subprocess (packed, lean imports, reused buffer) gives the dequantized model's logits and
    the same labels and generated text as this process's loads."""
    bert_dir, llama_dir = folders
    dense = load(bert_dir, dequantize=True)
    batch = dict(dense.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    assert torch.equal(torch.tensor(served["logits"]), dense.logits(batch))
    assert served["predictions"] == load(bert_dir).predict(TEXTS)
    assert served["generated"] == load(llama_dir, dequantize=True).generate(PROMPTS, max_new_tokens=4)


@pytest.mark.parametrize("which", [0, 1])
def test_the_reused_buffer_gives_the_fresh_weight_logits(folders, which, monkeypatch):
    """Inference forwards dequantize into one reused buffer; with autograd on (and for weights over the
    buffer's limit) each layer allocates its own weight. Both give the same logits, bit for bit."""
    deployed = load(folders[which])
    batch = {k: v for k, v in deployed.tokenizer(TEXTS, padding=True, return_tensors="pt").items()}
    with torch.no_grad():
        reused = deployed(**batch)
    fresh = deployed(**batch).detach()
    monkeypatch.setattr(packed_lora, "WORKSPACE_MAX_BYTES", 0)
    with torch.no_grad():
        unbuffered = deployed(**batch)
    assert torch.equal(reused, fresh)
    assert torch.equal(reused, unbuffered)


def test_dequantize_into_a_buffer_is_bit_for_bit():
    weight = torch.randn(48, 80)  # 3840 weights: not a multiple of the 256-weight second-level group
    packed = quantize(weight, QuantOption(3, 8, "bf16", 64, 256))
    buffer = torch.full((packed.padded_numel + 7,), float("nan"))
    into = packed.dequantize(buffer)
    assert torch.equal(into, packed.dequantize())
    assert into.data_ptr() == buffer.data_ptr()
    short, wide = torch.empty(packed.padded_numel - 1), torch.empty(packed.padded_numel, dtype=torch.float64)
    for wrong in (short, wide):
        with pytest.raises(ValueError, match="float32 space"):
            packed.dequantize(wrong)


def test_autograd_keeps_each_layer_its_own_weight():
    """Under autograd the backward pass needs every layer's weight as it was: two packed layers in a row
    (the second's dequantization would overwrite a shared buffer) give the input gradient of their
    weights computed apart."""
    torch.manual_seed(0)
    option = QuantOption(4, 8, "fp16", 64, 256)
    layers = [PackedLoRALinear(torch.nn.Linear(32, 32), rank=4, alpha=8, option=option) for _ in range(2)]
    x = torch.randn(3, 32, requires_grad=True)
    layers[1](layers[0](x)).square().sum().backward()
    expected = x.detach().clone().requires_grad_(True)
    weights = [layer.base_weight() for layer in layers]
    layers[1].forward_with(layers[0].forward_with(expected, weights[0]), weights[1]).square().sum().backward()
    assert x.grad is not None and expected.grad is not None
    assert torch.equal(x.grad, expected.grad)
