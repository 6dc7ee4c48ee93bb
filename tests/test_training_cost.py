"""The arithmetic that turns bench_training_cost.py's measurements into the totals docs/results.md quotes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_training_cost as cost


def _measured() -> dict:
    """Round numbers: 1 s a QLoRA step, 2 s a CoA-LoRA step, one-time costs easy to add by hand."""
    return {
        "process_start_s": 5.0,
        "one_time_s": {
            "build_s": 1.0,
            "error_table_s": 30.0,
            "qlora_allocation_s": {"2.1": 1.0, "3.0": 2.0},
            "grid_allocation_s": 40.0,
            "coalora_first_quantize_s": 20.0,
            "qlora_first_quantize_s": 0.5,
        },
        "steps": {"median_s": {"qlora_k1": 1.0, "coalora_k2": 2.0}},
        "search_round": {
            "configs_scored": 52,
            "new_configs": 2,
            "score_s_per_config": 1.0,
            "propose_and_rest_s": 4.0,
        },
    }


def test_the_low_bit_regime_runs_100_steps_and_3_rounds() -> None:
    assert cost.lowbit_steps() == 100  # 3,200 sentences, batch 32, one epoch
    assert cost.lowbit_rounds() == 3  # every 25 steps, none after the last
    assert cost.PAPER_STEPS == 418  # 2 epochs of 6,664 sentences in batches of 32


def test_totals_count_the_error_table_once_and_every_run_its_own_costs() -> None:
    out = cost.totals(_measured(), steps=100, rounds=3, budgets=(2.1, 3.0))
    qlora = 30 + 2 * (100 * 1.0 + 6.0 + 0.5) + 1.0 + 2.0  # table once; steps, start, quantize, allocation
    assert out["qlora_min"] == pytest.approx(qlora / 60, abs=0.01)
    fixed = 6.0 + 30 + 40 + 20
    search_rounds = (52 + 54 + 56) * 1.0 + 3 * 4.0  # the archive grows by 2 a round and is rescored
    assert out["coalora_search_rounds_min"] == pytest.approx(search_rounds / 60, abs=0.01)
    assert out["coalora_frozen_rounds_min"] == pytest.approx(3 * 50 / 60, abs=0.01)
    assert out["coalora_search_over_qlora"] == pytest.approx((fixed + 200 + search_rounds) / qlora, abs=1e-3)
    assert out["steps_only_ratio"] == pytest.approx(200 / 200)
