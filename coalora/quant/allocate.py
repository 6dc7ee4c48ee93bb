"""From a bit budget to a configuration (SPEC §2.5): the error table's least-error choice within the budget.

Costs are bits(c) * numel_i per matrix; :mod:`coalora.quant.knapsack` solves the choice exactly (or to a
fixed relative gap), never against the clock. Allocations are remembered on disk per (error table, budget,
solver), so a run allocates its training grid once.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coalora.errors import CoaloraError
from coalora.quant.error_table import cached_error_table
from coalora.quant.families import get_family
from coalora.quant.knapsack import SOLVER_ID, mask_options, solve_mckp
from coalora.quant.options import OPTION_SPACE
from coalora.quant.qconfig import ConfigSpace, QConfig
from coalora.utils import default_cache_dir

#: The paper's evaluation budgets; none of them is on the default training grid.
EVAL_BUDGETS: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0)


def budget_grid(start: float = 2.25, stop: float = 7.15, step: float = 0.10) -> list[float]:
    """Budgets from ``start`` to ``stop`` inclusive, rounded so that 2.35 is 2.35, not 2.3500000000000001."""
    if step <= 0 or stop < start:
        raise CoaloraError(f"budget grid needs step > 0 and stop >= start; got {start}..{stop} step {step}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    return [round(start + i * step, 10) for i in range(count)]


def option_costs(space: ConfigSpace, options: Sequence[Any] = OPTION_SPACE) -> np.ndarray:
    """(N, K) storage bits of every option on every matrix: bits(option) * numel."""
    bits = np.array([o.storage_bits for o in options], dtype=np.float64)
    return space.numel.numpy()[:, None] * bits[None, :]


def budget_range(options: Sequence[Any] = OPTION_SPACE) -> tuple[float, float]:
    """Cheapest and dearest achievable avg_bits (every matrix at the cheapest or dearest option)."""
    bits = [o.storage_bits for o in options]
    return min(bits), max(bits)


def check_budget(budget_bits: float, options: Sequence[Any] = OPTION_SPACE) -> None:
    """Raise a one-line error when no configuration can meet ``budget_bits`` or it exceeds the dearest one."""
    low, high = budget_range(options)
    if not low <= budget_bits <= high:
        raise CoaloraError(
            f"budget {budget_bits:g} bits is outside the achievable range "
            f"{math.ceil(low * 1e4) / 1e4:.4f}..{math.floor(high * 1e4) / 1e4:.4f} bits; choose one inside it"
        )


def check_space_budget(space: ConfigSpace, budget_bits: float) -> None:
    """:func:`check_budget` for this backbone: the range its targets' allowed options span (for ``gguf``,
    rows that K-quants cannot tile raise the cheapest mix)."""
    if bool(space.option_mask.all()):
        check_budget(budget_bits, space.family.option_space)
        return
    low, high = space.budget_range()
    if not low <= budget_bits <= high:
        raise CoaloraError(
            f"budget {budget_bits:g} bits is outside what {space.family_name} options reach on this model "
            f"({math.ceil(low * 1e4) / 1e4:.4f}..{math.floor(high * 1e4) / 1e4:.4f} bits); "
            "choose one inside it"
        )


def reachable_budgets(space: ConfigSpace, budgets: Sequence[float]) -> list[float]:
    """The default ``budgets`` this backbone's options reach (all of them for ``nf``/``int``)."""
    if bool(space.option_mask.all()):
        return list(budgets)
    low, high = space.budget_range()
    return [b for b in budgets if low <= b <= high]


def allocate(
    space: ConfigSpace,
    errors: torch.Tensor | np.ndarray,
    budget_bits: float,
    options: Sequence[Any] | None = None,
) -> QConfig:
    """The configuration with least total error whose avg_bits does not exceed ``budget_bits``.

    ``options``: the table's columns (default: the space's family's option space). An option a target's
    rows do not allow (+inf in the table, or refused by :attr:`ConfigSpace.option_mask`) is never chosen.
    The answer depends only on the table and the budget, not on how long the solve took: the training
    grid, the evaluation budgets and every machine get the same configurations.
    """
    options = space.family.option_space if options is None else options
    check_budget(budget_bits, options)
    errors = np.asarray(errors, dtype=np.float64)
    if errors.shape != (len(space), len(options)):
        raise CoaloraError(
            f"error table is {errors.shape}, expected ({len(space)}, {len(options)}); "
            "recompute it for this model"
        )
    costs, capacity = _integer_costs(space, options, budget_bits)
    allowed = np.isfinite(errors) & _allowed(space, options)
    if not allowed.all():
        check_space_budget(space, budget_bits)
        errors, costs = mask_options(errors, costs, allowed)
    choice = solve_mckp(errors, costs, capacity)
    if not all(allowed[i, j] for i, j in enumerate(choice)):  # cannot happen: masked options are dominated
        raise CoaloraError("the allocator chose an option a matrix does not allow; please report this")
    return space.make(options[j] for j in choice)


def _allowed(space: ConfigSpace, options: Sequence[Any]) -> np.ndarray:
    """(N, K) whether each of ``options`` fits each target's rows."""
    if list(options) == list(space.family.option_space):
        return space.option_mask.numpy()
    return np.array(
        [[space.family.allowed(o, t.in_features) for o in options] for t in space.targets], dtype=bool
    ).reshape(len(space), len(options))


def cached_allocate(
    space: ConfigSpace,
    errors: torch.Tensor | np.ndarray,
    budget_bits: float,
    cache_dir: str | os.PathLike | None = None,
) -> QConfig:
    """:func:`allocate`, remembered on disk per (error table, budget, solver): a run allocates its grid once.

    The key hashes the table's shape and values and the matrix names, and names the solver
    (:data:`~coalora.quant.knapsack.SOLVER_ID`), so an entry that another table or solver wrote is never
    served (entries of the old time-limited solver, keyed without it, are ignored)."""
    path = allocation_cache_path(space, errors, budget_bits, cache_dir)
    if path.is_file():
        try:
            return space.validate(QConfig.load(path, space.family_name))
        except CoaloraError:
            pass  # a stale or damaged entry: recompute it
    config = allocate(space, errors, budget_bits)
    space.save(config, path)
    return config


def allocation_cache_path(
    space: ConfigSpace,
    errors: torch.Tensor | np.ndarray,
    budget_bits: float,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where :func:`cached_allocate` keeps the configuration for this table, budget and solver."""
    table = np.ascontiguousarray(np.asarray(errors, dtype=np.float64))
    key = f"{table.shape}|{'|'.join(space.names)}".encode()
    digest = hashlib.sha256(table.tobytes() + key).hexdigest()[:16]
    name = f"{digest}-{budget_bits:.4f}-{SOLVER_ID}.json"
    return Path(cache_dir or default_cache_dir()) / "allocations" / name


def _integer_costs(
    space: ConfigSpace, options: Sequence[Any], budget_bits: float
) -> tuple[np.ndarray, float]:
    """Costs in exact integer units (1/1024 bit per gcd-of-sizes weights) when the options allow, else bits.

    Every option of the paper's space costs a multiple of 1/1024 bit per weight, so the knapsack can be
    solved in integers, where no solver tolerance can let a choice creep over the budget.
    """
    units = np.array([o.storage_bits * 1024 for o in options], dtype=np.float64)
    if not np.array_equal(units, np.rint(units)):
        return option_costs(space, options), budget_bits * space.total_numel
    sizes = [t.numel for t in space.targets]
    common = math.gcd(*sizes)
    counts = np.array([n // common for n in sizes], dtype=np.float64)
    return counts[:, None] * units[None, :], budget_bits * 1024 * (space.total_numel // common)


def total_error(
    space: ConfigSpace, errors: torch.Tensor, config: QConfig, options: Sequence[Any] | None = None
) -> float:
    """Sum of the table's errors for the options ``config`` chose (``options``: the table's columns,
    default the space's family's option space)."""
    options = space.family.option_space if options is None else options
    column = {o: k for k, o in enumerate(options)}
    return float(sum(errors[i, column[config.matrices[n]]] for i, n in enumerate(space.names)))


def model_error_table(
    model_name: str,
    texts: list[str] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
    fisher_samples: int = 256,
    weighting: str | None = None,
    calibration_samples: int = 128,
) -> tuple[ConfigSpace, torch.Tensor]:
    """Load the backbone and its error table: an encoder as a classifier, a decoder as a causal LM (the
    module names the qconfig files use are the tasks', and the same for both Auto classes of a decoder).

    ``weighting`` (:mod:`~coalora.quant.error_weighting`; None: ``fisher`` when ``texts`` are given, as
    before, else ``none``): ``fisher`` takes the Fisher from ``fisher_samples`` of ``texts``, ``activation``
    the input statistics from ``calibration_samples`` of them."""
    from coalora.pretrained import is_decoder, load_causal_lm, load_classifier
    from coalora.quant.error_weighting import check_error_weighting
    from coalora.quant.targets import discover_targets, target_weights, weights_fingerprint
    from coalora.utils import quiet_transformers

    weighting = check_error_weighting(weighting or ("none" if texts is None else "fisher"), "weighting")
    if (weighting == "none") != (texts is None):
        raise CoaloraError(
            f"error weighting '{weighting}' {'takes no' if texts is not None else 'needs'} texts; "
            + ("drop them" if texts is not None else "pass training sentences")
        )
    with quiet_transformers():
        model = (
            load_causal_lm(model_name)
            if is_decoder(model_name)
            else load_classifier(model_name, num_labels=2)
        )
    targets = discover_targets(model)
    weights = target_weights(model, targets)
    fisher = hessians = None
    if weighting == "fisher":
        from coalora.quant.fisher import cached_fisher

        assert texts is not None
        fisher = cached_fisher(model_name, texts, targets, weights, cache_dir, num_samples=fisher_samples)
    elif weighting == "activation":
        from coalora.pretrained import load_tokenizer
        from coalora.quant.error_weighting import backbone_hessians, text_batches

        assert texts is not None
        batches = text_batches(load_tokenizer(model_name), texts, calibration_samples)
        fingerprint = weights_fingerprint(weights)
        hessians = backbone_hessians(model, model_name, batches, fingerprint, cache_dir)
    table = cached_error_table(weights, None, fisher, family, cache_dir, hessians)
    return ConfigSpace(targets, model=model_name, family=family), table


def allocate_for_model(
    model_name: str,
    budgets: list[float],
    texts: list[str] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
    weighting: str | None = None,
) -> list[tuple[QConfig, float]]:
    """One configuration (and its avg_bits) per budget, for a backbone named on the hub or a local folder
    (``texts`` and ``weighting`` as :func:`model_error_table` takes them)."""
    for budget in budgets:  # fail before the expensive part
        check_budget(budget, get_family(family).option_space)
    space, table = model_error_table(model_name, texts, family, cache_dir, weighting=weighting)
    results = []
    for budget in budgets:
        config = allocate(space, table, budget)
        results.append((config, space.avg_bits(config)))
    return results
