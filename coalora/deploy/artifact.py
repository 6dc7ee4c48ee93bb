"""Building an artifact from a trained task: quantize and pack the backbone, fold B·M, collect the rest."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from coalora import __version__
from coalora.deploy.layout import (
    FORMAT,
    Artifact,
    Resolution,
    full_precision_state,
    narrow_embeddings,
)
from coalora.deploy.sizes import part_sizes
from coalora.errors import CoaloraError
from coalora.nn.model import head_parameter_names
from coalora.quant.families import get_family
from coalora.quant.quantizer import PackedTensor
from coalora.utils import intra_op_threads

#: what ``embedding_dtype`` may name, and the dtype it stores the embedding tables in
EMBEDDING_DTYPES = {"float32": torch.float32, "float16": torch.float16}

if TYPE_CHECKING:
    from coalora.quant.qconfig import QConfig
    from coalora.tasks.base import CoALoRATask


def _cpu(packed: PackedTensor) -> PackedTensor:
    """The artifact lives on the CPU, whatever device the module is on."""
    parts = {part: tensor.cpu() for part, tensor in packed.parts().items()}
    return get_family(packed.family).from_parts(packed.shape, packed.option, parts)


class _Stopwatch:
    """Seconds per named stage, each lap measured from the previous one."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self._last
        self._last = now


@torch.no_grad()
def build_artifact(module: CoALoRATask, resolution: Resolution, embedding_dtype: str = "float32") -> Artifact:
    """Quantize and pack the backbone, run the mapper, fold B·M: the artifact for one configuration.

    ``resolution`` must come from :func:`coalora.deploy.resolve.resolve_config`, which checks that the
    method serves it. ``embedding_dtype`` ``float16`` stores the (untied) embedding tables in fp16.
    """
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise CoaloraError(
            f"embedding_dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got '{embedding_dtype}'"
        )
    model, config = module.model, resolution.config
    stages = _Stopwatch()
    packed: dict[str, PackedTensor] = {}
    # LQ-LoRA's residual is recomputed as the module computed it: on the same threads (SVD rounding)
    weights = None if config is None else module.weights_to_quantize(config)
    with intra_op_threads(1):
        if config is not None and weights is not None:
            packed = {n: _cpu(p) for n, p in _packed_targets(module, weights, config).items()}
        stages.lap("quantize")
        adjustments = model.adjustments(config) if (model.mapper is not None and config is not None) else None
        stages.lap("mapper")
        adapter = {
            name: (a.cpu(), b.cpu()) for name, (a, b) in model.folded_adapter(config, adjustments).items()
        }
        stages.lap("fold")
    full = full_precision_state(module, quantized=config is not None)
    narrowed = narrow_embeddings(full, model.backbone, EMBEDDING_DTYPES[embedding_dtype])
    hf_config = _labelled_config(model.backbone.config, _label_names(module))
    artifact = Artifact({}, hf_config, config, packed, adapter, full, timings=stages.laps)
    artifact.metadata = _metadata(module, artifact, resolution)
    # the tables stored narrower than the model computes in: loading keeps them so and widens looked-up rows
    artifact.metadata["narrowed_embeddings"] = narrowed
    return artifact


def _packed_targets(
    module: CoALoRATask, weights: dict[str, torch.Tensor], config: QConfig
) -> dict[str, PackedTensor]:
    """Every target's packed form, quantized with the rounding the run serves with (nearest, or gptq with
    its statistics): the weight cache's where it holds them for these very weights (a configuration
    switched to before, its codes kept), the rest all at once (GPTQ rounds them together)."""
    model = module.model
    names, found = model.space.names, {}
    for name, layer in zip(names, model.layers, strict=True):
        if weights[name].data_ptr() == layer.weight.data_ptr():  # not LQ-LoRA's residual W − L
            held = model.cache.packed_form(name, config.matrices[name])
            if held is not None:
                found[name] = held
    missing = [n for n in names if n not in found]
    if missing:
        rounded = model.rounder.packed_many(
            missing, [weights[n] for n in missing], [config.matrices[n] for n in missing]
        )
        found.update(zip(missing, rounded, strict=True))
    return {n: found[n] for n in names}


def _label_names(module: CoALoRATask) -> list[str]:
    """A classifier's label names (none for a causal LM)."""
    return list(getattr(module, "label_names", []))


def _labelled_config(config: Any, names: list[str]) -> Any:
    """A copy of the HF config carrying the task's label names (shown by pipelines and ``predict``)."""
    import copy

    config = copy.deepcopy(config)
    if names:
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    return config


def _metadata(module: CoALoRATask, artifact: Artifact, resolution: Resolution) -> dict:
    hp = module.hparams
    model = module.model
    space = model.space
    config = artifact.qconfig
    # full precision (fp checkpoints): the bits of the stored weights
    avg_bits = (
        float(torch.finfo(model.layers[0].weight.dtype).bits) if config is None else space.avg_bits(config)
    )
    sizes = part_sizes(artifact, head_parameter_names(model.backbone))
    rest = sizes["weights"] - sizes["quantized"] - sizes.get("unquantized_targets", 0)
    return {
        "format": FORMAT,
        "coalora_version": __version__,
        "backbone": hp.model_name,
        "task": module.evaluation_name,
        "task_type": module.task_type,
        "label_names": _label_names(module),
        "method": hp.method,
        "rank": hp.rank,
        "alpha": hp.alpha,
        "lora_scaling": model.layers[0].scaling,
        "code_family": hp.code_family,
        "rounding": model.rounder.method,
        "avg_bits": avg_bits,
        "configuration": resolution.source,
        "budget": resolution.budget,
        "fingerprint": module.fingerprint,
        "targets": {t.name: [t.out_features, t.in_features] for t in space.targets},
        "sizes": sizes,
        "predicted_weights": round(avg_bits * space.total_numel / 8) + rest,
    }
