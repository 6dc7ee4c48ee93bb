"""Ctrl-C during ``fit`` saves a resumable checkpoint and prints the one command that resumes it; a run
killed mid-epoch and resumed from its last step checkpoint ends exactly as the uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coalora.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = "tests/conf/sst2_tiny.yaml"


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(
    tiny_models_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    run = str(tmp_path / "run")
    args = ["fit", "--config", TINY, "--model.model_name", str(tiny_models_dir / "tiny-bert")]
    args += ["--trainer.default_root_dir", run, "--trainer.logger.init_args.save_dir", run]
    probe = {"class_path": "tests.interrupt_probe.InterruptAt", "init_args": {"step": 4}}
    handler = signal.getsignal(signal.SIGINT)
    try:
        code = main([*args, "--trainer.callbacks+", json.dumps(probe)])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("coalora:")]
    assert code == 130 and len(lines) == 1 and "resume with: coalora fit" in lines[0], lines
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    saved = Path(command[command.index("--ckpt_path") + 1])
    assert torch.load(saved, weights_only=True)["global_step"] == 4
    at = command.index("--trainer.callbacks+")
    assert main(command[1:at] + command[at + 2 :]) == 0  # the printed command, less the probe, continues
    last = max(Path(run).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(last, weights_only=True)["global_step"] == 6  # 2 epochs x 3 batches
    assert main([*args, "--ckpt_path", "last", "--trainer.max_epochs", "3"]) == 0  # `last` finds it
    newest = max(Path(run).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(newest, weights_only=True)["global_step"] == 9


# -- a crash mid-epoch, resumed from the last step checkpoint, trains exactly as the uninterrupted run -----

#: a search round every 2 steps and after the last (the resumed part writes an archive); a step checkpoint
STEP_CALLBACKS = [
    {
        "class_path": "callbacks.ParetoConfigSearch",
        "init_args": {
            "score_batches": 1,
            "score_batch_size": 8,
            "num_starts": 2,
            "max_steps": 2,
            "gp_maxiter": 10,
            "every_n_train_steps": 2,
            "final_round": True,
        },
    },
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "save_last": True, "filename": "{step}"},
    },
]


def _fit_args(tiny_models_dir: Path, run: Path, callbacks: list[dict] = STEP_CALLBACKS) -> list[str]:
    """The tiny run (2 epochs x 3 batches, dropout on) with ``callbacks``, writing into ``run``."""
    args = ["fit", "--config", TINY, "--model.model_name", str(tiny_models_dir / "tiny-bert")]
    args += ["--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run)]
    return [*args, "--trainer.callbacks", json.dumps(callbacks)]


def _outcome(run: Path) -> dict:
    """What a finished run leaves: the final checkpoint's parameters, configuration sets, search state,
    the newest search archive, and the last validation metrics."""
    newest = max(run.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    final = torch.load(newest, weights_only=True)
    search = next(v for k, v in final["callbacks"].items() if k.startswith("ParetoConfigSearch"))
    archive = max(run.rglob("search_archive.json"), key=lambda p: p.stat().st_mtime)
    metrics = max(run.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("val/loss@3.0")]
    return {
        "global_step": final["global_step"],
        "state_dict": final["state_dict"],
        "train_configs": final["coalora"]["train_configs"],
        "trained_on": final["coalora"]["trained_on"],
        "search": search,
        "archive": json.loads(archive.read_text()),
        "val": {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v},
    }


def _assert_same(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == 6
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    assert resumed["train_configs"] == reference["train_configs"]
    assert resumed["trained_on"] == reference["trained_on"]
    for key in ("encoded", "f1", "f2", "epoch"):
        ours, theirs = resumed["search"]["archive"][key], reference["search"]["archive"][key]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, equal_nan=True, msg=key)
    assert torch.equal(resumed["search"]["train_set"], reference["search"]["train_set"])
    assert torch.equal(resumed["search"]["generator"], reference["search"]["generator"])
    ours, theirs = resumed["archive"], reference["archive"]
    assert ours.keys() == theirs.keys()
    for key in ours.keys() - {"entries"}:  # one at a time: newer pytest refuses approx of nested values
        if isinstance(ours[key], str):
            assert ours[key] == theirs[key], key
        else:
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert [e["f1"] for e in ours["entries"]] == pytest.approx([e["f1"] for e in theirs["entries"]], abs=1e-6)
    assert [{**e, "f1": None} for e in ours["entries"]] == [{**e, "f1": None} for e in theirs["entries"]]
    assert resumed["val"].keys() == reference["val"].keys() and resumed["val"]
    assert resumed["val"] == pytest.approx(reference["val"], abs=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tiny_models_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The reference: the tiny run start to end (in this process), with a checkpoint at every step."""
    run = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        assert main(_fit_args(tiny_models_dir, run)) == 0
    return run, _outcome(run)


@pytest.mark.parametrize("step", [2, 3, 4])
def test_resuming_from_a_step_checkpoint_trains_as_the_uninterrupted_run(
    step, uninterrupted, tiny_models_dir, tmp_path, monkeypatch
):
    """What a crash leaves is the step checkpoints: resumed from one mid-epoch (2, 4: the epoch's next
    batches must not be the epoch's first again) or at an epoch's last batch (3), the run ends identical."""
    monkeypatch.chdir(REPO)
    reference_run, reference = uninterrupted
    saved = next(reference_run.rglob(f"step={step}.ckpt"))
    run = tmp_path / "resumed"
    assert main([*_fit_args(tiny_models_dir, run), "--ckpt_path", str(saved)]) == 0
    _assert_same(_outcome(run), reference)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_from_the_last_step_checkpoint_matches(
    uninterrupted, tiny_models_dir, tmp_path
):
    """The real thing, through ``python -m coalora.cli`` in subprocesses: SIGKILL before the 6th batch
    (mid-epoch 2, the 5th step's checkpoint just written), then ``--ckpt_path last``."""
    run = tmp_path / "killed"
    args = _fit_args(
        tiny_models_dir,
        run,
        [*STEP_CALLBACKS, {"class_path": "tests.interrupt_probe.KillAt", "init_args": {"step": 5}}],
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "coalora.cli"]
    killed = subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = torch.load(run / "coalora" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert left["global_step"] == 5  # the kill came after step 5's checkpoint, before step 6
    resumed = subprocess.run(
        [*command, *_fit_args(tiny_models_dir, run), "--ckpt_path", "last"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same(_outcome(run), uninterrupted[1])
