"""The multiple-choice knapsack behind allocation: one option per matrix, least total error, cost capped.

Dominated options are dropped, then every option that the Lagrangian bound proves cannot beat the greedy
solution. Integer costs small enough (every encoder, the tests' tiny models) are solved exactly by a dynamic
program over the capacity; anything else by HiGHS (``scipy.optimize.milp``) to a relative gap, never to a
wall-clock limit: the answer is a function of the table and the budget alone, whatever the machine's load.
No model or configuration types here: plain (N, K) error and cost arrays.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from coalora.errors import CoaloraError

#: Relative slack allowed when checking a solution's cost against the capacity (float summation only).
_COST_RTOL = 1e-12


def pareto_options(errors: np.ndarray, costs: np.ndarray) -> list[int]:
    """Indices of one row's non-dominated options, by rising cost (and falling error).

    An option is dropped when another costs no more and errs no more (ties keep the lowest index), so
    the optimum of the knapsack never needs it.
    """
    order = np.lexsort((np.arange(len(costs)), errors, costs))  # by cost, then error, then index
    kept: list[int] = []
    best = math.inf
    for j in order:
        if errors[j] < best:
            kept.append(int(j))
            best = errors[j]
    return kept


#: HiGHS (problems too large for the dynamic program) stops within this relative gap of the optimum's error.
#: The gap is a property of the problem, not of the machine, so the answer is the same everywhere; no time
#: limit is ever set, since one would make the answer depend on the machine's speed and load.
MIP_REL_GAP = 1e-4
#: The dynamic program runs when (capacity units above the cheapest choice) x (options kept) is at most
#: this: a few seconds of numpy. MiniLM's 36 x 432 table needs at most 2.2e8 (0.75 s, at 8.1 bits), the
#: tests' tiny models far less; a 7B decoder's capacity alone is ~1e7 units, so it goes to HiGHS.
DP_MAX_WORK = 1e9
#: ... and when its table of choices (matrices x capacity units, int16) stays under ~200 MB.
DP_MAX_CELLS = 1e8
#: Names the solver in allocation cache keys: change it whenever the same table and budget could get another
#: choice (gap, dynamic-program limits, pruning), so that no cache serves an answer this code would not give.
SOLVER_ID = f"dp{DP_MAX_WORK:.0e}x{DP_MAX_CELLS:.0e}-gap{MIP_REL_GAP:g}".replace("+", "")


def mask_options(errors: np.ndarray, costs: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(errors, costs) in which every option ``allowed`` refuses is strictly dominated, so no solver picks it.

    A refused option of row i gets cost (row's dearest allowed cost + 1) and error (twice the row's largest
    allowed error + 1): the dearest allowed option costs less and errs less. Both stay finite and of the
    row's scale (the Lagrangian bound and the integer cost path are unchanged), and the problem's optimum
    is the restricted one's. Each row needs at least one allowed option.
    """
    errors, costs = errors.astype(np.float64, copy=True), costs.astype(np.float64, copy=True)
    for i, row in enumerate(allowed):
        if not row.any():
            raise CoaloraError(f"matrix {i} allows none of the options; no configuration can code it")
        refused = ~row
        if refused.any():
            costs[i, refused] = costs[i, row].max() + 1.0
            errors[i, refused] = 2.0 * np.abs(errors[i, row]).max() + 1.0
    return errors, costs


def solve_mckp(
    errors: torch.Tensor | np.ndarray, costs: torch.Tensor | np.ndarray, capacity: float
) -> list[int]:
    """Option index per row minimising total error with total cost <= capacity (multiple-choice knapsack).

    Dominated options are dropped; a Lagrangian relaxation gives a lower bound and a feasible greedy choice,
    and options it proves useless are dropped too; what is left is solved exactly (integer costs, see
    :data:`DP_MAX_WORK`) or to within MIP_REL_GAP, and the better of that and the greedy choice returned.
    No step looks at the clock. The result never exceeds ``capacity`` (see :func:`_solve_fronts`).
    """
    errors = np.asarray(errors, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if errors.shape != costs.shape or errors.ndim != 2 or errors.size == 0:
        raise CoaloraError(
            f"errors {errors.shape} and costs {costs.shape} must be equal, non-empty (N, K) arrays"
        )
    if not (np.isfinite(errors).all() and np.isfinite(costs).all()):
        raise CoaloraError("errors and costs must be finite; recompute the error table")
    cheapest = costs.min(axis=1).sum()
    if cheapest > capacity * (1 + _COST_RTOL):
        raise CoaloraError(
            f"capacity {capacity:g} is below the cheapest choice {cheapest:g}; raise the budget"
        )
    rows = np.arange(len(errors))
    least = np.argmin(errors, axis=1)
    if costs[rows, least].sum() <= capacity:  # the least-error choice fits: nothing can beat it
        return [int(j) for j in least]
    fronts = [pareto_options(e, c) for e, c in zip(errors, costs, strict=True)]
    bound, reduced, greedy = _lagrangian(errors, costs, capacity)
    pruned = _prune(fronts, reduced, float(errors[rows, greedy].sum()) - bound)
    if costs[rows, [f[0] for f in pruned]].sum() <= capacity:  # float rounding never lost feasibility
        fronts = pruned
    choice = _solve_fronts(errors, costs, fronts, capacity)
    best = min((choice, [int(j) for j in greedy]), key=lambda c: errors[rows, c].sum())
    return [int(j) for j in best]


def _lagrangian(
    errors: np.ndarray, costs: np.ndarray, capacity: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """Lower bound, reduced costs and a feasible greedy choice from the Lagrangian relaxation.

    For a multiplier lam >= 0, sum_i min_c (e_ic + lam * w_ic) - lam * capacity bounds every feasible
    solution from below, and one using option c of matrix i errs at least that plus c's reduced cost. lam is
    bisected to where the minimiser's cost crosses the capacity, which makes the bound the LP bound.
    """
    error_scale = max(float(np.abs(errors).max()), 1e-300)
    cost_scale = max(abs(capacity), 1e-300)
    e, c, cap = errors / error_scale, costs / cost_scale, capacity / cost_scale  # lam stays O(1)
    rows = np.arange(len(e))

    def spent(lam: float) -> float:
        return float(c[rows, np.argmin(e + lam * c, axis=1)].sum())

    low, high = 0.0, 1.0
    for _ in range(200):  # grow until the minimiser fits (the cheapest choice does)
        if spent(high) <= cap:
            break
        low, high = high, high * 2
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (low, middle) if spent(middle) <= cap else (middle, high)
    bounds = {lam: float((e + lam * c).min(axis=1).sum()) - lam * cap for lam in (low, high)}
    lam = max(bounds, key=bounds.__getitem__)
    shifted = e + lam * c
    reduced = (shifted - shifted.min(axis=1, keepdims=True)) * error_scale
    greedy = np.argmin(e + high * c, axis=1)
    if costs[rows, greedy].sum() > capacity:  # only if lam failed to grow far enough: start cheapest
        greedy = np.argmin(costs, axis=1)
    return bounds[lam] * error_scale, reduced, _fill_up(greedy, errors, costs, capacity)


def _prune(fronts: list[list[int]], reduced: np.ndarray, slack: float) -> list[list[int]]:
    """Each row's options that may still appear in a choice at least as good as the greedy one.

    A feasible choice errs at least the Lagrangian bound plus the reduced cost of each of its options, so an
    option whose reduced cost exceeds ``slack`` (greedy error minus bound) cannot beat the greedy choice.
    The margin absorbs float rounding; each row keeps its option of least reduced cost, so none is empty.
    """
    margin = max(slack, 0.0) * (1 + 1e-9) + 1e-12 * float(np.abs(reduced).max(initial=0.0))
    kept = []
    for i, front in enumerate(fronts):
        row = [j for j in front if reduced[i, j] <= margin]
        kept.append(row or [min(front, key=lambda j: reduced[i, j])])
    return kept


def _fill_up(choice: np.ndarray, errors: np.ndarray, costs: np.ndarray, capacity: float) -> np.ndarray:
    """Greedily spend leftover capacity on the upgrade that cuts the most error."""
    choice = choice.copy()
    rows = np.arange(len(choice))
    for _ in range(10 * len(choice)):
        leftover = capacity - costs[rows, choice].sum()
        gain = errors[rows, choice][:, None] - errors
        gain[costs - costs[rows, choice][:, None] > leftover] = 0.0
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[i, j] <= 0:
            break
        choice[i] = j
    return choice


def _solve_fronts(
    errors: np.ndarray, costs: np.ndarray, fronts: list[list[int]], capacity: float
) -> list[int]:
    """The best choice among ``fronts``' options whose float64 cost is within ``capacity``.

    Integer costs (what :func:`allocate` passes) are solved as integers: by the dynamic program when it fits
    :data:`DP_MAX_WORK`, else by HiGHS. Float costs go to HiGHS in scaled floats, which may accept a point
    over capacity by its feasibility tolerance: then the capacity is cut by the excess and the problem
    solved again, with cheapest downgrades as the last resort. Which path runs depends on the problem only.
    """
    integral = bool(np.all(costs == np.round(costs))) and float(np.abs(costs).sum(axis=1).max()) < 2.0**52
    limit = float(math.floor(capacity * (1 + _COST_RTOL))) if integral else float(capacity)
    if integral and _dp_fits(costs, fronts, limit):
        return _dp_choice(errors, costs, fronts, int(limit))
    rows = np.arange(len(fronts))
    choice = _milp_choice(errors, costs, fronts, limit, not integral)
    if choice is None:
        raise CoaloraError("the knapsack solver found no feasible choice; try a larger budget")
    for _ in range(3):
        excess = costs[rows, choice].sum() - capacity
        if excess <= abs(capacity) * _COST_RTOL:
            return choice
        limit -= excess
        choice = _milp_choice(errors, costs, fronts, limit, not integral) or choice
    return _repair(choice, fronts, errors, costs, capacity)


def _room(costs: np.ndarray, fronts: list[list[int]], limit: float) -> int:
    """Integer capacity left once every row takes its cheapest kept option (fronts rise in cost)."""
    return int(limit) - int(sum(costs[i, front[0]] for i, front in enumerate(fronts)))


def _dp_fits(costs: np.ndarray, fronts: list[list[int]], limit: float) -> bool:
    """Whether the dynamic program's work and memory stay within DP_MAX_WORK and DP_MAX_CELLS."""
    cells = _room(costs, fronts, limit) + 1
    options = sum(len(f) for f in fronts)
    return cells > 0 and cells * options <= DP_MAX_WORK and cells * len(fronts) <= DP_MAX_CELLS


def _dp_choice(errors: np.ndarray, costs: np.ndarray, fronts: list[list[int]], limit: int) -> list[int]:
    """The exact optimum over integer costs: a dynamic program over the capacity spent above the cheapest.

    ``best[x]`` is the least error of the rows so far spending at most ``x`` units above their cheapest
    options; each row takes, per ``x``, the option minimising its error plus ``best`` of what is left. Ties
    keep the cheaper option, so the answer is unique and the same on every machine.
    """
    room = _room(costs, fronts, limit)
    best = np.zeros(room + 1)
    picks = np.zeros((len(fronts), room + 1), dtype=np.int16)
    for i, front in enumerate(fronts):
        extra = [int(costs[i, j] - costs[i, front[0]]) for j in front]
        best = _dp_row(best, extra, errors[i, front], picks[i])
    choice = [0] * len(fronts)
    spent = room
    for i in reversed(range(len(fronts))):
        k = int(picks[i, spent])
        choice[i] = fronts[i][k]
        spent -= int(costs[i, fronts[i][k]] - costs[i, fronts[i][0]])
    return choice


def _dp_row(best: np.ndarray, extra: list[int], errors: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """One row's step of :func:`_dp_choice`: fills ``picks`` (index into the row's options) in place."""
    updated = np.full_like(best, np.inf)
    better = np.empty(len(best), dtype=bool)
    for k, (shift, error) in enumerate(zip(extra, errors, strict=True)):
        if shift >= len(best):
            break  # options rise in cost: the rest do not fit either
        width = len(best) - shift
        candidate = best[:width] + error
        np.less(candidate, updated[shift:], out=better[:width])
        np.copyto(updated[shift:], candidate, where=better[:width])
        np.copyto(picks[shift:], k, where=better[:width])
    return updated


def _milp_choice(
    errors: np.ndarray, costs: np.ndarray, fronts: list[list[int]], limit: float, scale_costs: bool
) -> list[int] | None:
    """One HiGHS solve over the given options: binaries, one-hot rows per matrix, a capacity row.

    None when HiGHS finds no feasible point (only possible after a capacity cut on float costs).
    """
    rows = np.repeat(np.arange(len(fronts)), [len(f) for f in fronts])
    cols = np.concatenate(fronts)
    err = errors[rows, cols]
    cost = costs[rows, cols]
    # objective >= sum of each row's least error: scale so that it is >= 1 and the relative gap bites
    floor = float(errors.min(axis=1).sum())
    err_scale = floor if floor > 0 else max(float(np.abs(err).max()), 1e-300)
    cost_scale = max(abs(limit), 1e-300) if scale_costs else 1.0
    onehot = csr_array((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(len(fronts), len(rows)))
    constraints = [
        LinearConstraint(onehot, 1, 1),
        LinearConstraint((cost / cost_scale).reshape(1, -1), -np.inf, limit / cost_scale),
    ]
    with _native_stdout_silenced():
        result = milp(
            err / err_scale,
            constraints=constraints,
            integrality=np.ones(len(rows)),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": MIP_REL_GAP},
        )
    if result.x is None:
        return None
    starts = np.cumsum([0] + [len(f) for f in fronts[:-1]])
    return [int(f[int(np.argmax(result.x[s : s + len(f)]))]) for f, s in zip(fronts, starts, strict=True)]


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Hide what native code writes to fd 1: HiGHS 1.x prints a stray debug line (ERGO-Code/HiGHS#2783)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _repair(
    choice: list[int], fronts: list[list[int]], errors: np.ndarray, costs: np.ndarray, capacity: float
) -> list[int]:
    """Downgrade matrices (least error added per bit saved) until the exact cost fits the capacity."""
    choice = list(choice)
    rows = np.arange(len(choice))
    while costs[rows, choice].sum() > capacity * (1 + _COST_RTOL):
        best: tuple[float, int, int] | None = None
        for i, front in enumerate(fronts):
            for j in front:
                saved = costs[i, choice[i]] - costs[i, j]
                if saved > 0:
                    rate = (errors[i, j] - errors[i, choice[i]]) / saved
                    if best is None or rate < best[0]:
                        best = (rate, i, j)
        if best is None:  # unreachable: the cheapest choice fits, checked by the caller
            raise CoaloraError("cannot fit the budget; choose a larger one")
        choice[best[1]] = best[2]
    return choice
