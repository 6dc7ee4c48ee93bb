"""The low-bit regime's bar arithmetic (issue #11): the closing note's figures come from ``bars()``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lowbit_regime


def _rows(method: str, seed: int, budget: float, random: float) -> list[dict]:
    """One seed of one method: the same accuracy at every budget, another at every random configuration."""
    rows = [
        {"method": method, "seed": seed, "label": str(b), "kind": "budget", "accuracy": budget}
        for b in lowbit_regime.BUDGETS
    ]
    rows += [
        {"method": method, "seed": seed, "label": f"random-{i:02d}", "kind": "random", "accuracy": random}
        for i in range(3)
    ]
    return rows


def test_bars_are_differences_of_per_seed_means_over_shared_seeds() -> None:
    rows = []
    for seed, (search, off) in {42: (0.82, 0.80), 43: (0.81, 0.80), 44: (0.79, 0.80)}.items():
        rows += _rows("coalora-search", seed, budget=search, random=search)
        rows += _rows("search-mapper-off", seed, budget=off, random=off)
        rows += _rows("qlora", seed, budget=0.80, random=0.0)
    rows += _rows("search-mapper-off", 45, budget=0.0, random=0.0)  # a seed the default lacks: ignored
    bar = lowbit_regime.bars(rows)
    mean, std = bar["search_mapper_gain_random_points"]
    assert mean == pytest.approx(2 / 3) and std == pytest.approx(1.5275, abs=1e-4)
    assert bar["bar_mapper_random_met"] is False  # +0.67 < +1.0
    assert bar["bar_mapper_every_budget_met"] is True
    assert bar["gap_to_qlora_points"][0] == pytest.approx(2 / 3)
    assert bar["bar_qlora_met"] is True
    assert "search_minus_frozen_random_points" not in bar  # no coalora-frozen rows, no figure


def test_the_search_against_the_frozen_sets_mapper_off_run_is_not_called_a_mapper_gain() -> None:
    rows = []
    for seed in (42, 43, 44):
        rows += _rows("coalora-search", seed, budget=0.82, random=0.82)
        rows += _rows("shared-trainset", seed, budget=0.79, random=0.79)  # another training set
    bar = lowbit_regime.bars(rows)
    assert bar["search_vs_frozen_mapper_off_random_points"][0] == pytest.approx(3.0)
    assert bar["search_vs_frozen_mapper_off_per_budget_points"]["2.1"][0] == pytest.approx(3.0)
    assert bar["variant_vs_frozen_mapper_off_random_points"] == {"coalora-search": pytest.approx((3.0, 0.0))}
    assert not any("mapper_gain" in key for key in bar)  # the search's own control has no rows
    assert "bar_mapper_random_met" not in bar and "bar_mapper_every_budget_met" not in bar
    assert "search-mapper-off" in bar["bar_mapper_not_measured"]


def test_the_bar_for_the_mapper_uses_the_searchs_own_control_only() -> None:
    rows = []
    for seed in (42, 43):
        rows += _rows("coalora-search", seed, budget=0.80, random=0.80)
        rows += _rows("search-mapper-off", seed, budget=0.81, random=0.80)
        rows += _rows("shared-trainset", seed, budget=0.70, random=0.70)  # +10 points: not the mapper's
    bar = lowbit_regime.bars(rows)
    assert bar["search_mapper_gain_random_points"][0] == pytest.approx(0.0)
    assert bar["search_mapper_gain_budgets_points"][0] == pytest.approx(-1.0)
    assert bar["bar_mapper_random_met"] is False and bar["bar_mapper_every_budget_met"] is False
    assert bar["search_vs_frozen_mapper_off_random_points"][0] == pytest.approx(10.0)


def test_every_mapper_gain_comes_from_a_run_and_its_exact_control() -> None:
    accuracy = {"coalora-frozen": 0.81, "coalora-mapper-lr": 0.78, "coalora-search": 0.79}
    methods = dict.fromkeys(name.split("@")[0] for name, _ in lowbit_regime.planned_runs())
    rows = []
    for seed in (42, 43, 44):
        for method in methods:
            value = accuracy.get(method, 0.80)
            rows += _rows(method, seed, budget=value, random=value)
    bar = lowbit_regime.bars(rows)
    prefixes = tuple(f"{prefix}_mapper_gain_" for prefix in lowbit_regime.MAPPER_CONTROLS)
    gains = [key for key in bar if "mapper_gain" in key]
    assert gains and all(key.startswith(prefixes) for key in gains)
    assert bar["frozen_mapper_gain_random_points"][0] == pytest.approx(1.0)  # against shared-trainset
    assert bar["mapper_lr_mapper_gain_random_points"][0] == pytest.approx(-2.0)  # the same control
    assert bar["search_mapper_gain_random_points"][0] == pytest.approx(-1.0)  # against search-mapper-off


def test_the_sandwich_control_isolates_the_mapper_inside_the_sandwich() -> None:
    rows = []
    for seed in (42, 43):
        rows += _rows("shared-trainset", seed, budget=0.78, random=0.78)
        rows += _rows("coalora-sandwich", seed, budget=0.81, random=0.80)
        rows += _rows("sandwich-mapper-off", seed, budget=0.815, random=0.80)
    bar = lowbit_regime.bars(rows)
    assert bar["variant_vs_frozen_mapper_off_random_points"]["coalora-sandwich"][0] == pytest.approx(2.0)
    assert bar["sandwich_mapper_gain_random_points"][0] == pytest.approx(0.0)
    assert bar["sandwich_mapper_gain_budgets_points"][0] == pytest.approx(-0.5)


def test_the_plan_has_the_sandwich_control_with_the_mapper_off() -> None:
    plan = dict(lowbit_regime.planned_runs())
    on, off = plan["coalora-sandwich"], plan["sandwich-mapper-off"]
    assert off[: len(on) - 4] == on[: len(on) - 4]  # the same config and sandwich flags
    assert "--model.use_mapper" in off and "--model.use_mapper" not in on


def test_every_mapper_control_differs_from_its_run_only_in_the_mapper_switch() -> None:
    plan = dict(lowbit_regime.planned_runs())
    for on, off in lowbit_regime.MAPPER_CONTROLS.values():
        flags = _without_mapper_only_flags(plan[on])
        assert plan[off] == [*flags[:-4], "--model.use_mapper", "false", *flags[-4:]]
    assert {"search-mapper-off", "random-mapper-off"} <= set(plan)  # the default's control is planned
    k4 = plan["coalora-k4"]
    assert k4[k4.index("--model.configs_per_step") + 1] == "4"
    assert k4[k4.index("--trainer.precision") + 1] == "32-true"  # both runs of the pair in fp32


def test_the_k4_control_is_reported_against_its_own_mapper_off_run() -> None:
    rows = []
    for seed in (42, 43, 44):
        rows += _rows("coalora-k4", seed, budget=0.80 + 0.01 * (seed - 42), random=0.81)
        rows += _rows("k4-mapper-off", seed, budget=0.80, random=0.79)
    bar = lowbit_regime.bars(rows)
    assert bar["k4_mapper_gain_random_points"] == pytest.approx((2.0, 0.0))
    assert bar["k4_mapper_gain_budgets_points"][0] == pytest.approx(1.0)
    assert bar["k4_mapper_gain_budgets_points"][1] == pytest.approx(1.0)


def test_fp32_runs_are_not_set_against_the_bf16_ablation() -> None:
    rows = []
    for seed in (42, 43, 44):
        rows += _rows("coalora-k4", seed, budget=0.80, random=0.81)
        rows += _rows("coalora-frozen", seed, budget=0.80, random=0.80)
        rows += _rows("shared-trainset", seed, budget=0.80, random=0.79)
    by_variant = lowbit_regime.bars(rows)["variant_vs_frozen_mapper_off_random_points"]
    assert set(by_variant) == {"coalora-frozen"}  # coalora-k4 has its own fp32 control


def _without_mapper_only_flags(flags: list[str]) -> list[str]:
    """``flags`` less those that act on the mapper's parameters alone (meaningless with it off)."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in lowbit_regime.MAPPER_ONLY_FLAGS:
            skip = True
        else:
            out.append(flag)
    return out
