"""Reading an artifact folder back, checking every file's size (and checksum) and every tensor's shape;
each inconsistency is a one-line error that says to re-export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from coalora.deploy.files import sha256
from coalora.deploy.layout import (
    ADAPTER_FILE,
    FORMAT,
    FULL_PRECISION_FILE,
    METADATA_FILE,
    QCONFIG_FILE,
    QUANTIZED_FILE,
    REEXPORT,
    Artifact,
)
from coalora.deploy.verified import already_verified, mark_verified
from coalora.errors import CoaloraError
from coalora.quant.families import get_family
from coalora.quant.options import QuantOption
from coalora.quant.qconfig import QConfig
from coalora.quant.quantizer import PackedTensor
from coalora.utils import first_line


def _corrupt(folder: Path, what: str) -> CoaloraError:
    return CoaloraError(f"artifact '{folder}' is corrupted: {what}; {REEXPORT}")


def read_metadata(folder: Path, verify: bool | str = True) -> dict:
    """``coalora.json``, checked for format, and every listed file for size and, if ``verify``, SHA-256:
    ``True`` hashes a file unless this machine hashed (or wrote) this very file before
    (:mod:`coalora.deploy.verified`), ``"always"`` hashes every file, ``False`` checks sizes only."""
    if verify not in (True, False, "always"):
        raise CoaloraError(f"verify must be True, False or 'always', got {verify!r}")
    path = folder / METADATA_FILE
    if folder.is_file() or folder.suffix == ".ckpt":
        raise CoaloraError(
            f"'{folder}' is a file, not an artifact folder; a training checkpoint opens with "
            f"coalora.deploy.AdaptiveModel.from_checkpoint('{folder}'), or export one with `coalora adapt`"
        )
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
        if found == "coalora.gguf/1":
            raise CoaloraError(
                f"'{folder}' is a GGUF export: run model.gguf with llama.cpp (--lora adapter.gguf), or "
                "export with --format coalora to load it here"
            )
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
        if not verify or (verify is True and already_verified(file, checksum)):
            continue
        if sha256(file) != checksum:
            raise _corrupt(folder, f"file '{rel}' does not match its checksum")
        mark_verified(file, checksum)
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


def _check_family(family: str, folder: Path) -> None:
    try:
        get_family(family)
    except CoaloraError as err:  # a family registered where the artifact was written, but not here
        raise CoaloraError(
            f"artifact '{folder}' needs an {first_line(err)} (register it with "
            "coalora.quant.families.register_family before loading)"
        ) from None


def _packed_from(
    tensors: dict, name: str, shape: tuple[int, int], option: QuantOption, family: str, folder: Path
) -> PackedTensor:
    try:
        schema = get_family(family).part_schema(option, shape[0] * shape[1])
    except CoaloraError as err:  # a family registered where the artifact was written, but not here
        raise CoaloraError(
            f"artifact '{folder}' needs an {first_line(err)} (register it with "
            "coalora.quant.families.register_family before loading)"
        ) from None
    if not get_family(family).allowed(option, shape[1]):
        raise _corrupt(folder, f"'{name}' has rows of {shape[1]} weights, which {option.short()} cannot code")
    parts = {part: _take(tensors, f"{name}.{part}", folder, QUANTIZED_FILE) for part in schema}
    for part, spec in schema.items():
        tensor = parts[part]
        if tensor.dtype != spec.dtype or tensor.numel() != spec.count:
            raise _corrupt(
                folder,
                f"'{name}.{part}' is {tensor.dtype} x {tensor.numel()}, not {spec.dtype} x {spec.count}",
            )
    return get_family(family).from_parts(shape, option, parts)


def read_artifact(folder: str | os.PathLike, verify: bool | str = True) -> Artifact:
    """Read and check an artifact folder; every inconsistency is a one-line :class:`CoaloraError`."""
    from transformers import AutoConfig, AutoTokenizer

    if not isinstance(folder, (str, os.PathLike)) or str(folder) == "":
        raise CoaloraError(
            f"coalora.load takes the path of an artifact folder, got {folder!r}; "
            "pass the folder `coalora adapt` writes"
        )
    folder = Path(folder).expanduser()
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
        _check_family(str(metadata["code_family"]), folder)
        qconfig = QConfig.load(folder / QCONFIG_FILE, str(metadata["code_family"]))
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
