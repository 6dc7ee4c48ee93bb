"""Hugging Face LLaMA names and layouts -> llama.cpp's (GGUF) names and layouts.

llama.cpp names a LLaMA's tensors ``token_embd``, ``blk.N.attn_q`` ... ``output`` (``gguf-py``'s
``tensor_mapping.py`` holds the full table; the LLaMA rows are spelled out in :data:`BLOCK_NAMES` here so
the writer and the reader agree without a lookup). Its LLaMA graph applies rotary embeddings to
*adjacent* pairs of each head (``ggml_rope`` in normal mode), while Hugging Face's ``rotate_half`` pairs
element ``i`` with element ``i + head_dim/2``; llama.cpp's converter therefore reorders the rows of
``q_proj`` and ``k_proj`` inside every head so that row ``i`` of the second half lands next to row ``i``
of the first. :func:`qk_row_order` gives that order as an index vector, so it applies to float weights,
to packed block bytes (llama.cpp quantizes along rows, so a row's bytes move as one) and to a LoRA ``B``
alike; :func:`inverse_order` undoes it.
"""

from __future__ import annotations

import re

import torch

from coalora.errors import CoaloraError

#: module name inside a LLaMA decoder block -> llama.cpp's tensor name inside ``blk.N``
BLOCK_NAMES: dict[str, str] = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
#: modules outside the blocks
TOP_NAMES: dict[str, str] = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
#: the seven linear kinds of a LLaMA block, the matrices a configuration quantizes
LINEAR_KINDS = tuple(k for k in BLOCK_NAMES if k.endswith("_proj"))
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def module_name(name: str) -> str:
    """A state-dict key or a module name -> the module name (``...q_proj.weight`` -> ``...q_proj``)."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def gguf_name(name: str) -> str:
    """The llama.cpp tensor name of a Hugging Face LLaMA weight (``model.layers.3.mlp.up_proj`` ->
    ``blk.3.ffn_up.weight``); a one-line :class:`CoaloraError` for a name the LLaMA layout lacks."""
    module = module_name(name)
    if module in TOP_NAMES:
        return TOP_NAMES[module] + ".weight"
    match = _BLOCK.match(module)
    if match is None or match.group(2) not in BLOCK_NAMES:
        raise CoaloraError(
            f"'{name}' is not a LLaMA weight llama.cpp names (expected model.embed_tokens, model.norm, "
            f"lm_head or model.layers.N.<{'|'.join(BLOCK_NAMES)}>)"
        )
    return f"blk.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}.weight"


def heads_for(name: str, n_head: int, n_head_kv: int) -> int | None:
    """How many heads the rows of ``name`` hold if llama.cpp reorders them (q: ``n_head``, k:
    ``n_head_kv``), else None."""
    module = module_name(name)
    if module.endswith("self_attn.q_proj"):
        return n_head
    if module.endswith("self_attn.k_proj"):
        return n_head_kv
    return None


def qk_row_order(rows: int, heads: int) -> torch.Tensor:
    """Source row of each row of the reordered matrix: within each head of ``rows // heads`` rows,
    new row ``2i`` is old row ``i`` and new row ``2i + 1`` is old row ``i + head_dim/2``."""
    if heads <= 0 or rows % heads or (rows // heads) % 2:
        raise CoaloraError(f"cannot reorder {rows} rows into {heads} heads of even size for llama.cpp")
    half = rows // heads // 2
    order = torch.arange(rows).reshape(heads, 2, half)
    return order.transpose(1, 2).reshape(rows)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The index vector that undoes ``order`` (``x[order][inverse_order(order)] == x``)."""
    return torch.argsort(order)


def to_llamacpp_rows(tensor: torch.Tensor, name: str, n_head: int, n_head_kv: int) -> torch.Tensor:
    """``tensor``'s rows (dim 0) in llama.cpp's order for the weight ``name`` (unchanged unless q/k)."""
    heads = heads_for(name, n_head, n_head_kv)
    return tensor if heads is None else tensor[qk_row_order(tensor.shape[0], heads)]


def from_llamacpp_rows(tensor: torch.Tensor, name: str, n_head: int, n_head_kv: int) -> torch.Tensor:
    """Inverse of :func:`to_llamacpp_rows`: rows read from a GGUF file back in Hugging Face's order."""
    heads = heads_for(name, n_head, n_head_kv)
    return tensor if heads is None else tensor[inverse_order(qk_row_order(tensor.shape[0], heads))]


__all__ = [
    "BLOCK_NAMES",
    "LINEAR_KINDS",
    "TOP_NAMES",
    "from_llamacpp_rows",
    "gguf_name",
    "heads_for",
    "inverse_order",
    "module_name",
    "qk_row_order",
    "to_llamacpp_rows",
]
