"""Does llama.cpp compute what the GGUF files say? (issue #26, item 4)

Two sides of one comparison. :func:`reference_model` reads ``model.gguf`` and ``adapter.gguf`` back (the
``gguf`` package's reader; block types decoded by :func:`coalora.quant.gguf_kernels.dequantize`, bit-exact
with llama.cpp's ``dequantize_row_*``), undoes the q/k row reordering, adds ``alpha / r · B A`` and loads
the result into a float32 copy of the Hugging Face model: the network the files describe, run by
transformers. :func:`load_llamacpp` and :func:`llamacpp_logits` / :func:`greedy` run the same files in
llama.cpp through ``llama-cpp-python`` (an optional dependency: ``pip install 'coalora[gguf-check]'``).

With every tensor in F32 and an F32 KV cache they agree to float32 rounding (max |Δ logit| ~3e-6 on the
tiny test model): the names, q/k order, rotary embedding, norms and LoRA scale are then all checked. With
quantized targets they cannot: on CPU llama.cpp multiplies a K-quant weight with activations
quantized to Q8_K (Q8_0/Q8_1 for the 32-weight types), an F16 weight with F16 activations, and keeps the
KV cache in F16. :func:`compare` therefore reports the largest logit difference both absolutely and
relative to the largest |logit|, and counts greedy disagreements only where transformers' top-two margin
exceeds twice that difference (a closer call is a tie at llama.cpp's precision).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy
import torch

from coalora.deploy.gguf_export import head_counts
from coalora.deploy.gguf_names import from_llamacpp_rows, gguf_name, module_name
from coalora.errors import CoaloraError
from coalora.quant.gguf_kernels import dequantize
from coalora.quant.gguf_types import GGUF_TYPES


def _reader(path: str | os.PathLike) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CoaloraError("reading GGUF files needs the gguf package; pip install gguf") from None
    return GGUFReader(os.fspath(path))


def read_field(path_or_reader: Any, key: str) -> Any:
    """One metadata value of a GGUF file (a str, a number, or a list for arrays); None when absent."""
    reader = path_or_reader if hasattr(path_or_reader, "fields") else _reader(path_or_reader)
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_tensors(path: str | os.PathLike) -> dict[str, tuple[str, torch.Tensor]]:
    """GGUF tensor name -> (type name, float32 tensor in torch layout, rows as stored)."""
    out = {}
    for t in _reader(path).tensors:
        kind = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if kind in GGUF_TYPES:
            value = dequantize(numpy.array(t.data, dtype=numpy.uint8).reshape(-1), kind, shape)
        elif kind in ("F32", "F16"):
            value = torch.from_numpy(numpy.asarray(t.data, dtype=numpy.float32).reshape(shape).copy())
        else:
            raise CoaloraError(f"tensor {t.name} has type {kind}, which coalora does not decode")
        out[t.name] = (kind, value)
    return out


def lora_deltas(adapter_path: str | os.PathLike, adapter_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Base tensor name -> ``adapter_scale · alpha / r · B A`` of a llama.cpp LoRA file, in llama.cpp's
    row order (llama.cpp's ``get_scale``: ``r`` is ``lora_b``'s ``ne[0]``; alpha 0 means scale 1)."""
    reader = _reader(adapter_path)
    alpha = float(read_field(reader, "adapter.lora.alpha") or 0.0)
    tensors = read_tensors(adapter_path)
    deltas = {}
    for name, (_, a) in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name.removesuffix(".lora_a")
        b = tensors[base + ".lora_b"][1]
        scale = adapter_scale * (alpha / b.shape[1] if alpha else 1.0)
        deltas[base] = scale * (b.double() @ a.double()).float()
    return deltas


@torch.no_grad()
def reference_model(
    model: Any, base_path: str | os.PathLike, adapter_path: str | os.PathLike | None = None
) -> Any:
    """A float32 copy of ``model`` holding the weights the GGUF files describe (base + LoRA update)."""
    config = model.config
    n_head, n_head_kv, _ = head_counts(config)
    stored = read_tensors(base_path)
    deltas = lora_deltas(adapter_path) if adapter_path is not None else {}
    ref = copy.deepcopy(model).float().eval()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, param in ref.state_dict().items():
        if not key.endswith(".weight") or (tied and module_name(key) == "lm_head"):
            continue
        name = gguf_name(key)
        if name not in stored:
            raise CoaloraError(f"{base_path} has no tensor {name} for {key}")
        value = stored[name][1] + deltas.pop(name, 0.0)
        param.copy_(from_llamacpp_rows(value, key, n_head, n_head_kv).reshape(param.shape))
    if deltas:
        raise CoaloraError(f"the adapter updates {sorted(deltas)[0]}, which the base model lacks")
    if tied:
        ref.lm_head.weight = ref.model.embed_tokens.weight
    return ref


# ----------------------------------------------------------------------------------------- llama.cpp
def load_llamacpp(
    base_path: str | os.PathLike,
    adapter_path: str | os.PathLike | None = None,
    *,
    n_ctx: int = 256,
    threads: int = 2,
    logits_all: bool = True,
    kv_f32: bool = False,
) -> Any:
    """The files loaded in llama.cpp (CPU, ``threads`` threads, logits of every position kept). The KV
    cache is F16 as llama.cpp's default, or F32 with ``kv_f32`` (then an all-F32 file runs in float32
    end to end, and must match transformers to float32 rounding)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise CoaloraError(
            "running GGUF files needs llama-cpp-python; pip install 'coalora[gguf-check]'"
        ) from None
    return Llama(
        model_path=os.fspath(base_path),
        lora_path=None if adapter_path is None else os.fspath(adapter_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        logits_all=logits_all,
        embedding=False,
        type_k=0 if kv_f32 else 1,  # ggml_type: 0 = F32, 1 = F16
        type_v=0 if kv_f32 else 1,
        seed=0,
        verbose=False,
    )


def llamacpp_logits(llm: Any, ids: Sequence[int]) -> numpy.ndarray:
    """[len(ids), vocab] next-token logits llama.cpp computes for the prompt ``ids`` (fresh context)."""
    llm.reset()
    llm.eval(list(ids))
    return numpy.array(llm.scores[: len(ids)], dtype=numpy.float32)


def greedy(step: Any, ids: Sequence[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids``; ``step(tokens, fresh)`` returns the last position's logits."""
    out: list[int] = []
    logits = step(list(ids), True)
    for _ in range(n):
        out.append(int(numpy.argmax(logits)))
        logits = step([out[-1]], False)
    return out


def llamacpp_step(llm: Any) -> Any:
    """:func:`greedy`'s step for llama.cpp: evaluate the new tokens, return the last logits."""

    def step(tokens: list[int], fresh: bool) -> numpy.ndarray:
        if fresh:
            llm.reset()
        llm.eval(tokens)
        return numpy.asarray(llm.scores[llm.n_tokens - 1])

    return step


def hf_step(model: Any) -> Any:
    """:func:`greedy`'s step for transformers: the whole sequence again, no cache (exact, small models)."""
    seq: list[int] = []

    @torch.no_grad()
    def step(tokens: list[int], fresh: bool) -> numpy.ndarray:
        if fresh:
            seq.clear()
        seq.extend(tokens)
        return model(input_ids=torch.tensor([seq])).logits[0, -1].float().numpy()

    return step


@torch.no_grad()
def hf_logits(model: Any, ids: Sequence[int]) -> numpy.ndarray:
    return model(input_ids=torch.tensor([list(ids)])).logits[0].float().numpy()


def decode_speed(llm: Any, ids: Sequence[int], n: int = 64) -> dict:
    """llama.cpp's prompt and generation speed: tokens/s for the prompt, then for ``n`` greedy tokens."""
    step = llamacpp_step(llm)
    start = time.perf_counter()
    logits = step(list(ids), True)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        logits = step([int(numpy.argmax(logits))], False)
    gen_s = time.perf_counter() - start
    return {"prompt_tokens_per_s": len(ids) / prompt_s, "gen_tokens": n, "gen_tokens_per_s": n / gen_s}


def compare(reference: Any, llm: Any, prompts: Sequence[Sequence[int]], n_greedy: int = 8) -> dict:
    """Logits and greedy tokens of transformers (``reference``) against llama.cpp (``llm``) per prompt."""
    max_abs = max_logit = 0.0
    per_prompt: list[dict[str, Any]] = []
    for ids in prompts:
        want, got = hf_logits(reference, ids), llamacpp_logits(llm, ids)
        if want.shape != got.shape:
            raise CoaloraError(f"logit shapes differ: transformers {want.shape}, llama.cpp {got.shape}")
        max_abs = max(max_abs, float(numpy.abs(want - got).max()))
        max_logit = max(max_logit, float(numpy.abs(want).max()))
    for ids in prompts:
        hf_tokens = greedy(hf_step(reference), ids, n_greedy)
        cpp_tokens = greedy(llamacpp_step(llm), ids, n_greedy)
        agree = 0
        while agree < n_greedy and hf_tokens[agree] == cpp_tokens[agree]:
            agree += 1
        margin = _margin(reference, [*ids, *hf_tokens[:agree]]) if agree < n_greedy else None
        per_prompt.append({"hf": hf_tokens, "llamacpp": cpp_tokens, "agree_prefix": agree, "margin": margin})
    tie = 2 * max_abs
    decisive = [p for p in per_prompt if p["agree_prefix"] < n_greedy and p["margin"] > tie]
    return {
        "max_abs_logit_diff": max_abs,
        "max_abs_logit": max_logit,
        "max_rel_logit_diff": max_abs / max_logit if max_logit else 0.0,
        "first_token_agree": sum(p["agree_prefix"] > 0 for p in per_prompt),
        "prompts": len(prompts),
        "greedy": per_prompt,
        "decisive_disagreements": len(decisive),
    }


@torch.no_grad()
def _margin(model: Any, ids: Sequence[int]) -> float:
    """Transformers' top-1 minus top-2 logit after ``ids`` (how decided the first disagreement was)."""
    top = torch.from_numpy(hf_logits(model, ids)[-1]).topk(2).values
    return float(top[0] - top[1])


__all__ = [
    "compare",
    "decode_speed",
    "greedy",
    "hf_logits",
    "hf_step",
    "llamacpp_logits",
    "llamacpp_step",
    "load_llamacpp",
    "lora_deltas",
    "read_field",
    "read_tensors",
    "reference_model",
]
