"""Adapt and export refuse bad input in one line and leave nothing half-written: the CLI, bad
configurations, damaged artifacts, output folders and checkpoints that are not ours."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coalora.deploy.export import export
from coalora.deploy.layout import ADAPTER_FILE, FULL_PRECISION_FILE, METADATA_FILE, QUANTIZED_FILE
from coalora.deploy.loaded import load
from coalora.errors import CoaloraError
from coalora.quant.qconfig import QConfig
from tests.export_setup import (  # noqa: F401 (fixtures)
    artifact_dir,
    batch,
    ckpt,
    config,
    module,
    other_config,
    workdir,
)

pytestmark = pytest.mark.usefixtures("module_cache")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_adapt_prints_sizes_and_timings(ckpt, workdir, capsys):
    from coalora.cli import main

    assert main(["adapt", "--ckpt", str(ckpt), "--budget", "3.0", "--out", str(workdir / "cli")]) == 0
    out = capsys.readouterr().out
    assert "quantized" in out and "mapper" in out and "load checkpoint" in out
    assert load(workdir / "cli").avg_bits == pytest.approx(3.0, abs=1e-3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-bytes", "12parsecs"], "is not a byte count"),
        ([], "choose one with --budget, --qconfig or --max-bytes"),
        (["--budget", "1.0"], "outside the achievable range"),
    ],
)
def test_cli_bad_input_is_one_line(ckpt, workdir, capsys, extra, message):
    from coalora.cli import main

    assert main(["adapt", "--ckpt", str(ckpt), "--out", str(workdir / "bad"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (workdir / "bad").exists()


# ------------------------------------------------------------------------------------------ bad configs


def _mangled(config: QConfig, how: str) -> dict:
    data = config.to_json()
    names = list(data["matrices"])
    if how == "backbone":
        data["model"] = "roberta-large"
    elif how == "missing":
        del data["matrices"][names[0]]
    else:
        data["matrices"]["bert.encoder.layer.9.attention.self.query"] = data["matrices"][names[0]]
    return data


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("backbone", "written for backbone 'roberta-large'"),
        ("missing", "is missing target module"),
        ("extra", "does not have"),
    ],
)
def test_bad_qconfig_is_refused(module, config, workdir, how, message):
    path = workdir / f"bad-{how}.json"
    path.write_text(json.dumps(_mangled(config, how)))
    with pytest.raises(CoaloraError, match=message):
        export(module, workdir / f"out-{how}", qconfig=path)
    assert not (workdir / f"out-{how}").exists()


# --------------------------------------------------------------------------------------- bad artifacts


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_refused(artifact_dir, tmp_path):
    folder = _copy(artifact_dir, tmp_path / "a")
    path = folder / QUANTIZED_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CoaloraError, match=r"quantized.safetensors' has .* expected \(truncated\?\)"):
        load(folder)
    # even when the metadata is edited to agree, safetensors' own check fails with a one-line error
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["files"][QUANTIZED_FILE]["bytes"] = path.stat().st_size
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CoaloraError, match=r"quantized\.safetensors cannot be read"):
        load(folder, verify=False)


def test_broken_metadata_json_is_refused(artifact_dir, tmp_path):
    folder = _copy(artifact_dir, tmp_path / "a")
    (folder / METADATA_FILE).write_text('{"format": "coalora.artifact/1", ')
    with pytest.raises(CoaloraError, match="is not valid JSON"):
        load(folder)


def test_flipped_byte_fails_the_checksum(artifact_dir, tmp_path):
    folder = _copy(artifact_dir, tmp_path / "a")
    data = bytearray((folder / ADAPTER_FILE).read_bytes())
    data[-1] ^= 0xFF
    (folder / ADAPTER_FILE).write_bytes(bytes(data))
    with pytest.raises(CoaloraError, match="does not match its checksum"):
        load(folder)


@pytest.mark.parametrize(
    ("file", "key"),
    [
        (QUANTIZED_FILE, "bert.encoder.layer.1.output.dense.scale2"),
        (ADAPTER_FILE, "bert.encoder.layer.0.attention.self.key.lora_B"),
        (FULL_PRECISION_FILE, "bert.embeddings.LayerNorm.weight"),
    ],
)
def test_missing_tensor_is_refused(artifact_dir, tmp_path, file, key):
    from safetensors.torch import load_file, save_file

    folder = _copy(artifact_dir, tmp_path / "a")
    tensors = load_file(folder / file)
    del tensors[key]
    save_file(tensors, folder / file)
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["files"][file]["bytes"] = (folder / file).stat().st_size
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CoaloraError, match=f"misses tensor '{key}'|tensor '{key}' is missing"):
        load(folder, verify=False)


def test_not_an_artifact(tmp_path):
    with pytest.raises(CoaloraError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(CoaloraError, match="is not a coalora artifact"):
        load(tmp_path)


# ------------------------------------------------------------------------------ output folder handling


def test_existing_foreign_folder_is_never_clobbered(module, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(CoaloraError, match="is not a coalora export"):
        export(module, out, budget=3.0)
    assert (out / "thesis.tex").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_failure_midway_leaves_no_partial_artifact(module, tmp_path):
    class Exploding:
        def save_pretrained(self, folder: Path) -> None:
            (Path(folder) / "half.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export(module, tmp_path / "out", budget=3.0, tokenizer=Exploding())
    assert list(tmp_path.iterdir()) == []


def test_failed_reexport_keeps_the_previous_artifact(module, artifact_dir, tmp_path):
    out = _copy(artifact_dir, tmp_path / "out")

    class Exploding:
        def save_pretrained(self, folder: Path) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError):
        export(module, out, budget=3.0, tokenizer=Exploding())
    assert sorted(os.listdir(out)) == sorted(os.listdir(artifact_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
