"""What a served packed model keeps resident: tensor files written in pieces, a dequantize-only scratch."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from coalora.deploy import files, reader
from coalora.deploy.export import export
from coalora.deploy.layout import ADAPTER_FILE
from coalora.deploy.loaded import load
from coalora.errors import CoaloraError
from coalora.quant import dequantize, fused, quantizer
from coalora.quant.options import OPTION_SPACE
from coalora.quant.quantizer import fake_quantize, quantize
from tests.tiny_models import untrained_task


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"table": torch.randn(700, 384, generator=g), "small": torch.arange(5, dtype=torch.int64)}


def test_tensor_files_are_save_files_bytes_written_in_pieces(tmp_path, monkeypatch):
    tensors = _tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": files.FORMAT})
    sizes: list[int] = []
    real_write = os.write

    def spy(fd: int, data) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    files.save_tensors(tensors, tmp_path / "pieces.safetensors")
    monkeypatch.undo()
    written = (tmp_path / "pieces.safetensors").read_bytes()
    assert written == (tmp_path / "reference.safetensors").read_bytes()
    assert sum(sizes) == len(written) > 10 * files.WRITE_PIECE_BYTES  # the file went through os.write...
    assert max(sizes) <= files.WRITE_PIECE_BYTES  # ...never more than one piece at a time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pieces.safetensors", "reference.safetensors"]
    loaded = load_file(tmp_path / "pieces.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:1000])))
    files.save_tensors(_tensors(), tmp_path / "short.safetensors")
    monkeypatch.undo()
    save_file(_tensors(), tmp_path / "reference.safetensors", metadata={"format": files.FORMAT})
    assert (tmp_path / "short.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_a_failed_rewrite_leaves_no_staging_file(tmp_path, monkeypatch):
    def refuse(fd: int, data) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", refuse)
    with pytest.raises(OSError, match="No space"):
        files.save_tensors(_tensors(), tmp_path / "full.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["full.safetensors"]  # the staging copy is gone


@pytest.mark.parametrize("compiled", [False, True])
def test_serving_dequantizes_without_the_quantizers_scratch(compiled, monkeypatch):
    """A thread that only dequantizes (a served packed model) holds at most 6 bytes a weight of one chunk
    (the numpy path; nothing with the compiled loop), not the quantizer's ~15 bytes a weight of its larger
    chunk; the values stay fake_quantize's, bit for bit."""
    if compiled and quantizer.compiled_kernel(torch.device("cpu")) is None:
        pytest.skip("no compiled kernel on this machine")
    monkeypatch.setattr(fused, "ENABLED", compiled)
    w = torch.randn(1536, 384, generator=torch.Generator().manual_seed(1)) * 0.02
    option = OPTION_SPACE[200]
    packed, expected = quantize(w, option, "nf"), fake_quantize(w, option, "nf")
    seen: dict[str, object] = {}

    def serve() -> None:
        out = torch.empty(packed.padded_numel)
        seen["equal"] = torch.equal(packed.dequantize(out), expected)
        seen["quantizer_scratch"] = getattr(quantizer._CPU_WORK, "work", None)
        scratch = getattr(dequantize._CPU_SCRATCH, "scratch", None)
        held = () if scratch is None else (scratch.codes, scratch.index, scratch.words)
        seen["scratch_bytes"] = sum(t.numel() * t.element_size() for t in held)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    assert seen["equal"] is True
    assert seen["quantizer_scratch"] is None
    if compiled:
        assert seen["scratch_bytes"] == 0
    else:
        assert 0 < seen["scratch_bytes"] <= 6 * dequantize.DEQUANT_CHUNK + 8
    assert w.numel() > dequantize.DEQUANT_CHUNK  # the matrix took several chunks


@pytest.fixture(scope="module")
def artifact_dir(module_cache, tiny_models_dir, tmp_path_factory) -> Path:
    """An artifact written with this module's cache, so the marks it leaves are the ones loads find."""
    task, config = untrained_task(tiny_models_dir / "tiny-bert", False, 0)
    out = tmp_path_factory.mktemp("verified") / "bert"
    export(task, out, qconfig=config)
    return out


def _hashed(monkeypatch) -> list[str]:
    """The files the reader hashes from now on."""
    names: list[str] = []
    real = reader.sha256

    def spy(path: Path) -> str:
        names.append(path.name)
        return real(path)

    monkeypatch.setattr(reader, "sha256", spy)
    return names


def test_a_file_is_hashed_once_per_version_on_this_machine(artifact_dir, tmp_path, monkeypatch):
    hashed = _hashed(monkeypatch)
    load(artifact_dir)
    load(artifact_dir)
    assert hashed == []  # written here: its checksums were computed while writing
    copy = Path(shutil.copytree(artifact_dir, tmp_path / "copy"))
    load(copy)
    files = sorted(p.name for p in copy.iterdir() if p.name != "coalora.json")
    assert sorted(hashed) == files  # a copy is other files: hashed once...
    load(copy)
    assert sorted(hashed) == files  # ...and not again
    load(copy, verify="always")
    assert sorted(hashed) == sorted(files * 2)


def test_a_file_changed_after_a_verified_load_is_hashed_and_refused(artifact_dir, tmp_path):
    copy = Path(shutil.copytree(artifact_dir, tmp_path / "copy"))
    load(copy)
    target = copy / ADAPTER_FILE
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    stat = target.stat()
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a later time, same size
    with pytest.raises(CoaloraError, match="does not match its checksum"):
        load(copy)


def test_verify_takes_three_values(artifact_dir):
    with pytest.raises(CoaloraError, match="verify must be True, False or 'always'"):
        load(artifact_dir, verify="sometimes")
