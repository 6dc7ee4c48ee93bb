"""The disk cache of calibration statistics (:mod:`coalora.quant.calibration`): safetensors files keyed
by the backbone's weights, the trainable state (LoRA, mapper, head, each layer's scaling: a trained model's
statistics are not its untrained twin's, nor the base model's), the exact inputs used, the number of
examples and the configuration. A large model's sites do not fit in a checkpoint, hence files; each write is
atomic, so DDP ranks writing one file race harmlessly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from coalora.quant.calibration import Batch, input_hessians, shared_sites
from coalora.quant.targets import target_weights, weights_fingerprint
from coalora.utils import atomic_path, default_cache_dir, model_inputs

if TYPE_CHECKING:
    from coalora.nn.model import CoALoRAModel
    from coalora.quant.qconfig import QConfig

#: bumped whenever what a cached file holds (or how it is computed) changes
CACHE_VERSION = 1
CACHE_FORMAT = "coalora.calibration/1"


# -- disk cache ------------------------------------------------------------------------------------------


def trainable_fingerprint(model: CoALoRAModel) -> str:
    """A short hash of what training changes: LoRA A and B, the mapper (whatever their grad flags, so a
    model frozen for serving keeps its key), any other parameter that requires grad (the head), and each
    layer's LoRA scaling (an adapter switched off by scaling 0 gives the base model's statistics)."""
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad or name.endswith((".lora_A", ".lora_B")) or name.startswith("mapper."):
            state[name] = p
    scalings = ",".join(repr(float(layer.scaling)) for layer in model.layers)
    return hashlib.sha256(f"{weights_fingerprint(state)}|{scalings}".encode()).hexdigest()[:16]


def _data_digest(model: CoALoRAModel, batches: Sequence[Batch]) -> str:
    """A hash of exactly what the pass reads: every model input and the attention mask of every batch."""
    digest = hashlib.sha256()
    for batch in batches:
        inputs = dict(model_inputs(model.backbone, batch))
        if "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"]
        for key in sorted(inputs):
            value = inputs[key]
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                digest.update(f"{key}\x00{tuple(t.shape)}\x00{t.dtype}\x00".encode())
                digest.update(t.flatten().view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
        digest.update(b"\x01")
    return digest.hexdigest()[:16]


def _config_key(model: CoALoRAModel, config: QConfig | None) -> str:
    """The configuration and how its codes are chosen (code family; rounding, and GPTQ's own statistics)."""
    if config is None:
        return "fp"
    options = ";".join(config.matrices[name].short() for name in model.space.names)
    rounder = getattr(model, "rounder", None)
    rounding = "nearest" if rounder is None else f"{rounder.method}:{rounder.damp!r}"
    if rounder is not None and rounder.method != "nearest" and rounder.hessians is not None:
        rounding += ":" + weights_fingerprint(dict(rounder.hessians))
    return f"{model.cache.family}:{rounding}:{options}"


def calibration_cache_path(
    model: CoALoRAModel,
    batches: Sequence[Batch],
    config: QConfig | None = None,
    fingerprint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where :func:`cached_input_hessians` keeps these statistics. ``fingerprint``: the backbone's
    :func:`~coalora.quant.targets.weights_fingerprint` if known (a task has it), else computed here."""
    if fingerprint is None:
        fingerprint = weights_fingerprint(target_weights(model.backbone, model.space.targets))
    examples = sum(len(batch["input_ids"]) for batch in batches)
    parts = (
        f"v{CACHE_VERSION}",
        fingerprint,
        model.space.model,
        model.layers[0].weight.dtype,
        trainable_fingerprint(model),
        _data_digest(model, batches),
        examples,
        _config_key(model, config),
    )
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return folder / f"calibration-{digest}.safetensors"


def _save(hessians: Mapping[str, torch.Tensor], path: Path) -> None:
    """One tensor per site (never one per matrix), the grouping in the file's metadata; atomic."""
    from safetensors.torch import save_file

    sites = shared_sites(hessians)
    tensors = {site: hessians[site].contiguous() for site in sites}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT, "sites": json.dumps(sites)})


def _load(path: Path, model: CoALoRAModel) -> dict[str, torch.Tensor] | None:
    """The cached statistics in target order, each site's tensor shared by its members; None when the file
    is absent, unreadable or does not fit the model."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            sites = json.loads(metadata["sites"])
            tensors = {site: handle.get_tensor(site) for site in sites}
        by_name = {name: tensors[site] for site, members in sites.items() for name in members}
    except (OSError, KeyError, ValueError, TypeError, AttributeError, SafetensorError):
        return None
    if metadata.get("format") != CACHE_FORMAT or sorted(by_name) != sorted(model.space.names):
        return None
    shapes = {
        name: (layer.in_features, layer.in_features) for name, layer in zip(model.space.names, model.layers)
    }
    if any(tuple(h.shape) != shapes[name] for name, h in by_name.items()):
        return None
    return {name: by_name[name] for name in model.space.names}


def cached_input_hessians(
    model: CoALoRAModel,
    batches: Iterable[Batch],
    config: QConfig | None = None,
    fingerprint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`input_hessians`, read from the disk cache when present (without running the model), else
    computed and written there (:func:`calibration_cache_path` says what the key covers)."""
    batches = list(batches)
    path = calibration_cache_path(model, batches, config, fingerprint, cache_dir)
    cached = _load(path, model)
    if cached is not None:
        return cached
    hessians = input_hessians(model, batches, config)
    _save(hessians, path)
    return hessians
