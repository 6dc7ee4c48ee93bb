"""Writing export folders safely: staged in a temporary sibling and moved into place at the end, so a failed
export leaves nothing behind, and only a previous export (never another folder) is ever replaced."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coalora.deploy.layout import (
    ADAPTER_FILE,
    FORMAT,
    FULL_PRECISION_FILE,
    METADATA_FILE,
    QCONFIG_FILE,
    QUANTIZED_FILE,
    Artifact,
)
from coalora.errors import CoaloraError


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
    """Size and SHA-256 of every file under ``folder`` except the metadata itself; each file is marked as
    verified here (the folder is moved into place, which keeps its files' inodes and times)."""
    from coalora.deploy.verified import mark_verified

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != METADATA_FILE:
            checksum = sha256(path)
            files[rel] = {"bytes": path.stat().st_size, "sha256": checksum}
            mark_verified(path, checksum)
    return files


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: the largest single write of a tensor file (64 KiB: Linux's default fault-around, ``fault_around_bytes``)
WRITE_PIECE_BYTES = 64 << 10


def save_tensors(tensors: dict, path: Path) -> None:
    """``safetensors.torch.save_file``, then the file rewritten in pieces of :data:`WRITE_PIECE_BYTES`.

    Why: a reader maps these files (``coalora.load``), and on Linux 6.x a buffered write leaves its pages in
    the page cache as folios as large as the write, while a page fault on a mapped file maps the whole folio.
    One 47 MB write of an embedding table made every token row looked up in the reader's first prediction
    bring about 0.8 MB into its RSS (11.4 MB for eight short sentences on MiniLM, measured); written in
    64 KiB pieces a row brings at most what any file's fault-around does (1.4 MB in all). The extra copy
    costs one read and write of the file; the bytes are identical.
    """
    from safetensors.torch import save_file

    staging = path.with_name(path.name + ".staging")
    save_file(tensors, staging, metadata={"format": FORMAT})
    try:
        with staging.open("rb") as source:
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                while piece := source.read(WRITE_PIECE_BYTES):
                    view = memoryview(piece)
                    while view:  # os.write may write less than asked
                        view = view[os.write(target, view) :]
            finally:
                os.close(target)
    finally:
        staging.unlink()


def write_artifact(artifact: Artifact, out: str | os.PathLike, tokenizer: Any) -> dict:
    """Write ``artifact`` (and ``tokenizer``) as a folder at ``out``, atomically; return its metadata."""
    with staged_dir(out) as tmp:
        if artifact.packed:
            tensors = {
                f"{name}.{part}": tensor.contiguous()
                for name, packed in artifact.packed.items()
                for part, tensor in packed.parts().items()
            }
            save_tensors(tensors, tmp / QUANTIZED_FILE)
        adapter = {
            f"{n}.{p}": t.contiguous()
            for n, pair in artifact.adapter.items()
            for p, t in zip(("lora_A", "lora_B"), pair)
        }
        save_tensors(adapter, tmp / ADAPTER_FILE)
        save_tensors(artifact.full_precision, tmp / FULL_PRECISION_FILE)
        if artifact.qconfig is not None:
            artifact.qconfig.save(tmp / QCONFIG_FILE, avg_bits=artifact.metadata["avg_bits"])
        artifact.hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        metadata = dict(artifact.metadata, files=file_inventory(tmp))
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    artifact.metadata = metadata
    return metadata
