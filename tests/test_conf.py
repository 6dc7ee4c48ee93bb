"""The tiny test YAMLs under ``tests/conf`` run end to end through ``main([...])`` on committed fixtures:
fit (with the search), then validate and test from the checkpoint it wrote, and evaluate it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coalora.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = "tests/conf/sst2_tiny.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the YAMLs name the fixtures relative to the repository root


def _run_dir_args(tmp_path: Path) -> list[str]:
    out = str(tmp_path / "run")
    return ["--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out]


def test_tiny_yaml_fits_validates_tests_and_evaluates(tiny_models_dir, tmp_path, capsys):
    model = ["--model.model_name", str(tiny_models_dir / "tiny-bert")]
    assert main(["fit", "--config", TINY, *model, *_run_dir_args(tmp_path)]) == 0
    last = next((tmp_path / "run").rglob("last.ckpt"))
    archive = json.loads(next((tmp_path / "run").rglob("search_archive.json")).read_text())
    # two epochs, one round: after the first (none follows the last epoch)
    assert archive["epoch"] == 0 and any(e["training"] for e in archive["entries"])
    for stage in ("validate", "test"):
        args = [stage, "--config", TINY, *model, *_run_dir_args(tmp_path), "--ckpt_path", str(last)]
        assert main(args) == 0
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--ckpt", str(last), "--glue-dir", "tests/fixtures/glue_tiny", "--out", str(out)])
        == 0
    )
    results = json.loads((out / "eval.json").read_text())["results"]
    assert [r["label"] for r in results] == ["3.0"] and 0.0 <= results[0]["accuracy"] <= 1.0


@pytest.mark.parametrize("overlay", ["configs/baselines/qlora.yaml", "configs/baselines/fp.yaml"])
def test_tiny_yaml_with_a_baseline_overlay(overlay, tiny_models_dir, tmp_path):
    args = ["fit", "--config", TINY, "--config", overlay, *_run_dir_args(tmp_path)]
    args += ["--model.model_name", str(tiny_models_dir / "tiny-bert"), "--trainer.max_epochs", "1"]
    assert main(args) == 0
    assert next((tmp_path / "run").rglob("last.ckpt")).is_file()


def test_demo_reports_the_last_checkpoint_not_one_picked_on_dev(tiny_models_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--config", TINY, "--out", str(out), "--random", "1"]
    assert main([*args, "--model.model_name", str(tiny_models_dir / "tiny-bert")]) == 0
    printed = capsys.readouterr().out
    assert "last.ckpt" in printed.split("evaluating", 1)[1].splitlines()[0]
    results = json.loads((out / "eval" / "eval.json").read_text())["results"]
    assert {r["kind"] for r in results} >= {"budget", "random"}


def test_no_shipped_config_selects_a_checkpoint_on_the_dev_split():
    import yaml

    for path in [*REPO.glob("configs/**/*.yaml"), *REPO.glob("tests/conf/*.yaml")]:
        callbacks = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("callbacks") or []
        for callback in callbacks:
            if callback["class_path"].endswith("ModelCheckpoint"):
                monitor = (callback.get("init_args") or {}).get("monitor") or ""
                assert not monitor.startswith(("val/", "test/")), path


def test_demo_trains_in_fp32_where_the_cpu_only_emulates_bf16(monkeypatch):
    from coalora import utils
    from coalora.commands import demo

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert demo.precision_flags([]) == ["--trainer.precision", "32-true"]
    assert demo.precision_flags(["--trainer.precision", "bf16-mixed"]) == []  # the user's choice wins
    assert demo.precision_flags(["--trainer.precision=16-mixed"]) == []
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert demo.precision_flags([]) == []  # native bf16: the shipped config as it is


def test_fit_in_bf16_warns_on_a_cpu_that_only_emulates_it(tiny_models_dir, tmp_path, monkeypatch, capsys):
    from coalora import utils

    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    args = ["fit", "--config", TINY, "--model.model_name", str(tiny_models_dir / "tiny-bert")]
    args += [*_run_dir_args(tmp_path), "--trainer.max_steps", "1", "--trainer.precision", "bf16-mixed"]
    assert main(args) == 0
    assert "without native bf16" in capsys.readouterr().err
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert main(args) == 0
    assert "without native bf16" not in capsys.readouterr().err
