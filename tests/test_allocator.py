"""The budget allocator (SPEC §2.5): error tables, their cache, the knapsack solver, Fisher and the CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch

from coalora.commands import allocate as allocate_command
from coalora.errors import CoaloraError
from coalora.pretrained import DEFAULT_MODEL, load_classifier
from coalora.quant import allocate as allocate_module
from coalora.quant import error_table as error_table_module
from coalora.quant.allocate import (
    EVAL_BUDGETS,
    allocate,
    allocate_for_model,
    budget_grid,
    budget_range,
    total_error,
)
from coalora.quant.error_table import cached_error_table, error_table, table_cache_path
from coalora.quant.fisher import empirical_fisher, mask_tokens
from coalora.quant.knapsack import pareto_options, solve_mckp
from coalora.quant.options import BITS_CHOICES, OPTION_SPACE, QuantOption
from coalora.quant.qconfig import ConfigSpace
from coalora.quant.quantizer import fake_quantize
from coalora.quant.targets import discover_targets, target_weights
from coalora.utils import default_cache_dir, quiet_transformers


def _brute_force(errors: np.ndarray, costs: np.ndarray, capacity: float) -> float:
    """Least total error over every feasible choice (tiny instances only)."""
    best = math.inf
    rows = np.arange(len(errors))
    for choice in itertools.product(range(errors.shape[1]), repeat=len(errors)):
        if costs[rows, choice].sum() <= capacity:
            best = min(best, errors[rows, choice].sum())
    return best


def _instance(seed: int, n: int = 4, k: int = 6, integral: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 20, size=(n, k)).astype(float) if integral else rng.uniform(1, 20, size=(n, k))
    errors = rng.uniform(0, 10, size=(n, k)) / costs  # dearer tends to be better, with plenty of noise
    return errors, costs


# ---------------------------------------------------------------------------------------------- solver


@pytest.mark.parametrize("integral", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_solver_matches_brute_force(seed, integral):
    errors, costs = _instance(seed, integral=integral)
    low, high = costs.min(axis=1).sum(), costs.max(axis=1).sum()
    for fraction in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        capacity = low + fraction * (high - low)
        choice = solve_mckp(errors, costs, capacity)
        rows = np.arange(len(errors))
        assert costs[rows, choice].sum() <= capacity
        assert errors[rows, choice].sum() == pytest.approx(_brute_force(errors, costs, capacity), rel=1e-9)


def test_solver_never_exceeds_capacity_on_larger_instances():
    for seed in range(5):
        errors, costs = _instance(100 + seed, n=30, k=40)
        rows = np.arange(30)
        for capacity in np.linspace(costs.min(axis=1).sum(), costs.max(axis=1).sum(), 7):
            choice = solve_mckp(errors, costs, float(capacity))
            assert costs[rows, choice].sum() <= capacity


def test_dominated_options_are_dropped_and_the_optimum_kept():
    errors = np.array([5.0, 4.0, 4.0, 6.0, 1.0, 3.0])
    costs = np.array([1.0, 2.0, 2.0, 2.0, 5.0, 5.0])
    # 2 ties with 1 (lower index kept), 3 errs more than 1 at the same cost, 5 errs more than 4 at equal cost
    assert pareto_options(errors, costs) == [0, 1, 4]
    base_errors, base_costs = _instance(7)
    # append to every matrix a dominated copy of each option: dearer and worse
    errors2 = np.concatenate([base_errors, base_errors + 0.5], axis=1)
    costs2 = np.concatenate([base_costs, base_costs + 0.5], axis=1)
    rows = np.arange(len(base_errors))
    for capacity in (25.0, 40.0, 55.0):
        choice = solve_mckp(errors2, costs2, capacity)
        assert all(j < base_errors.shape[1] for j in choice)
        assert errors2[rows, choice].sum() == pytest.approx(_brute_force(base_errors, base_costs, capacity))


def test_solver_rejects_impossible_capacity():
    errors, costs = _instance(0)
    with pytest.raises(CoaloraError, match="below the cheapest"):
        solve_mckp(errors, costs, costs.min(axis=1).sum() - 1)


def test_budget_grid_and_eval_budgets():
    grid = budget_grid()
    assert len(grid) == 50 and grid[0] == 2.25 and grid[1] == 2.35 and grid[-1] == 7.15
    assert not set(grid) & set(EVAL_BUDGETS)
    assert EVAL_BUDGETS == (2.5, 3.0, 3.5, 4.0)


# ------------------------------------------------------------------------------------------ error table


def _reference_table(weights, options, fisher=None, family="nf") -> torch.Tensor:
    rows = []
    for name, w in weights.items():
        f = torch.ones_like(w) if fisher is None else fisher[name]
        rows.append([float((f * (w - fake_quantize(w, o, family)).square()).double().sum()) for o in options])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("family", ["nf", "int"])
def test_error_table_equals_fake_quantize_errors(family):
    gen = torch.Generator().manual_seed(0)
    odd = torch.randn(37, 29, generator=gen)  # not a multiple of any block size: padded tail
    dead = torch.randn(64, 64, generator=gen)
    dead.view(-1)[:64] = 0  # an all-zero block makes the scale offset 0 ...
    dead.view(-1)[64:256] *= 1e-4  # ... so these blocks' scales quantize to 0 at low scale bits
    weights = {"odd": odd, "dead": dead}
    fisher = {n: torch.rand(w.shape, generator=gen) for n, w in weights.items()}
    options = [*OPTION_SPACE[::11], QuantOption(2, 2, "bf16", 16, 16), QuantOption(8, 8, "fp32", 64, 256)]
    for f in (None, fisher):
        table = error_table(weights, options, f, family)
        assert table.dtype == torch.float64 and table.shape == (2, len(options))
        torch.testing.assert_close(table, _reference_table(weights, options, f, family), rtol=2e-5, atol=1e-9)


def test_error_table_falls_as_bits_rise():
    weights = {"w": torch.randn(256, 128, generator=torch.Generator().manual_seed(1))}
    options = [QuantOption(bits, 8, "fp32", 64, 256) for bits in BITS_CHOICES]
    row = error_table(weights, options)[0]
    assert all(a > b for a, b in itertools.pairwise(row.tolist()))
    assert row[-1] < row[0] * 1e-3


def test_error_table_rejects_a_mismatched_fisher():
    weights = {"w": torch.randn(8, 16)}
    with pytest.raises(CoaloraError, match="no entry"):
        error_table(weights, OPTION_SPACE[:2], fisher={})
    with pytest.raises(CoaloraError, match="shape"):
        error_table(weights, OPTION_SPACE[:2], fisher={"w": torch.ones(16, 8)})


def test_cache_round_trip(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(32, 64, generator=gen), "b": torch.randn(16, 64, generator=gen)}
    options = OPTION_SPACE[::40]
    first = cached_error_table(weights, options, cache_dir=tmp_path)
    path = table_cache_path(weights, options, cache_dir=tmp_path)
    assert path.is_file() and list(tmp_path.iterdir()) == [path]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(error_table_module, "error_table", fail)
    torch.testing.assert_close(cached_error_table(weights, options, cache_dir=tmp_path), first)
    reordered = {"b": weights["b"], "a": weights["a"]}  # same key, rows follow the caller's order
    torch.testing.assert_close(cached_error_table(reordered, options, cache_dir=tmp_path), first.flip(0))

    changed = {"a": weights["a"] * 1.01, "b": weights["b"]}
    fisher = {n: torch.ones_like(w) for n, w in weights.items()}
    keys = {
        path,
        table_cache_path(changed, options, cache_dir=tmp_path),
        table_cache_path(weights, options, fisher=fisher, cache_dir=tmp_path),
        table_cache_path(weights, options, family="int", cache_dir=tmp_path),
        table_cache_path(weights, OPTION_SPACE[::41], cache_dir=tmp_path),
    }
    assert len(keys) == 5


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COALORA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


# ------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    with quiet_transformers():
        model = load_classifier(DEFAULT_MODEL, num_labels=2)
    targets = discover_targets(model)
    return targets, target_weights(model, targets)


@pytest.fixture(scope="module")
def minilm_subset(minilm, tmp_path_factory):
    """Three MiniLM matrices (query, key and FFN-in of block 0) and their cached plain error table."""
    targets, weights = minilm
    subset = [
        t
        for t in targets
        if t.block_index == 0
        and t.module_type in ("attention.self.query", "attention.self.key", "intermediate.dense")
    ]
    space = ConfigSpace(subset, model=DEFAULT_MODEL)
    table = cached_error_table(
        {t.name: weights[t.name] for t in subset}, cache_dir=tmp_path_factory.mktemp("c")
    )
    return space, table


def _check_allocations(space: ConfigSpace, table: torch.Tensor) -> None:
    for budget in EVAL_BUDGETS:
        config = allocate(space, table, budget)
        avg = space.avg_bits(config)
        assert budget - 0.02 <= avg <= budget, (budget, avg)


def test_minilm_subset_allocations_meet_the_budget(minilm_subset):
    _check_allocations(*minilm_subset)


def test_more_bits_never_err_more(minilm_subset):
    space, table = minilm_subset
    totals = [total_error(space, table, allocate(space, table, b)) for b in EVAL_BUDGETS]
    assert all(a > b for a, b in itertools.pairwise(totals))


def test_budget_out_of_range(minilm_subset):
    space, table = minilm_subset
    low, high = budget_range()
    assert low == pytest.approx(2.0322265625) and high == 8.625
    for budget in (1.5, low - 1e-6, high + 1e-6, 9.0, float("nan")):
        with pytest.raises(CoaloraError, match=r"outside the achievable range 2\.0323\.\.8\.6250 bits"):
            allocate(space, table, budget)
    assert space.avg_bits(allocate(space, table, low)) == low
    assert space.avg_bits(allocate(space, table, high)) <= high  # least error need not be dearest


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("full")


@pytest.mark.slow
def test_full_minilm_allocations_meet_the_budget(minilm, full_cache):
    targets, weights = minilm
    table = cached_error_table(weights, cache_dir=full_cache)
    assert table.shape == (36, 432)
    _check_allocations(ConfigSpace(targets, model=DEFAULT_MODEL), table)
    results = allocate_for_model(DEFAULT_MODEL, [3.0, 4.0], cache_dir=full_cache)  # cached table
    assert [round(avg, 4) for _, avg in results] == [3.0, 4.0]
    assert all(len(config.matrices) == 36 for config, _ in results)


# ---------------------------------------------------------------------------------------------- Fisher


def test_mask_tokens_masks_only_eligible_tokens_and_every_row():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (64, 40), generator=gen)
    eligible = torch.ones_like(ids, dtype=torch.bool)
    eligible[:, 0] = eligible[:, -5:] = False  # specials and padding
    eligible[0, 1:] = False
    eligible[0, 1] = True  # a one-token text
    inputs, labels = mask_tokens(ids, eligible, mask_id=3, generator=gen)
    chosen = labels != -100
    assert not (chosen & ~eligible).any() and chosen.any(dim=1).all()
    assert torch.equal(inputs[chosen], torch.full_like(inputs[chosen], 3))
    assert torch.equal(inputs[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    assert 0.10 < chosen.float().sum() / eligible.sum() < 0.20


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama"])
def test_fisher_covers_every_target_matrix(tiny_models_dir, kind):
    name = str(tiny_models_dir / f"tiny-{kind}")
    with quiet_transformers():
        targets = discover_targets(load_classifier(name, num_labels=2))
    texts = ["a gripping , funny and moving film", "the plot is thin", "", "one of the best movies"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fisher = empirical_fisher(name, texts, targets, num_samples=3, batch_size=2)
    assert any("freshly initialised" in str(w.message) for w in caught)  # tiny models have no LM head
    assert list(fisher) == [t.name for t in targets]
    for t in targets:
        f = fisher[t.name]
        assert f.shape == (t.out_features, t.in_features) and f.dtype == torch.float32
        assert torch.isfinite(f).all() and (f >= 0).all() and f.sum() > 0


def test_fisher_is_cached(tiny_models_dir, tmp_path, monkeypatch):
    from coalora.quant import fisher as fisher_module

    name = str(tiny_models_dir / "tiny-bert")
    with quiet_transformers():
        model = load_classifier(name, num_labels=2)
    targets = discover_targets(model)
    weights = target_weights(model, targets)
    texts = ["a gripping , funny and moving film", "the plot is thin"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = fisher_module.cached_fisher(name, texts, targets, weights, tmp_path, num_samples=2)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(fisher_module, "empirical_fisher", fail)
    again = fisher_module.cached_fisher(name, texts, targets, weights, tmp_path, num_samples=2)
    assert all(torch.equal(first[n], again[n]) for n in first)
    with pytest.raises(AssertionError, match="recomputed"):  # other texts: another key
        fisher_module.cached_fisher(name, [*texts, "more"], targets, weights, tmp_path, num_samples=2)


def test_fisher_needs_text(tiny_models_dir):
    with pytest.raises(CoaloraError, match="no text"):
        empirical_fisher(str(tiny_models_dir / "tiny-bert"), ["", "  "], [])


# ------------------------------------------------------------------------------------------------- CLI


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    allocate_command.add_arguments(parser)
    argv = ["--budget", *[str(b) for b in overrides.pop("budget", [3.0])]]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_cli_writes_qconfig_files_and_prints_the_table(minilm_subset, monkeypatch, tmp_path, capsys):
    space, table = minilm_subset
    monkeypatch.setattr(allocate_module, "model_error_table", lambda *args, **kwargs: (space, table))
    assert allocate_command.run(_args(budget=[2.5, 3.0], out_dir=tmp_path / "cfgs")) == 0
    out = capsys.readouterr().out
    assert "avg_bits" in out and "total_error" in out and "2b  3b  4b  8b" in out
    for budget in (2.5, 3.0):
        path = tmp_path / "cfgs" / f"{budget}bits.json"
        config = space.load(path)
        assert json.loads(path.read_text())["avg_bits"] == pytest.approx(space.avg_bits(config))
        assert space.avg_bits(config) <= budget
        assert f"{budget:.3f}" in out and str(path) in out

    assert allocate_command.run(_args(budget=[3.5], out=tmp_path / "one.json")) == 0
    assert space.avg_bits(space.load(tmp_path / "one.json")) <= 3.5


def test_cli_one_line_errors(tmp_path):
    with pytest.raises(CoaloraError, match="--out takes one budget"):
        allocate_command.run(_args(budget=[3.0, 3.5], out=tmp_path / "x.json"))
    with pytest.raises(CoaloraError, match="outside the achievable range"):
        allocate_command.run(_args(budget=[1.0]))
    with pytest.raises(CoaloraError, match="--glue-dir only matters"):
        allocate_command.run(_args(glue_dir=tmp_path))


@pytest.mark.slow
def test_cli_end_to_end_on_minilm(tmp_path, full_cache, capsys):
    """Runs after the full-table test, whose cached table it reuses."""
    from coalora.cli import main

    out_dir = tmp_path / "cfgs"
    argv = ["allocate", "--budget", "3.0", "4.0", "--out-dir", str(out_dir), "--cache-dir", str(full_cache)]
    assert main(argv) == 0
    with quiet_transformers():
        space = ConfigSpace(
            discover_targets(load_classifier(DEFAULT_MODEL, num_labels=2)), model=DEFAULT_MODEL
        )
    for budget in (3.0, 4.0):
        assert space.avg_bits(space.load(out_dir / f"{budget}bits.json")) <= budget
    assert "36 matrices" in capsys.readouterr().out
