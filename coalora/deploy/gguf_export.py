"""One configuration as llama.cpp files: base ``model.gguf`` and LoRA ``adapter.gguf`` (issue #26, item 3).

:func:`write_llama_gguf` writes a Hugging Face ``LlamaForCausalLM`` the way llama.cpp's converter would
(``llama`` architecture keys, llama.cpp tensor names, the q/k row reordering of
:mod:`coalora.deploy.gguf_names`, the tokenizer of :mod:`coalora.deploy.gguf_vocab`), except that each
target matrix is stored in its configuration's block type as :func:`coalora.quant.gguf_kernels.quantize`
packs it (or as bytes the caller already packed). The rest is stored as the converter's ``--outtype f16``
stores it: 1-D tensors (the RMS norms) in F32, other matrices (``token_embd``, ``output``, any linear
outside ``tensor_types``) in F16, or in F32 with ``dense_type="F32"``.

:func:`write_lora_gguf` writes a llama.cpp LoRA adapter: ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``, and per target ``<base name>.lora_a`` (torch
``[r, in]``, GGUF ``ne = [in, r]``) and ``<base name>.lora_b`` (torch ``[out, r]``, GGUF ``ne = [r, out]``),
B's rows reordered like the base's for q/k. llama.cpp adds ``scale · B (A x)`` with
``scale = adapter_scale · alpha / r`` (``r`` read from ``lora_b``'s ``ne[0]``; ``adapter_scale`` is the
runtime ``--lora-scaled`` factor, 1 by default), so for coalora's ``lora_scaling`` s pass ``alpha = s · r``,
and pass B already multiplied by the configuration's mapper output (B·M), as the PEFT export does.

Both files are written under a temporary name and renamed, so a failed write leaves no partial file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy
import torch

from coalora.deploy.gguf_names import LINEAR_KINDS, gguf_name, module_name, to_llamacpp_rows
from coalora.deploy.gguf_vocab import gguf_vocab
from coalora.errors import CoaloraError
from coalora.quant.gguf_kernels import quantize
from coalora.quant.gguf_types import GGUFType, check_row_length, gguf_type

ARCH = "llama"
#: dominant target type -> llama.cpp's ``general.file_type`` (informational: llama.cpp reads each
#: tensor's own type; the K-quant "_M" mixes are the closest named presets)
FILE_TYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18,
}  # fmt: skip
DENSE_TYPES = ("F16", "F32")


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CoaloraError("the gguf format needs the gguf package; pip install 'coalora[gguf]'") from None
    return gguf


def _llama_config(model: Any) -> Any:
    config = model.config
    if getattr(config, "model_type", None) != ARCH:
        raise CoaloraError(
            f"the gguf writer handles LLaMA decoders (model_type 'llama'); got '{config.model_type}'"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise CoaloraError("the gguf writer handles LLaMA without biases; this config has attention/mlp bias")
    return config


def rope_theta(config: Any) -> float:
    """The rotary base of a LLaMA config (``rope_parameters`` in transformers 5, ``rope_theta`` before);
    refuses scaled rotary embeddings, whose llama.cpp keys this writer does not write."""
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if kind != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise CoaloraError(f"the gguf writer handles plain rotary embeddings; this config has '{kind}' rope")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise CoaloraError("the LLaMA config names no rope_theta")
    return float(theta)


def head_counts(config: Any) -> tuple[int, int, int]:
    """``(n_head, n_head_kv, head_dim)`` of a LLaMA config."""
    n_head = int(config.num_attention_heads)
    n_head_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    return n_head, n_head_kv, head_dim


def _add_hparams(writer: Any, config: Any, file_type: int) -> None:
    n_head, n_head_kv, head_dim = head_counts(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != int(config.hidden_size):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(file_type)


def _check_types(tensor_types: Mapping[str, str | GGUFType], weights: Mapping[str, torch.Tensor]) -> dict:
    """``tensor_types`` keyed by module name, each type checked against its matrix's row length."""
    checked: dict[str, GGUFType] = {}
    for name, kind in tensor_types.items():
        module = module_name(name)
        gguf_name(module)  # refuses a name llama.cpp has no tensor for
        if not module.endswith(LINEAR_KINDS) or module + ".weight" not in weights:
            raise CoaloraError(f"'{name}' is not one of the model's {len(LINEAR_KINDS)} block linear kinds")
        checked[module] = check_row_length(kind, int(weights[module + ".weight"].shape[-1]))
    return checked


def _file_type(types: Mapping[str, GGUFType], weights: Mapping[str, torch.Tensor], dense: str) -> int:
    count: dict[str, int] = {}
    for module, t in types.items():
        count[t.name] = count.get(t.name, 0) + weights[module + ".weight"].numel()
    if not count:
        return 0 if dense == "F32" else 1
    return FILE_TYPES[max(count, key=lambda k: count[k])]


def _finish(writer: Any, tmp: Path, path: Path) -> int:
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _writer(path: str | os.PathLike) -> tuple[Any, Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    return require_gguf().GGUFWriter(tmp, ARCH), tmp, path


def write_llama_gguf(
    model: Any,
    tokenizer: Any,
    tensor_types: Mapping[str, str | GGUFType],
    path: str | os.PathLike,
    *,
    packed: Mapping[str, torch.Tensor] | None = None,
    dense_type: str = "F16",
    name: str | None = None,
) -> dict:
    """Write ``model`` (a ``LlamaForCausalLM``) as a llama.cpp base model at ``path``; return a summary.

    ``tensor_types`` maps target module names (``model.layers.0.self_attn.q_proj``; a ``.weight`` suffix
    is accepted) to GGUF type names; ``packed`` optionally gives a target's bytes already packed in that
    type, in Hugging Face row order (``[out, row_bytes]`` uint8, as ``quantize`` returns), instead of
    quantizing its weight here. The summary holds the byte counts the avg-bits check needs:
    ``target_bytes`` (exactly Σ numel · bits_per_weight / 8 over the targets), ``other_bytes``,
    ``file_bytes`` and ``overhead_bytes`` (header, metadata, tokenizer, alignment padding).
    """
    gguf = require_gguf()
    config = _llama_config(model)
    dense = str(dense_type).upper()
    if dense not in DENSE_TYPES:
        raise CoaloraError(f"dense_type must be one of {', '.join(DENSE_TYPES)}; got '{dense_type}'")
    weights = {k: v for k, v in model.state_dict().items() if k.endswith(".weight")}
    types = _check_types(tensor_types, weights)
    packed = {module_name(k): v for k, v in (packed or {}).items()}
    unknown = sorted(set(packed) - set(types))
    if unknown:
        raise CoaloraError(f"packed bytes given for {unknown[0]}, which tensor_types does not name")
    vocab = gguf_vocab(tokenizer, int(config.vocab_size))
    n_head, n_head_kv, _ = head_counts(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    writer, tmp, path = _writer(path)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or getattr(config, "_name_or_path", "") or "coalora-llama")
    _add_hparams(writer, config, _file_type(types, weights, dense))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)

    target_bytes = other_bytes = target_weights = 0
    for key, weight in weights.items():
        module = module_name(key)
        if tied and module == "lm_head":
            continue  # llama.cpp reuses token_embd when the file has no output tensor
        tensor_name = gguf_name(module)
        if module in types:
            t = types[module]
            data = packed.get(module)
            data = quantize(weight, t) if data is None else _checked_bytes(data, weight, t, module)
            data = to_llamacpp_rows(data.cpu(), module, n_head, n_head_kv).contiguous()
            writer.add_tensor(tensor_name, data.numpy(), raw_dtype=gguf.GGMLQuantizationType(t.ggml_id))
            target_bytes += data.numel()
            target_weights += weight.numel()
            continue
        value = to_llamacpp_rows(weight.detach().float().cpu(), module, n_head, n_head_kv)
        array = value.numpy().astype(numpy.float32 if value.dim() == 1 or dense == "F32" else numpy.float16)
        writer.add_tensor(tensor_name, array)
        other_bytes += array.nbytes
    file_bytes = _finish(writer, tmp, path)
    return {
        "path": str(path),
        "file_bytes": file_bytes,
        "target_weights": target_weights,
        "target_bytes": target_bytes,
        "target_bits_per_weight": 8 * target_bytes / target_weights if target_weights else 0.0,
        "other_bytes": other_bytes,
        "overhead_bytes": file_bytes - target_bytes - other_bytes,
        "dense_type": dense,
        "types": {m: t.name for m, t in types.items()},
        "tokenizer_notes": list(vocab.notes),
    }


def _checked_bytes(data: torch.Tensor, weight: torch.Tensor, t: GGUFType, module: str) -> torch.Tensor:
    rows, cols = weight.shape
    if data.dtype != torch.uint8 or tuple(data.shape) != (rows, t.row_bytes(cols)):
        raise CoaloraError(
            f"packed bytes for {module} must be uint8 of shape ({rows}, {t.row_bytes(cols)}) for "
            f"{t.name}; got {str(data.dtype).removeprefix('torch.')} {tuple(data.shape)}"
        )
    return data.cpu()


def write_lora_gguf(
    lora_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    path: str | os.PathLike,
    *,
    config: Any,
    dtype: str = "F32",
) -> dict:
    """Write a llama.cpp LoRA adapter at ``path``: per module ``(A [r, in], B [out, r])``, the update
    being ``alpha / r · B A``; ``config`` is the base's LLaMA config (its head counts reorder q/k's B).
    ``dtype`` is F32 (llama.cpp's converter default, exact) or F16. Returns a summary."""
    gguf = require_gguf()
    n_head, n_head_kv, _ = head_counts(config)
    kind = str(dtype).upper()
    if kind not in DENSE_TYPES:
        raise CoaloraError(f"LoRA dtype must be one of {', '.join(DENSE_TYPES)}; got '{dtype}'")
    if not lora_factors:
        raise CoaloraError("no LoRA factors to write")
    writer, tmp, path = _writer(path)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    factor_bytes, ranks = 0, set()
    for key, (a, b) in lora_factors.items():
        module = module_name(key)
        if not module.endswith(LINEAR_KINDS):
            raise CoaloraError(f"'{key}' is not one of the {len(LINEAR_KINDS)} LLaMA linear kinds")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CoaloraError(
                f"LoRA factors of {key} must be A [r, in] and B [out, r]; "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        base = gguf_name(module)
        b = to_llamacpp_rows(b.detach().float().cpu(), module, n_head, n_head_kv)
        np_type = numpy.float32 if kind == "F32" else numpy.float16
        for suffix, factor in ((".lora_a", a.detach().float().cpu()), (".lora_b", b)):
            array = factor.contiguous().numpy().astype(np_type)
            writer.add_tensor(base + suffix, array)
            factor_bytes += array.nbytes
        ranks.add(int(a.shape[0]))
    file_bytes = _finish(writer, tmp, path)
    return {
        "path": str(path),
        "file_bytes": file_bytes,
        "factor_bytes": factor_bytes,
        "overhead_bytes": file_bytes - factor_bytes,
        "alpha": float(alpha),
        "ranks": sorted(ranks),
        "dtype": kind,
    }


def target_types(model: Any, kind: str | GGUFType) -> dict[str, str]:
    """Every linear of every LLaMA block in one type (a uniform configuration), by module name."""
    t = gguf_type(kind)
    return {
        n: t.name
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.") and n.endswith(LINEAR_KINDS)
    }


__all__ = ["DENSE_TYPES", "FILE_TYPES", "head_counts", "rope_theta", "target_types", "write_llama_gguf",
           "write_lora_gguf"]  # fmt: skip
