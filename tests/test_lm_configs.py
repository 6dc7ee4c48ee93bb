"""Every shipped decoder config and baseline overlay still fits (on a tiny LLaMA), and two-process CPU DDP
ranks agree on the configurations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coalora.cli import main
from tests.test_causal_lm import REPO, TEXT, TINY, _in_repo, _run_args  # noqa: F401  (_in_repo: autouse)

LM_CONFIGS = ["configs/wikitext_llama_cpu.yaml", "configs/c4_qwen2_5_1_5b.yaml", "configs/c4_llama2_7b.yaml"]
BASELINES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "baselines").glob("*.yaml"))


def _tiny_lm_args(tiny_models_dir: Path, tmp_path: Path) -> list[str]:
    return [
        "--model.model_name",
        str(tiny_models_dir / "tiny-llama-lm"),
        "--model.rank",
        "4",
        "--model.train_budgets",
        "[2.5, 3.3, 5.0]",
        "--model.dtype",
        "float32",
        "--data.source",
        "local",
        "--data.train_files",
        json.dumps([str(TEXT / "train.txt")]),
        "--data.test_files",
        json.dumps([str(TEXT / "test.txt")]),
        "--data.block_size",
        "32",
        "--data.batch_size",
        "2",
        "--data.eval_batch_size",
        "2",
        "--data.search_blocks",
        "4",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32",
        *_run_args(tmp_path),
        "--trainer.fast_dev_run",
        "true",
    ]


@pytest.mark.parametrize("config", LM_CONFIGS)
def test_shipped_lm_configs_fit_on_a_tiny_decoder(config, tiny_models_dir, tmp_path):
    assert main(["fit", "--config", config, *_tiny_lm_args(tiny_models_dir, tmp_path)]) == 0


@pytest.mark.parametrize("overlay", BASELINES)
def test_baseline_overlays_fit_over_the_lm_config(overlay, tiny_models_dir, tmp_path):
    args = ["fit", "--config", LM_CONFIGS[0], "--config", overlay, *_tiny_lm_args(tiny_models_dir, tmp_path)]
    assert main(args) == 0


@pytest.mark.slow
def test_two_process_cpu_ddp_lm_ranks_agree_on_the_configurations(tiny_models_dir, tmp_path):
    import os
    import subprocess
    import sys

    probe = tmp_path / "probe"
    callbacks = {"class_path": "tests.ddp_probe.RecordConfigs", "init_args": {"out_dir": str(probe)}}
    args = ["fit", "--config", TINY, "--config", "configs/ddp_cpu.yaml", *_run_args(tmp_path)]
    args += ["--model.model_name", str(tiny_models_dir / "tiny-llama-lm"), "--trainer.max_epochs", "1"]
    args += ["--trainer.callbacks+", json.dumps(callbacks)]
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    done = subprocess.run(
        [sys.executable, "-m", "coalora.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["train_set"] == ranks[1]["train_set"]
    assert ranks[0]["steps"] == ranks[1]["steps"] and len(ranks[0]["steps"]) >= 1
