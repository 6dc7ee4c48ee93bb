"""The search callback under 2-process CPU DDP: every rank trains on the same set, and the scoring is split.

Run as a script (``python tests/test_search_ddp.py ddp ...``) this file is also the job the test launches.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as the DDP script
    sys.path.insert(0, str(REPO))

from callbacks import ParetoConfigSearch
from tests.search_setup import set_hash, tiny_data, tiny_module


@pytest.mark.slow
def test_ddp_ranks_train_on_the_same_set(tiny_models_dir, glue_dir, tmp_path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "COALORA_CACHE": str(tmp_path / "cache"),
    }
    command = [
        sys.executable,
        __file__,
        "ddp",
        str(tiny_models_dir / "tiny-bert"),
        str(glue_dir),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["set"] == ranks[1]["set"]
    assert ranks[0]["archive_f1"] == ranks[1]["archive_f1"]
    assert ranks[0]["generator"] == ranks[1]["generator"]
    assert ranks[0]["size"] > 3  # the search did grow the set beyond the three initial configurations
    # each configuration was scored once, by one rank: the work was split, not repeated
    assert ranks[0]["scored_here"] > 0 and ranks[1]["scored_here"] > 0
    assert ranks[0]["scored_here"] + ranks[1]["scored_here"] == ranks[0]["archive_size"]


def _ddp_job(model: str, glue_dir: str, out: str) -> None:
    """One 2-process CPU DDP epoch; every rank writes what it will train on next."""
    import lightning as L

    import callbacks.pareto_search as pareto_search

    scored: list[int] = []
    score = pareto_search.mean_loss

    def counting(*args):
        scored.append(1)
        return score(*args)

    pareto_search.mean_loss = counting
    module = tiny_module(model)
    callback = ParetoConfigSearch(
        score_batches=2, score_batch_size=16, num_starts=3, max_steps=5, gp_maxiter=30, final_round=True
    )
    run = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out,
        callbacks=[callback],
    )
    run.fit(module, tiny_data(model, Path(glue_dir)))
    result = {
        "set": set_hash(module.train_configs),
        "size": len(module.train_configs),
        "archive_f1": callback.archive.f1.tolist(),
        "generator": hashlib.sha256(callback.generator.get_state().numpy().tobytes()).hexdigest(),
        "scored_here": len(scored),
        "archive_size": len(callback.archive),
    }
    (Path(out) / f"rank{run.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "ddp":
    torch.set_num_threads(1)
    _ddp_job(*sys.argv[2:])
