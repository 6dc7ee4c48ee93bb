"""Deployable artifacts: one configuration of a checkpoint as packed low-bit weights plus a plain LoRA.

An artifact is a folder that needs neither the checkpoint nor the network to run:

- ``quantized.safetensors``: per target matrix ``<name>.codes``, ``.scale_codes`` (bit-packed uint8),
  ``.scale2`` (in the option's dtype) and ``.offset`` (fp32), exactly what :func:`quantize` packs;
- ``adapter.safetensors``: per target ``<name>.lora_A`` (r×in) and ``<name>.lora_B`` = B·M, the mapper's
  adjustment folded in, so the adapter is a plain LoRA for this one configuration;
- ``full_precision.safetensors``: every other parameter (embeddings, LayerNorms, biases, the task head);
- ``config.json`` and the tokenizer files of the backbone, ``qconfig.json``, and ``coalora.json``
  (metadata: format, backbone, task, labels, method, avg bits, sizes by part, sizes and SHA-256 of files).

:func:`load` rebuilds the Hugging Face classifier from ``config.json``, sets every target weight to its
dequantized packed weight and keeps the adapter as a separate LoRA (``merge=True`` folds it into the
weights instead, giving a plain HF model), so its logits equal the training model's under that
configuration. Folders are written into a temporary sibling and moved into place at the end: a failed
export leaves nothing behind, and only a previous artifact (never another folder) is ever replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from coalora import __version__
from coalora.backbone import discover_targets, target_weights
from coalora.errors import CoaloraError
from coalora.glue import get_task
from coalora.lora import lqlora_decompose
from coalora.model import head_parameter_names
from coalora.options import TORCH_DTYPES, QuantOption
from coalora.qconfig import ConfigSpace, QConfig
from coalora.quantizer import PackedTensor, fake_quantize, quantize
from coalora.threads import intra_op_threads

FORMAT = "coalora.artifact/1"
METADATA_FILE = "coalora.json"
QCONFIG_FILE = "qconfig.json"
QUANTIZED_FILE = "quantized.safetensors"
ADAPTER_FILE = "adapter.safetensors"
FULL_PRECISION_FILE = "full_precision.safetensors"
PACKED_FIELDS = ("codes", "scale_codes", "scale2", "offset")
REEXPORT = "re-export it with `coalora adapt`"


# ------------------------------------------------------------------------------------------------ sizes


def first_line(err: BaseException) -> str:
    """An exception's first line: errors we wrap must stay one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass
class Resolution:
    """The configuration to serve, and how it was chosen (for reports and metadata)."""

    config: QConfig | None
    source: str
    budget: float | None = None


def packed_layout(option: QuantOption, numel: int) -> dict[str, tuple[torch.dtype, int]]:
    """Dtype and element count of each tensor :func:`quantize` stores for ``numel`` weights."""
    blocks = -(-numel // option.block)
    return {
        "codes": (torch.uint8, -(-blocks * option.block * option.bits // 8)),
        "scale_codes": (torch.uint8, -(-blocks * option.scale_bits // 8)),
        "scale2": (TORCH_DTYPES[option.scale2_dtype], -(-blocks // option.block2)),
        "offset": (torch.float32, 1),
    }


def packed_nbytes(option: QuantOption, numel: int) -> int:
    """Exact bytes :func:`quantize` stores for ``numel`` weights: codes, scale codes, scale2 and offset."""
    return sum(count * dtype.itemsize for dtype, count in packed_layout(option, numel).values())


def quantized_nbytes(space: ConfigSpace, config: QConfig) -> int:
    return sum(packed_nbytes(config.matrices[t.name], t.numel) for t in space.targets)


def fixed_nbytes(module: Any) -> int:
    """Bytes of everything but the quantized weights: full-precision parts and the folded adapter."""
    full = sum(t.numel() * t.element_size() for t in full_precision_state(module, quantized=True).values())
    adapter = sum(
        (layer.lora_A.numel() + layer.lora_B.numel()) * layer.lora_A.element_size()
        for layer in module.model.layers
    )
    return full + adapter


# -------------------------------------------------------------------------------------- building artifacts


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

    def to_model(self, merge: bool = False) -> nn.Module:
        """The HF classifier with dequantized target weights and the adapter (kept, or merged if asked)."""
        return _assemble(self, merge)


def full_precision_state(module: Any, quantized: bool) -> dict[str, torch.Tensor]:
    """Every backbone tensor that is not LoRA, nor a target weight when those are ``quantized``."""
    model = module.model
    skip = {f"{n}.{p}" for n in model.space.names for p in ("lora_A", "lora_B")}
    if quantized:
        skip |= {f"{n}.weight" for n in model.space.names}
    state = model.backbone.state_dict()
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items() if k not in skip}


def _cpu(packed: PackedTensor) -> PackedTensor:
    """The artifact lives on the CPU, whatever device the module is on."""
    parts = {part: getattr(packed, part).cpu() for part in PACKED_FIELDS}
    return PackedTensor(shape=packed.shape, option=packed.option, family=packed.family, **parts)


def _weights_to_quantize(module: Any, config: QConfig) -> dict[str, torch.Tensor]:
    """W for every target; for LQ-LoRA the residual W − L whose quantization the adapter was trained on."""
    model = module.model
    weights = target_weights(model.backbone, model.space.targets)
    if module.hparams.method != "lqlora":
        return weights
    residuals = {}
    for name, layer in zip(model.space.names, model.layers, strict=True):
        option = config.matrices[name]
        pinned = module._lqlora_weights[name]
        _, left, right = lqlora_decompose(
            weights[name], option, layer.rank, module.hparams.lqlora_iters, module.hparams.code_family
        )
        residual = weights[name].to(torch.float32) - left @ right
        if not torch.equal(fake_quantize(residual, option, module.hparams.code_family).to(pinned), pinned):
            raise CoaloraError(
                f"could not reproduce the LQ-LoRA base of '{name}'; export on the machine that trained it"
            )
        residuals[name] = residual
    return residuals


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
def build_artifact(module: Any, resolution: Resolution) -> Artifact:
    """Quantize and pack the backbone, run the mapper, fold B·M: the artifact for one configuration.

    ``resolution`` must come from :func:`coalora.serve.resolve_config`, which checks the method serves it.
    """
    model, config = module.model, resolution.config
    family = module.hparams.code_family
    stages = _Stopwatch()
    packed: dict[str, PackedTensor] = {}
    # LQ-LoRA's residual is recomputed as the module computed it: on the same threads (SVD rounding)
    weights = None if config is None else _weights_to_quantize(module, config)
    with intra_op_threads(1):
        if config is not None and weights is not None:
            packed = {n: _cpu(quantize(weights[n], config.matrices[n], family)) for n in model.space.names}
        stages.lap("quantize")
        mixers = model.mixers(config) if (model.mapper is not None and config is not None) else None
        stages.lap("mapper")
        adapter = {
            name: (
                layer.lora_A.detach().cpu().clone(),
                layer.folded_B(None if mixers is None else mixers[i]).detach().cpu().clone(),
            )
            for i, (name, layer) in enumerate(zip(model.space.names, model.layers, strict=True))
        }
        stages.lap("fold")
    full = full_precision_state(module, quantized=config is not None)
    hf_config = _labelled_config(model.backbone.config, module.hparams.task)
    artifact = Artifact({}, hf_config, config, packed, adapter, full, timings=stages.laps)
    artifact.metadata = _metadata(module, artifact, resolution)
    return artifact


def _labelled_config(config: Any, task: str) -> Any:
    """A copy of the HF config carrying the task's label names (shown by pipelines and ``predict``)."""
    import copy

    config = copy.deepcopy(config)
    names = get_task(task).label_names
    if names:
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    return config


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def part_sizes(artifact: Artifact, head_names: Sequence[str]) -> dict[str, int]:
    """Bytes of each part of the weights (tensor payloads; file headers excluded).

    Target weights are ``quantized`` (packed), or for fp checkpoints ``unquantized_targets``.
    """
    head = set(head_names)
    targets = {f"{name}.weight" for name in artifact.adapter}
    sizes = dict.fromkeys(("quantized", "adapter", "embeddings", "head", "other_full_precision"), 0)
    if not artifact.packed:
        sizes["unquantized_targets"] = 0
    sizes["quantized"] = sum(p.nbytes for p in artifact.packed.values())
    sizes["adapter"] = _nbytes([t for pair in artifact.adapter.values() for t in pair])
    for name, tensor in artifact.full_precision.items():
        part = "other_full_precision"
        if name in targets:
            part = "unquantized_targets"
        elif name in head:
            part = "head"
        elif "embed" in name:
            part = "embeddings"
        sizes[part] += tensor.numel() * tensor.element_size()
    sizes["weights"] = sum(sizes.values())
    return sizes


def _metadata(module: Any, artifact: Artifact, resolution: Resolution) -> dict:
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
        "task": hp.task,
        "label_names": list(get_task(hp.task).label_names),
        "method": hp.method,
        "rank": hp.rank,
        "alpha": hp.alpha,
        "lora_scaling": model.layers[0].scaling,
        "code_family": hp.code_family,
        "avg_bits": avg_bits,
        "configuration": resolution.source,
        "budget": resolution.budget,
        "fingerprint": module.fingerprint,
        "targets": {t.name: [t.out_features, t.in_features] for t in space.targets},
        "sizes": sizes,
        "predicted_weights": round(avg_bits * space.total_numel / 8) + rest,
    }


# --------------------------------------------------------------------------------------- writing to disk


def is_export_dir(path: Path) -> bool:
    """True for a folder this module wrote (artifact or PEFT export): the only kind it may replace."""
    try:
        data = json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("coalora.")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success move it into place, on failure delete it."""
    out = Path(out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        _share_like_umask(tmp)
        check_replaceable(out)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _share_like_umask(folder: Path) -> None:
    """Give the staged folder the modes a plain mkdir/open would (mkdtemp and safetensors use 0700/0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def check_replaceable(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CoaloraError(f"output '{out}' exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_export_dir(out):
        raise CoaloraError(
            f"output folder '{out}' exists and is not a coalora export; choose another --out or remove it"
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``; an old folder is moved aside first and restored if the move fails."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def file_inventory(folder: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file under ``folder`` except the metadata itself."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != METADATA_FILE:
            files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(artifact: Artifact, out: str | os.PathLike, tokenizer: Any) -> dict:
    """Write ``artifact`` (and ``tokenizer``) as a folder at ``out``, atomically; return its metadata."""
    from safetensors.torch import save_file

    with staged_dir(out) as tmp:
        if artifact.packed:
            tensors = {
                f"{name}.{part}": getattr(packed, part).contiguous()
                for name, packed in artifact.packed.items()
                for part in PACKED_FIELDS
            }
            save_file(tensors, tmp / QUANTIZED_FILE, metadata={"format": FORMAT})
        adapter = {
            f"{n}.{p}": t.contiguous()
            for n, pair in artifact.adapter.items()
            for p, t in zip(("lora_A", "lora_B"), pair)
        }
        save_file(adapter, tmp / ADAPTER_FILE, metadata={"format": FORMAT})
        save_file(artifact.full_precision, tmp / FULL_PRECISION_FILE, metadata={"format": FORMAT})
        if artifact.qconfig is not None:
            artifact.qconfig.save(tmp / QCONFIG_FILE, avg_bits=artifact.metadata["avg_bits"])
        artifact.hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        metadata = dict(artifact.metadata, files=file_inventory(tmp))
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    artifact.metadata = metadata
    return metadata


# ----------------------------------------------------------------------------------------- reading back


def _corrupt(folder: Path, what: str) -> CoaloraError:
    return CoaloraError(f"artifact '{folder}' is corrupted: {what}; {REEXPORT}")


def read_metadata(folder: Path, verify: bool = True) -> dict:
    """``coalora.json``, checked for format, and every listed file for size (and SHA-256 if ``verify``)."""
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise CoaloraError(f"artifact folder '{folder}' does not exist; write one with `coalora adapt`")
    if not path.is_file():
        raise CoaloraError(
            f"'{folder}' is not a coalora artifact (no {METADATA_FILE}); write one with `coalora adapt`"
        )
    try:
        metadata = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise _corrupt(folder, f"{METADATA_FILE} is not valid JSON ({first_line(err)})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise CoaloraError(f"'{folder}' has format {found!r}, not '{FORMAT}'; {REEXPORT}")
    required = ("backbone", "task", "method", "lora_scaling", "code_family", "targets", "files", "avg_bits")
    missing = [k for k in required if k not in metadata]
    if missing:
        raise _corrupt(folder, f"{METADATA_FILE} lacks {', '.join(missing)}")
    try:
        files = {
            str(rel): (int(info["bytes"]), str(info["sha256"])) for rel, info in metadata["files"].items()
        }
        metadata["targets"] = {str(n): (int(out), int(inp)) for n, (out, inp) in metadata["targets"].items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise _corrupt(folder, f"{METADATA_FILE} has a malformed 'files' or 'targets' entry") from None
    for rel, (expected, checksum) in files.items():
        file = folder / rel
        if not file.is_file():
            raise _corrupt(folder, f"file '{rel}' is missing")
        size = file.stat().st_size
        if size != expected:
            raise _corrupt(folder, f"file '{rel}' has {size:,} bytes, {expected:,} expected (truncated?)")
        if verify and _sha256(file) != checksum:
            raise _corrupt(folder, f"file '{rel}' does not match its checksum")
    return metadata


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(folder / name)
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(folder, f"{name} cannot be read ({first_line(err)})") from None


def _take(tensors: dict[str, torch.Tensor], key: str, folder: Path, file: str) -> torch.Tensor:
    tensor = tensors.pop(key, None)
    if tensor is None:
        raise _corrupt(folder, f"tensor '{key}' is missing from {file}")
    return tensor


def _packed_from(
    tensors: dict, name: str, shape: tuple[int, int], option: QuantOption, family: str, folder: Path
) -> PackedTensor:
    parts = {part: _take(tensors, f"{name}.{part}", folder, QUANTIZED_FILE) for part in PACKED_FIELDS}
    for part, (dtype, count) in packed_layout(option, shape[0] * shape[1]).items():
        tensor = parts[part]
        if tensor.dtype != dtype or tensor.numel() != count:
            raise _corrupt(
                folder, f"'{name}.{part}' is {tensor.dtype} x {tensor.numel()}, not {dtype} x {count}"
            )
    return PackedTensor(shape=shape, option=option, family=family, **parts)


def read_artifact(folder: str | os.PathLike, verify: bool = True) -> Artifact:
    """Read and check an artifact folder; every inconsistency is a one-line :class:`CoaloraError`."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    metadata = read_metadata(folder, verify)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise _corrupt(folder, f"config or tokenizer unreadable ({first_line(err)})") from None
    targets = metadata["targets"]
    qconfig = None
    packed: dict[str, PackedTensor] = {}
    if QCONFIG_FILE in metadata["files"]:  # absent only for full-precision (fp) artifacts
        qconfig = QConfig.load(folder / QCONFIG_FILE)
        if list(qconfig.matrices) != list(targets):
            raise _corrupt(
                folder, f"{QCONFIG_FILE} does not cover the artifact's {len(targets)} target matrices"
            )
        tensors = _read_tensors(folder, QUANTIZED_FILE)
        for name, shape in targets.items():
            packed[name] = _packed_from(
                tensors, name, shape, qconfig.matrices[name], metadata["code_family"], folder
            )
        if tensors:
            raise _corrupt(folder, f"{QUANTIZED_FILE} holds unexpected tensor '{next(iter(tensors))}'")
    tensors = _read_tensors(folder, ADAPTER_FILE)
    adapter = {}
    for name, (out_features, in_features) in targets.items():
        a = _take(tensors, f"{name}.lora_A", folder, ADAPTER_FILE)
        b = _take(tensors, f"{name}.lora_B", folder, ADAPTER_FILE)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape != (out_features, a.shape[0]):
            raise _corrupt(folder, f"adapter of '{name}' has shapes {tuple(a.shape)}, {tuple(b.shape)}")
        adapter[name] = (a, b)
    if tensors:
        raise _corrupt(folder, f"{ADAPTER_FILE} holds unexpected tensor '{next(iter(tensors))}'")
    full = _read_tensors(folder, FULL_PRECISION_FILE)
    return Artifact(metadata, hf_config, qconfig, packed, adapter, full, tokenizer)


class LoRALinear(nn.Module):
    """A frozen Linear (here the dequantized weight) plus a plain LoRA: y = x·Wᵀ + b + s·B·(A·x).

    B is the folded B·M, so no mapper is needed; parameter names match the training layer's.
    """

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.lora_A = nn.Parameter(lora_A.to(base.weight), requires_grad=False)
        self.lora_B = nn.Parameter(lora_B.to(base.weight), requires_grad=False)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(
            F.linear(x, self.lora_A), self.lora_B
        )

    def merged(self) -> nn.Linear:
        """A plain Linear with W + s·B·A (summed in float64 so merging adds no visible rounding)."""
        linear = nn.utils.skip_init(
            nn.Linear, self.in_features, self.out_features, bias=self.bias is not None
        )
        delta = self.lora_B.double() @ self.lora_A.double()
        weight = (self.weight.double() + self.scaling * delta).to(self.weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return linear


def quietly(make: Callable[[], Any]) -> Any:
    """Run ``make`` without transformers' load reports and progress bars (a rebuilt head is expected)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return make()
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def plain_model(artifact: Artifact) -> nn.Module:
    """The HF classifier from the artifact's config with dequantized targets (no adapter), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    model = quietly(lambda: AutoModelForSequenceClassification.from_config(artifact.hf_config))
    state = dict(artifact.full_precision)
    with intra_op_threads(1):
        for name, packed in artifact.packed.items():
            state[f"{name}.weight"] = packed.dequantize()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        missing = result.missing_keys
        raise CoaloraError(f"artifact misses tensor '{missing[0]}' ({len(missing)} missing); {REEXPORT}")
    if result.unexpected_keys:
        raise CoaloraError(f"artifact holds unknown tensor '{result.unexpected_keys[0]}'; {REEXPORT}")
    return model.eval()


def _assemble(artifact: Artifact, merge: bool) -> nn.Module:
    model = plain_model(artifact)
    names = [t.name for t in discover_targets(model)]
    if names != list(artifact.adapter):
        raise CoaloraError(
            f"the backbone in config.json does not have the artifact's target matrices; {REEXPORT}"
        )
    scaling = float(artifact.metadata["lora_scaling"])
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child), *artifact.adapter[name], scaling)
        setattr(parent, child, layer.merged() if merge else layer)
    return model.requires_grad_(False).eval()


# --------------------------------------------------------------------------------------------- inference


def predict_texts(
    logits_fn: Callable[[dict], torch.Tensor],
    tokenizer: Any,
    texts: Sequence[str | tuple[str, str]],
    label_names: Sequence[str],
    device: torch.device,
    batch_size: int = 32,
    max_length: int = 128,
) -> list[dict]:
    """Labels and probabilities (classification) or scores (regression) for raw texts or text pairs."""
    texts = [texts] if isinstance(texts, str) else texts
    results: list[dict] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        pairs = [t if isinstance(t, (tuple, list)) else (t,) for t in chunk]
        if len({len(p) for p in pairs}) != 1:
            raise CoaloraError("mix of single texts and text pairs in one call; pass one kind")
        columns = [list(col) for col in zip(*pairs)]
        batch = tokenizer(*columns, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        logits = logits_fn({k: v.to(device) for k, v in batch.items()}).float().cpu()
        if not label_names:
            results += [{"score": float(v)} for v in logits.reshape(len(chunk), -1)[:, 0]]
            continue
        probabilities = logits.softmax(dim=-1)
        for row in probabilities:
            best = int(row.argmax())
            results.append(
                {
                    "label": label_names[best],
                    "probability": float(row[best]),
                    "probabilities": {n: float(p) for n, p in zip(label_names, row)},
                }
            )
    return results


class DeployedModel(nn.Module):
    """A loaded artifact: the HF classifier, its tokenizer and metadata; ``predict`` works on raw text."""

    def __init__(self, model: nn.Module, tokenizer: Any, metadata: dict, qconfig: QConfig | None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.metadata = metadata
        self.qconfig = qconfig

    @property
    def label_names(self) -> list[str]:
        return list(self.metadata.get("label_names", []))

    @property
    def avg_bits(self) -> float:
        return float(self.metadata["avg_bits"])

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs).logits

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        return self(**batch)

    def predict(
        self, texts: Sequence[str | tuple[str, str]], batch_size: int = 32, max_length: int = 128
    ) -> list[dict]:
        device = next(self.model.parameters()).device
        return predict_texts(
            self.logits, self.tokenizer, texts, self.label_names, device, batch_size, max_length
        )


def load(folder: str | os.PathLike, merge: bool = False, verify: bool = True) -> DeployedModel:
    """Load an artifact written by ``coalora adapt`` as a ready model (no network, no checkpoint).

    The target weights are the dequantized packed weights; the folded adapter stays a separate LoRA
    (exactly the training computation) unless ``merge`` folds it into the weights, which leaves a plain
    Hugging Face model. ``verify`` checks every file's SHA-256 as well as its size.
    """
    artifact = read_artifact(folder, verify)
    model = artifact.to_model(merge)
    return DeployedModel(model, artifact.tokenizer, artifact.metadata, artifact.qconfig)
