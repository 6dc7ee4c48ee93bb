"""The allocation is a function of the error table and the budget alone (issue 23, item 7).

The training grid used to be solved with a 2 s HiGHS time limit, so a loaded machine could train on another
set than a quiet one. These tests simulate a machine so slow that any wall-clock limit expires at once, and
check the answers against an independent exact optimum.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from coalora.quant import allocate as allocate_module
from coalora.quant import knapsack
from coalora.quant.allocate import _integer_costs, allocate, allocation_cache_path, cached_allocate
from coalora.quant.knapsack import solve_mckp
from coalora.quant.options import OPTION_SPACE
from coalora.quant.qconfig import ConfigSpace
from coalora.quant.targets import TargetMatrix
from coalora.tasks.configurations import ConfigurationSets
from coalora.tasks.methods import METHODS

#: the budgets the project reports and trains the low-bit regime at
BUDGETS = (2.1, 2.3, 2.5, 2.7, 3.0, 3.5, 4.0)


def _space(blocks: int = 2) -> ConfigSpace:
    """A MiniLM-like block layout at 1/6 scale: four square attention matrices and two 2x FFN ones."""
    shapes = {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64), "up": (128, 64), "down": (64, 128)}
    return ConfigSpace(
        [TargetMatrix(f"layer.{b}.{m}", m, b, *shape) for b in range(blocks) for m, shape in shapes.items()],
        model="synthetic",
    )


def _table(space: ConfigSpace, seed: int = 0) -> np.ndarray:
    """Errors shaped like real ones (numel x 4^-bits) with noise, so that the knapsack is not trivial."""
    bits = np.array([o.storage_bits for o in OPTION_SPACE])
    noise = np.random.default_rng(seed).lognormal(0.0, 0.3, size=(len(space), len(OPTION_SPACE)))
    return space.numel.numpy()[:, None] * 4.0 ** (-bits[None, :]) * noise


def _optimum(errors: np.ndarray, costs: np.ndarray, capacity: float) -> float:
    """Least total error for integer costs, by plain min-plus convolution over every option: the oracle."""
    base = costs.min(axis=1)
    room = int(capacity) - int(base.sum())
    best = np.zeros(room + 1)
    for row_errors, row_costs, cheapest in zip(errors, costs, base, strict=True):
        step = np.full(room + 1, np.inf)
        for error, cost in zip(row_errors, row_costs, strict=True):
            shift = int(cost - cheapest)
            if shift <= room:
                step[shift:] = np.minimum(step[shift:], best[: room + 1 - shift] + error)
        best = step
    return float(best[room])


#: How a loaded machine's clock cuts HiGHS short: before it holds any solution, or at its first one
#: (unproven; then the old solver returned the better of it and the greedy choice).
CUTS = {"before_any_solution": {"time_limit": 1e-9}, "at_the_first_solution": {"mip_rel_gap": 1.0}}


def _slow_machine(monkeypatch, cut: str = "before_any_solution") -> list[dict]:
    """Make HiGHS run as on a machine so loaded that any wall-clock limit it gets runs out early.

    A call without a time limit is left alone. Returns the options of every later HiGHS call, so tests can
    also check that none carried a time limit.
    """
    calls: list[dict] = []
    real = knapsack.milp

    def hurried(*args, **kwargs):
        options = dict(kwargs.get("options") or {})
        calls.append(dict(options))
        if "time_limit" in options:
            options = {**{k: v for k, v in options.items() if k != "time_limit"}, **CUTS[cut]}
        return real(*args, **{**kwargs, "options": options})

    monkeypatch.setattr(knapsack, "milp", hurried)
    return calls


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_training_grid_is_the_unhurried_optimum_on_a_slow_machine(cut, tmp_path, monkeypatch):
    """The set a run trains on is what a quiet machine allocates, and each member is the exact optimum."""
    monkeypatch.setenv("COALORA_CACHE", str(tmp_path / "cache"))
    space = _space()
    table = _table(space)
    quiet = [allocate(space, table, b) for b in BUDGETS]

    calls = _slow_machine(monkeypatch, cut)
    sets = ConfigurationSets(
        space, METHODS["coalora"], lambda: table, eval_budgets=[3.0], train_budgets=BUDGETS
    )
    assert sets.train == list(dict.fromkeys(quiet))
    assert not any("time_limit" in options for options in calls)

    costs, _ = _integer_costs(space, OPTION_SPACE, 3.0)
    rows = np.arange(len(space))
    column = {o: k for k, o in enumerate(OPTION_SPACE)}
    for budget, config in zip(BUDGETS, quiet, strict=True):
        choice = [column[config.matrices[n]] for n in space.names]
        _, capacity = _integer_costs(space, OPTION_SPACE, budget)
        assert costs[rows, choice].sum() <= capacity
        assert table[rows, choice].sum() == pytest.approx(_optimum(table, costs, capacity), rel=1e-12)


def test_highs_is_never_given_a_clock(monkeypatch):
    """Problems too large for the dynamic program go to HiGHS: to its gap, never to a time limit."""
    calls = _slow_machine(monkeypatch)
    monkeypatch.setattr(knapsack, "DP_MAX_WORK", 0)  # every problem takes the HiGHS path
    space = _space(blocks=6)  # 36 matrices x 432 options, as MiniLM
    table = _table(space, seed=1)
    rows = np.arange(len(space))
    for budget in (2.5, 3.0):
        costs, capacity = _integer_costs(space, OPTION_SPACE, budget)
        choice = solve_mckp(table, costs, capacity)
        assert costs[rows, choice].sum() <= capacity
        exact = _optimum(table, costs, capacity)
        assert exact * (1 - 1e-12) <= table[rows, choice].sum() <= exact * (1 + knapsack.MIP_REL_GAP)
    assert calls and not any("time_limit" in options for options in calls)


@pytest.mark.parametrize("seed", range(3))
def test_dynamic_program_is_exact_on_minilm_shaped_rows(seed):
    """Every budget the project uses, on all 432 options per matrix: the oracle's optimum, within budget."""
    space = _space(blocks=1)
    table = _table(space, seed=seed)
    rows = np.arange(len(space))
    for budget in BUDGETS:
        costs, capacity = _integer_costs(space, OPTION_SPACE, budget)
        choice = solve_mckp(table, costs, capacity)
        assert costs[rows, choice].sum() <= capacity
        assert table[rows, choice].sum() == pytest.approx(_optimum(table, costs, capacity), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_near_ties_are_resolved_exactly(seed):
    """Options that differ by far less than HiGHS's gap (tiny random models): still the true optimum."""
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 20, size=(4, 6)).astype(float)
    errors = 100.0 - costs + rng.uniform(0.0, 1e-4, size=costs.shape)  # 4e-7 of the total apart
    rows = np.arange(4)
    low, high = costs.min(axis=1).sum(), costs.max(axis=1).sum()
    for fraction in (0.2, 0.5, 0.8):
        capacity = float(np.floor(low + fraction * (high - low)))
        choice = solve_mckp(errors, costs, capacity)
        best = min(
            errors[rows, list(c)].sum()
            for c in itertools.product(range(6), repeat=4)
            if costs[rows, list(c)].sum() <= capacity
        )
        assert costs[rows, choice].sum() <= capacity
        assert errors[rows, choice].sum() == pytest.approx(best, rel=1e-14, abs=0)


def test_allocation_cache_is_keyed_by_table_and_solver(tmp_path, monkeypatch):
    space = _space(blocks=1)
    table = _table(space)
    config = cached_allocate(space, table, 3.0, cache_dir=tmp_path)
    path = allocation_cache_path(space, table, 3.0, cache_dir=tmp_path)
    assert path.is_file() and knapsack.SOLVER_ID in path.name

    def fail(*args, **kwargs):
        raise AssertionError("solved again instead of reading the cache")

    monkeypatch.setattr(allocate_module, "allocate", fail)
    assert cached_allocate(space, table, 3.0, cache_dir=tmp_path) == config

    nudged = table.copy()
    nudged[0, 0] = np.nextafter(nudged[0, 0], np.inf)
    renamed = ConfigSpace(
        [TargetMatrix(t.name + "x", t.module_type, 0, t.out_features, t.in_features) for t in space.targets]
    )
    paths = {
        path,
        allocation_cache_path(space, nudged, 3.0, cache_dir=tmp_path),
        allocation_cache_path(renamed, table, 3.0, cache_dir=tmp_path),
        allocation_cache_path(space, table, 3.1, cache_dir=tmp_path),
    }
    monkeypatch.setattr(allocate_module, "SOLVER_ID", "another-solver")
    paths.add(allocation_cache_path(space, table, 3.0, cache_dir=tmp_path))
    assert len(paths) == 5
