"""``coalora adapt --format gguf``: a LLaMA-family run as llama.cpp's ``model.gguf`` + ``adapter.gguf``.

The base is the run's full-precision backbone with each target tensor quantized to a llama.cpp type, chosen
either uniformly (``--gguf-type``; a K-quant falls back per tensor, as llama-quantize does, where a row is
not a multiple of 256) or by allocation to an average-bits budget (``--budget``: least total squared
quantization error over the types each row length allows, the same multiple-choice knapsack the nf/int
allocator solves). The adapter is the run's A and B, run by llama.cpp as a LoRA (``--lora``).

Which runs can go: those whose adapter does not depend on the configuration — ``fp`` (fine-tune, then
quantize), ``qlora``, ``shared``, and ``coalora`` with the mapper off — and every quantized run trained with
``code_family: gguf`` (issue #26 item 2). Such a run's configurations *are* type mixes: ``--budget`` is
allocated from the run's own error table (the configuration ``--format coalora --budget`` serves),
``--qconfig`` names one, ``--gguf-type`` asks for a uniform one; each target is written in exactly its
configuration's type and the adapter is the run's A and B·M for that configuration (the mapper folded).
A CoA-LoRA nf/int run's mapper was never trained for a GGUF type, so it is refused rather than folded for an
nf configuration it was never meant for. Encoders and classification heads stay on coalora's own loader
(``--format coalora``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from coalora.deploy.files import check_replaceable, staged_dir
from coalora.deploy.layout import METADATA_FILE
from coalora.errors import CoaloraError
from coalora.quant.gguf_types import GGUF_TYPES, GGUFType, allowed_types, gguf_type, row_length_error

if TYPE_CHECKING:
    from coalora.quant.qconfig import QConfig
    from coalora.tasks.base import CoALoRATask

GGUF_FORMAT = "coalora.gguf/1"
MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
#: the average-bits range a budget may ask for: Q2_K's 2.625 up to Q8_0's 8.5
BUDGET_RANGE = (min(t.bits_per_weight for t in GGUF_TYPES.values()), GGUF_TYPES["Q8_0"].bits_per_weight)
EXPORTABLE_METHODS = ("fp", "qlora", "shared", "coalora")


def check_gguf_request(gguf_kind: str | None, budget: float | None, qconfig: Any = None) -> None:
    """One of a type, a budget or (runs trained with the gguf family) a qconfig, each valid: refused in one
    line before any work."""
    if sum(x is not None for x in (gguf_kind, budget, qconfig)) != 1:
        raise CoaloraError(
            "--format gguf takes --gguf-type TYPE (e.g. Q4_K) or --budget BITS (e.g. 4.0), or --qconfig FILE "
            "for a run trained with code_family gguf"
        )
    if gguf_kind is not None:
        gguf_type(gguf_kind)
    elif budget is not None and not BUDGET_RANGE[0] <= budget <= BUDGET_RANGE[1]:
        low, high = BUDGET_RANGE
        raise CoaloraError(
            f"a GGUF budget must lie in [{low:g}, {high:g}] bits (Q2_K to Q8_0), got {budget:g}"
        )


def family_run(module: CoALoRATask) -> bool:
    """Whether ``module`` trained with the gguf code family on quantized configurations."""
    return module.model.space.family_name == "gguf" and module.method.quantized


def check_exportable(module: CoALoRATask) -> None:
    """A LLaMA causal LM whose adapter is the same for every configuration, or one trained on GGUF types;
    else a one-line refusal."""
    from coalora.tasks.causal_lm import CausalLMTask

    if not isinstance(module, CausalLMTask):
        raise CoaloraError(
            "--format gguf writes causal LMs for llama.cpp; encoders and classification heads stay on "
            "coalora's loader (use --format coalora)"
        )
    model_type = getattr(module.model.backbone.config, "model_type", None)
    if model_type != "llama":
        raise CoaloraError(
            f"--format gguf handles LLaMA decoders (model_type 'llama'); this run is '{model_type}'"
        )
    method = module.hparams.method
    if method not in EXPORTABLE_METHODS:
        raise CoaloraError(
            f"--format gguf exports fp, qlora, shared or mapper-off coalora runs; '{method}' changes the "
            "base weights themselves (use --format coalora)"
        )
    if module.model.mapper is not None and not family_run(module):
        raise CoaloraError(
            "this CoA-LoRA adapter has a mapper, so it depends on the configuration, and no GGUF type mix "
            "was trained for; export an fp or qlora run, or use --format coalora (issue #26: gguf family)"
        )


def plain_backbone(module: CoALoRATask) -> Any:
    """The run's backbone as a plain ``LlamaForCausalLM`` with its full-precision weights, no adapter."""
    from transformers import AutoModelForCausalLM

    from coalora.pretrained import quiet_transformers

    backbone = module.model.backbone
    with quiet_transformers():
        plain = AutoModelForCausalLM.from_config(backbone.config)
    state = {k: v for k, v in backbone.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def uniform_types(weights: dict[str, torch.Tensor], kind: str) -> dict[str, str]:
    """Every target in ``kind``; a row ``kind`` cannot tile takes its 32-weight fallback."""
    chosen = gguf_type(kind)
    types = {}
    for name, weight in weights.items():
        row = int(weight.shape[-1])
        fallback = GGUF_TYPES[chosen.fallback] if chosen.fallback else None
        t = chosen if row_length_error(chosen, row) is None else fallback
        if t is None or row_length_error(t, row) is not None:
            raise CoaloraError(
                f"no GGUF block type tiles '{name}' (rows of {row} weights); use --format coalora"
            )
        types[name] = t.name
    return types


def allocated_types(weights: dict[str, torch.Tensor], budget: float) -> dict[str, str]:
    """The type per target with the least total squared error whose average bits stay within ``budget``."""
    from coalora.quant.gguf_kernels import dequantize, quantize
    from coalora.quant.knapsack import solve_mckp

    kinds: list[GGUFType] = list(GGUF_TYPES.values())
    errors = np.zeros((len(weights), len(kinds)))
    costs = np.zeros((len(weights), len(kinds)))
    for i, weight in enumerate(weights.values()):
        allowed = set(allowed_types(int(weight.shape[-1])))
        if not allowed:
            raise CoaloraError(
                f"no GGUF block type tiles rows of {weight.shape[-1]} weights; use --format coalora"
            )
        top = max(t.bits_per_weight for t in allowed) * weight.numel()
        for j, t in enumerate(kinds):
            if t in allowed:
                restored = dequantize(quantize(weight, t), t, weight.shape)
                errors[i, j] = float((restored - weight.float()).double().square().sum())
                costs[i, j] = t.bits_per_weight * weight.numel()
            else:  # never chosen: costs the row's dearest allowed type and errs more than any
                errors[i, j], costs[i, j] = np.inf, top
        errors[i, ~np.isfinite(errors[i])] = 2 * errors[i, np.isfinite(errors[i])].max() + 1.0
    numel = sum(w.numel() for w in weights.values())
    cheapest = costs.min(axis=1).sum() / numel
    if budget < cheapest:
        raise CoaloraError(
            f"budget {budget:g} bits is below this model's cheapest GGUF mix ({cheapest:.4f} bits); raise it"
        )
    choice = solve_mckp(errors, costs, budget * numel)
    return {name: kinds[j].name for name, j in zip(weights, choice, strict=True)}


def run_configuration(
    module: CoALoRATask,
    weights: dict[str, torch.Tensor],
    gguf_kind: str | None,
    budget: float | None,
    qconfig: Any,
) -> tuple[QConfig, str]:
    """A gguf-family run's configuration for the request (the run's allocator, a qconfig, or one type with
    per-tensor fallbacks), checked against what its method serves; and where it came from."""
    from coalora.deploy.resolve import resolve_config

    if gguf_kind is None:
        resolution = resolve_config(module, budget=budget, qconfig=qconfig)
        assert resolution.config is not None  # a quantized method always resolves to a configuration
        return resolution.config, resolution.source
    from coalora.quant.families.gguf_family import GGUFOption

    space = module.model.space
    types = uniform_types(weights, gguf_kind)
    config = space.make(GGUFOption(types[n]) for n in space.names)
    return resolve_config(module, qconfig=config).config or config, f"type {gguf_type(gguf_kind).name}"


def export_gguf(
    module: CoALoRATask,
    out: str | os.PathLike,
    *,
    gguf_kind: str | None = None,
    budget: float | None = None,
    qconfig: Any = None,
    tokenizer: Any = None,
) -> dict:
    """Write ``model.gguf``, ``adapter.gguf`` and the export's metadata into ``out``, atomically.

    ``qconfig`` (a file or a :class:`~coalora.quant.qconfig.QConfig`): only for runs trained with the gguf
    code family, whose configurations are type mixes."""
    from coalora.deploy.gguf_export import require_gguf, write_llama_gguf, write_lora_gguf
    from coalora.pretrained import load_tokenizer

    check_gguf_request(gguf_kind, budget, qconfig)
    check_exportable(module)
    trained_on_types = family_run(module)
    if qconfig is not None and not trained_on_types:
        raise CoaloraError(
            "--format gguf --qconfig needs a run trained with code_family gguf (its qconfigs are type "
            "mixes); give this run --gguf-type or --budget"
        )
    require_gguf()  # the writer's package, before any quantization
    check_replaceable(Path(out))
    plain = plain_backbone(module)
    names = list(module.model.space.names)
    weights = {name: plain.get_submodule(name).weight.detach() for name in names}
    layers = module.model.layers
    source = None
    if trained_on_types:  # the run's own configuration of types, and its adapter for it (B·M)
        config, source = run_configuration(module, weights, gguf_kind, budget, qconfig)
        types = {name: config.matrices[name].type for name in names}
        factors = module.model.folded_adapter(config)
    else:
        types = uniform_types(weights, gguf_kind) if gguf_kind else allocated_types(weights, budget or 0.0)
        factors = {
            n: (layer.lora_A.detach(), layer.lora_B.detach()) for n, layer in zip(names, layers, strict=True)
        }
    alpha = float(layers[0].scaling) * int(layers[0].rank)
    numel = sum(w.numel() for w in weights.values())
    avg_bits = sum(GGUF_TYPES[types[n]].bits_per_weight * w.numel() for n, w in weights.items()) / numel
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(module.hparams.model_name)
    with staged_dir(out) as tmp:
        base = write_llama_gguf(plain, tokenizer, types, tmp / MODEL_FILE)
        adapter = write_lora_gguf(factors, alpha, tmp / ADAPTER_FILE, config=plain.config)
        metadata = {
            "format": GGUF_FORMAT,
            "backbone": module.hparams.model_name,
            "method": module.hparams.method,
            "code_family": module.model.space.family_name,
            "request": _request(gguf_kind, budget, qconfig),
            "configuration": source,
            "avg_bits": avg_bits,
            "tensor_types": types,
            "lora_alpha": alpha,
            "files": {MODEL_FILE: base, ADAPTER_FILE: adapter},
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1, default=str) + "\n")
    return metadata


def _request(gguf_kind: str | None, budget: float | None, qconfig: Any) -> dict:
    if gguf_kind is not None:
        return {"gguf_type": gguf_kind}
    if budget is not None:
        return {"budget": budget}
    return {"qconfig": str(qconfig) if isinstance(qconfig, (str, os.PathLike)) else "a given configuration"}


def summary_lines(metadata: dict, out: str | os.PathLike) -> list[str]:
    """What ``coalora adapt --format gguf`` prints."""
    counts: dict[str, int] = {}
    for kind in metadata["tensor_types"].values():
        counts[kind] = counts.get(kind, 0) + 1
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    sizes = {name: os.path.getsize(Path(out) / name) for name in (MODEL_FILE, ADAPTER_FILE)}
    return [
        f"GGUF types: {mix}; avg bits {metadata['avg_bits']:.4f} over {sum(counts.values())} targets",
        *(f"  {name:<14}{size:>14,} bytes" for name, size in sizes.items()),
        f"wrote {out} (run: llama-cli -m {Path(out) / MODEL_FILE} --lora {Path(out) / ADAPTER_FILE})",
    ]
