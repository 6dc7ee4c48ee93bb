"""The LightningCLI entry point: every shipped YAML, the sweep command, DDP, evaluate and bad input."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coalora.cli import main

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIGS = ["configs/sst2_minilm.yaml", "configs/sst2_roberta_large.yaml"]
OVERLAYS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*/*.yaml"))
TINY_BUDGETS = "[2.5, 3.3, 5.0]"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _tiny_args(tiny_models_dir: Path, glue_dir: Path, tmp_path: Path, kind: str = "bert") -> list[str]:
    return [
        "--model.model_name",
        str(tiny_models_dir / f"tiny-{kind}"),
        "--model.rank",
        "4",
        "--model.train_budgets",
        TINY_BUDGETS,
        "--data.glue_dir",
        str(glue_dir),
        "--data.train_limit",
        "32",
        "--data.eval_limit",
        "16",
        "--data.batch_size",
        "8",
        "--data.search_size",
        "16",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "run"),
    ]


def test_every_shipped_yaml_is_valid_yaml_with_known_sections():
    for path in [*BASE_CONFIGS, *OVERLAYS, "sweeps/sst2_minilm.yaml"]:
        data = yaml.safe_load((REPO / path).read_text())
        assert isinstance(data, dict) and data, path
    for path in [*BASE_CONFIGS, *OVERLAYS]:
        data = yaml.safe_load((REPO / path).read_text())
        assert set(data) <= {"seed_everything", "trainer", "model", "data", "ckpt_path"}, path


@pytest.mark.parametrize("config", BASE_CONFIGS)
def test_base_configs_fit_with_fast_dev_run(config, tiny_models_dir, glue_dir, tmp_path):
    kind = "roberta" if "roberta" in config else "bert"
    args = ["fit", "--config", config, *_tiny_args(tiny_models_dir, glue_dir, tmp_path, kind)]
    assert main([*args, "--trainer.fast_dev_run", "true"]) == 0


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if "ddp" not in o])
def test_overlay_configs_fit_with_fast_dev_run(overlay, tiny_models_dir, glue_dir, tmp_path):
    args = ["fit", "--config", BASE_CONFIGS[0], "--config", overlay]
    args += _tiny_args(tiny_models_dir, glue_dir, tmp_path)
    if "wandb" in overlay:  # the CSV logger's save_dir flag above does not apply to WandbLogger
        args = [a for a in args if not a.startswith("--trainer.logger")][:-1]
        args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "wandb")]
    assert main([*args, "--trainer.fast_dev_run", "true"]) == 0


def test_one_seed_sets_the_module_and_the_data(tiny_models_dir, glue_dir, tmp_path, capsys):
    args = ["fit", "--config", BASE_CONFIGS[0], *_tiny_args(tiny_models_dir, glue_dir, tmp_path)]
    once = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"]
    assert main([*args, "--model.seed", "43", *once]) == 0  # unlinked, Lightning refuses the two seeds
    saved = yaml.safe_load(next((tmp_path / "run").rglob("config.yaml")).read_text())
    assert saved["model"]["init_args"]["seed"] == 43
    capsys.readouterr()
    assert main([*args, "--data.seed", "7", "--trainer.fast_dev_run", "true"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("coalora: error:") and "data.seed" in error and "\n" not in error


def test_sweep_command_parses(tiny_models_dir, glue_dir, tmp_path):
    sweep = yaml.safe_load((REPO / "sweeps/sst2_minilm.yaml").read_text())
    sample = {"model.lr": 0.001, "model.rank": 8, "model.configs_per_step": 1}
    assert set(sample) == set(sweep["parameters"])
    command = []
    for part in sweep["command"]:
        if part == "${env}":
            continue
        if part == "${args}":
            command += [f"--{key}={value}" for key, value in sample.items()]  # what a W&B agent passes
        else:
            command.append(part)
    assert command[:2] == ["coalora", "fit"]
    args = command[1:] + _tiny_args(tiny_models_dir, glue_dir, tmp_path)
    args = [a for a in args if a not in ("--model.rank", "4")]  # keep the sweep's rank
    args = [a for a in args if not a.startswith("--trainer.logger")][:-1]
    assert main([*args, "--trainer.fast_dev_run", "true"]) == 0


def _fit_subprocess(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "coalora.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_cpu_ddp_trains_every_rank_on_the_same_configurations(
    tiny_models_dir, glue_dir, tmp_path
):
    probe = tmp_path / "probe"
    args = ["fit", "--config", BASE_CONFIGS[0], "--config", "configs/ddp_cpu.yaml"]
    args += _tiny_args(tiny_models_dir, glue_dir, tmp_path)
    args = [a for a in args if a not in ("--trainer.devices", "1")]
    callbacks = {"class_path": "tests.ddp_probe.RecordConfigs", "init_args": {"out_dir": str(probe)}}
    args += ["--trainer.max_epochs", "1", "--trainer.callbacks+", json.dumps(callbacks)]
    result = _fit_subprocess(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["train_set"] == ranks[1]["train_set"]
    assert ranks[0]["steps"] == ranks[1]["steps"] and len(ranks[0]["steps"]) >= 2
    # K = 2 backward passes a step, one gradient all-reduce (the tiny adapter is one bucket), and the
    # ranks end with the same parameters
    assert ranks[0]["allreduces"] == ranks[0]["optimizer_steps"] == len(ranks[0]["steps"])
    assert ranks[0]["parameters"] == ranks[1]["parameters"]


def test_evaluate_writes_table_json_csv_and_plot(tiny_models_dir, glue_dir, tmp_path, capsys):
    args = ["fit", "--config", BASE_CONFIGS[0], *_tiny_args(tiny_models_dir, glue_dir, tmp_path)]
    assert main([*args, "--trainer.max_steps", "2", "--trainer.max_epochs", "1"]) == 0
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--ckpt",
            str(ckpt),
            "--random",
            "2",
            "--seen",
            "1",
            "--eval-limit",
            "16",
            "--glue-dir",
            str(glue_dir),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "eval.json").read_text())
    kinds = [row["kind"] for row in data["results"]]
    assert kinds.count("budget") == 4 and kinds.count("random") == 2 and kinds.count("seen") == 1
    assert [row["seen"] for row in data["results"] if row["kind"] == "seen"] == [True]
    assert 0 <= data["summary"]["coalora"]["hypervolume"] <= 1
    assert (out / "eval.csv").read_text().count("\n") == 8
    assert (out / "eval.png").stat().st_size > 5000
    assert "avg_bits" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--config", "no/such.yaml"], "File does not exist"),
        (["fit", "--config", BASE_CONFIGS[0], "--model.no_such_option", "1"], "no_such_option"),
        (
            ["fit", "--config", BASE_CONFIGS[0], "--model.method", "magic"],
            "model.method must be one of 'coalora'",
        ),
        (["evaluate", "--ckpt", "missing.ckpt"], "does not exist"),
        (["evaluate"], "required: --ckpt"),
    ],
)
def test_bad_input_gives_one_line_error(args, message, capsys, tmp_path):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coalora: error:") and message in err[0]


def test_malformed_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    assert main(["fit", "--config", str(bad)]) == 2
    assert "Problems parsing config" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "allocate", "evaluate", "adapt", "demo"))


def test_readme_commands_exist():
    readme = (REPO / "README.md").read_text()
    assert "nox -s tests" in readme and "nox -s demo" in readme
    assert shlex.split("nox -s tests")[0] == "nox"
