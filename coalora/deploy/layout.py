"""The artifact: one configuration of a checkpoint as packed low-bit weights plus a plain LoRA.

An artifact is a folder that needs neither the checkpoint nor the network to run:

- ``quantized.safetensors``: per target matrix one ``<name>.<part>`` per part of the code family's part
  schema, exactly what :func:`quantize` packs: for ``nf`` and ``int`` ``.codes``, ``.scale_codes``
  (bit-packed uint8), ``.scale2`` (in the option's dtype) and ``.offset`` (fp32);
- ``adapter.safetensors``: per target ``<name>.lora_A`` (r×in) and ``<name>.lora_B`` = B·M, the mapper's
  adjustment folded in, so the adapter is a plain LoRA for this one configuration;
- ``full_precision.safetensors``: every other parameter (embeddings, LayerNorms, biases, the task head);
- ``config.json`` and the tokenizer files of the backbone, ``qconfig.json``, and ``coalora.json``
  (metadata: format, backbone, task, labels, method, avg bits, sizes by part, sizes and SHA-256 of files).

This module names the files and holds the in-memory form; building, writing and reading live beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from coalora.quant.families.blocked_schema import PART_NAMES as BLOCKED_PART_NAMES
from coalora.quant.qconfig import QConfig
from coalora.quant.quantizer import PackedTensor

if TYPE_CHECKING:
    from coalora.tasks.base import CoALoRATask

FORMAT = "coalora.artifact/1"

METADATA_FILE = "coalora.json"

QCONFIG_FILE = "qconfig.json"

QUANTIZED_FILE = "quantized.safetensors"

ADAPTER_FILE = "adapter.safetensors"

FULL_PRECISION_FILE = "full_precision.safetensors"

#: the packed parts of the built-in families (``nf``, ``int``), kept for importers; the writer, reader and
#: packed layer take the names from the family's part schema (``get_family(name).part_schema``)
PACKED_FIELDS = BLOCKED_PART_NAMES

REEXPORT = "re-export it with `coalora adapt`"


@dataclass
class Resolution:
    """The configuration to serve, and how it was chosen (for reports and metadata)."""

    config: QConfig | None
    source: str
    budget: float | None = None


@dataclass
class Artifact:
    """An artifact in memory: what the files hold, before writing or after reading."""

    metadata: dict
    hf_config: Any  # transformers.PretrainedConfig
    qconfig: QConfig | None
    packed: dict[str, PackedTensor]
    adapter: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A, B·M)
    full_precision: dict[str, torch.Tensor]
    tokenizer: Any = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, when built here


def full_precision_state(module: CoALoRATask, quantized: bool) -> dict[str, torch.Tensor]:
    """Every backbone tensor that is not LoRA, nor a target weight when those are ``quantized``."""
    model = module.model
    skip = {f"{n}.{p}" for n in model.space.names for p in ("lora_A", "lora_B")}
    if quantized:
        skip |= {f"{n}.weight" for n in model.space.names}
    state = model.backbone.state_dict()
    kept: dict[str, torch.Tensor] = {}
    stored: set[int] = set()
    for key, value in state.items():
        # a tied tensor (an LM head sharing the embeddings) is stored once; loading re-ties it
        if key in skip or value.data_ptr() in stored:
            continue
        stored.add(value.data_ptr())
        kept[key] = value.detach().cpu().clone().contiguous()
    return kept


def narrow_embeddings(state: dict[str, torch.Tensor], model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Store the fp32 tables of :func:`embedding_keys` in ``state`` as ``dtype`` (fp16 halves MiniLM's
    artifact, whose word embeddings are 47.7 of its 55 MB); returns the keys narrowed."""
    if dtype == torch.float32:
        return []
    keys = sorted(k for k in embedding_keys(model) if k in state and state[k].dtype == torch.float32)
    for key in keys:
        state[key] = state[key].to(dtype)
    return keys


def embedding_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's ``nn.Embedding`` tables that no other module shares: those may be
    stored in a narrower dtype, since only looked-up rows are ever computed with (a table tied to an LM
    head is a matmul weight too, and keeps the model's dtype)."""
    state = model.state_dict()
    uses: dict[int, int] = {}
    for value in state.values():
        uses[value.data_ptr()] = uses.get(value.data_ptr(), 0) + 1
    keys = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {key for key in keys if key in state and uses[state[key].data_ptr()] == 1}
