"""From a bit budget to a configuration (SPEC §2.5): per-matrix error tables and a multiple-choice knapsack.

The error of matrix i under option c is e_ic = sum(F_i * (W_i - Q_c(W_i))^2) (F = 1 without a Fisher), its
cost bits(c) * numel_i. Choosing one option per matrix to minimise total error under a bit budget is a
multiple-choice knapsack, solved exactly by HiGHS (``scipy.optimize.milp``) after dominated options are
dropped. Error tables take tens of seconds, so they are cached on disk, keyed by everything they depend on.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from coalora.backbone import weights_fingerprint
from coalora.codebooks import codebook
from coalora.errors import CoaloraError
from coalora.options import OPTION_SPACE, QuantOption
from coalora.qconfig import ConfigSpace, QConfig
from coalora.quantizer import _double_quantize_scales
from coalora.threads import intra_op_threads

#: The paper's evaluation budgets; none of them is on the default training grid.
EVAL_BUDGETS: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0)
#: Bump when the quantizer or the error definition changes, so stale cached tables are not reused.
TABLE_VERSION = 1
#: Relative slack allowed when checking a solution's cost against the capacity (float summation only).
_COST_RTOL = 1e-12


def budget_grid(start: float = 2.25, stop: float = 7.15, step: float = 0.10) -> list[float]:
    """Budgets from ``start`` to ``stop`` inclusive, rounded so that 2.35 is 2.35, not 2.3500000000000001."""
    if step <= 0 or stop < start:
        raise CoaloraError(f"budget grid needs step > 0 and stop >= start; got {start}..{stop} step {step}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    return [round(start + i * step, 10) for i in range(count)]


# ------------------------------------------------------------------------------------------- error table


def error_table(
    weights: dict[str, torch.Tensor],
    options: Sequence[QuantOption] = OPTION_SPACE,
    fisher: dict[str, torch.Tensor] | None = None,
    family: str = "nf",
) -> torch.Tensor:
    """(N matrices, K options) float64 table of (Fisher-weighted) squared quantization errors.

    Rows follow ``weights``' order. Equal (to float32 rounding) to summing ``F * (W - fake_quantize(W))**2``
    but ~4x faster: options that differ only in ``bits`` share their dequantized scales and their position
    on one fine bin grid, and each weight's error is the distance to the nearer of its bin's two candidate
    levels, which is the nearest level (a bin holds at most one midpoint) without gathering any code.
    Option groups (by block size) are the outer loop and all matrices run inside; no Python loop over blocks.
    It runs on one thread: these short elementwise ops gain little from a second one, and OpenMP's barriers
    make them many times slower whenever another process holds a core.
    """
    names = list(weights)
    if fisher is not None:
        _check_fisher(weights, fisher)
    lookup = _BinLookup.build(family, tuple(sorted({o.bits for o in options})))
    groups: dict[tuple, list[int]] = {}  # options equal but for bits share their scales
    for k, option in enumerate(options):
        groups.setdefault((option.block, option.scale_bits, option.scale2_dtype, option.block2), []).append(k)
    table = torch.empty(len(names), len(options), dtype=torch.float64)
    with intra_op_threads(1), torch.no_grad():  # one thread: see the docstring
        for block in sorted({key[0] for key in groups}):
            matrices = [_Blocked.of(weights[n], None if fisher is None else fisher[n], block) for n in names]
            for key, columns in groups.items():
                if key[0] == block:
                    group = [options[k] for k in columns]
                    for i, matrix in enumerate(matrices):
                        table[i, columns] = torch.tensor(matrix.errors(group, lookup), dtype=torch.float64)
    return table


class _BinLookup:
    """A uniform grid of bins on [-1, 1], fine enough that no bin holds two midpoints of any codebook used.

    For bin b and bit width n, ``lower[n][b]`` and ``upper[n][b]`` are the two levels a value in the bin can
    round to. Midpoints stay over 1e-5 from bin edges, so a value whose bin index float rounding moves by
    one still finds its nearest level among the two.
    """

    def __init__(
        self, half_bins: float, lower: dict[int, torch.Tensor], upper: dict[int, torch.Tensor]
    ) -> None:
        self.half_bins = half_bins
        self.lower = lower
        self.upper = upper

    @staticmethod
    def build(family: str, bit_widths: tuple[int, ...]) -> _BinLookup:
        levels = {n: codebook(n, family).double() for n in bit_widths}
        mids = {n: (lv[1:] + lv[:-1]) / 2 for n, lv in levels.items()}
        gap = min(float((m[1:] - m[:-1]).min()) if len(m) > 1 else 2.0 for m in mids.values())
        bins = 1 << max(1, math.ceil(math.log2(4.0 / gap)))
        while True:
            edges = torch.arange(bins + 1, dtype=torch.float64) * (2.0 / bins) - 1.0
            if all((m.unsqueeze(1) - edges).abs().min() > 1e-5 for m in mids.values()):
                break
            bins += 1
        lower, upper = {}, {}
        for n, lv in levels.items():
            below = torch.searchsorted(mids[n], edges[:-1])  # midpoints under each bin's left edge
            lower[n] = lv[below].float()
            upper[n] = lv[(below + 1).clamp_max(len(lv) - 1)].float()
        return _BinLookup(bins / 2.0, lower, upper)


@dataclass
class _Blocked:
    """One matrix cut into zero-padded blocks of one size (padding quantizes to 0 and adds no error)."""

    blocks: torch.Tensor  # (n_blocks, block) float32
    fisher: torch.Tensor | None  # same shape, or None for plain errors
    absmax: torch.Tensor  # (n_blocks,)
    zeroed: torch.Tensor  # (n_blocks,) each block's error if its scale quantizes to 0

    @staticmethod
    def of(weight: torch.Tensor, fisher: torch.Tensor | None, block: int) -> _Blocked:
        def cut(t: torch.Tensor) -> torch.Tensor:
            flat = t.detach().reshape(-1).to(torch.float32)
            return torch.nn.functional.pad(flat, (0, (-flat.numel()) % block)).view(-1, block)

        blocks = cut(weight)
        fblocks = None if fisher is None else cut(fisher)
        squares = blocks.square() if fblocks is None else blocks.square() * fblocks
        return _Blocked(blocks, fblocks, blocks.abs().amax(dim=1), squares.sum(1))

    def errors(self, group: list[QuantOption], lookup: _BinLookup) -> list[float]:
        """Errors of options that differ only in ``bits``: (W - level * s)^2 = s^2 (W / s - level)^2."""
        scales = _double_quantize_scales(self.absmax, group[0])[3]
        x = self.blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(1)  # as the quantizer divides
        bins = x.mul(lookup.half_bins).add_(lookup.half_bins).clamp_(0, 2 * lookup.half_bins - 1)
        bins = bins.to(torch.int32).view(-1)
        x = x.view(-1)
        dead = float(self.zeroed[scales == 0].sum(dtype=torch.float64))  # blocks whose scale became 0
        if self.fisher is None:
            weight, squared_scales = None, scales.square().double()
        else:
            weight, squared_scales = (self.fisher * scales.square().unsqueeze(1)).view(-1), None
        low, high = torch.empty_like(x), torch.empty_like(x)  # reused: fresh tensors cost page faults
        result = []
        for option in group:
            torch.index_select(lookup.lower[option.bits], 0, bins, out=low).sub_(x).square_()
            torch.index_select(lookup.upper[option.bits], 0, bins, out=high).sub_(x).square_()
            distance = torch.minimum(low, high, out=low)
            if weight is None:
                error = distance.view_as(self.blocks).sum(1).double() @ squared_scales
            else:
                error = torch.dot(distance, weight)
            result.append(float(error) + dead)
        return result


def _check_fisher(weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
    for name, weight in weights.items():
        f = fisher.get(name)
        if f is None:
            raise CoaloraError(
                f"the Fisher has no entry for matrix '{name}'; compute it for the same backbone"
            )
        if tuple(f.shape) != tuple(weight.shape):
            raise CoaloraError(
                f"the Fisher of '{name}' has shape {tuple(f.shape)}, the weight {tuple(weight.shape)}; "
                "compute it for the same backbone"
            )


def default_cache_dir() -> Path:
    """``$COALORA_CACHE`` if set, else ``~/.cache/coalora``."""
    env = os.environ.get("COALORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "coalora"


def options_hash(options: Sequence[QuantOption]) -> str:
    """Short hash of an option list, in order (a table's columns follow it)."""
    text = ";".join(o.short() for o in options)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def table_cache_path(
    weights: dict[str, torch.Tensor],
    options: Sequence[QuantOption] = OPTION_SPACE,
    fisher: dict[str, torch.Tensor] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where the table for these weights, options, Fisher and code family is (or would be) cached."""
    fisher_key = "plain" if fisher is None else "fisher-" + weights_fingerprint(fisher)
    parts = (f"v{TABLE_VERSION}", weights_fingerprint(weights), family, fisher_key, options_hash(options))
    key = "errors-" + "-".join(parts)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return folder / f"{key}.pt"


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` through a temporary file and ``os.replace``, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_table(path: Path, names: list[str], n_options: int) -> torch.Tensor | None:
    """The cached table reordered to ``names``, or None when absent, unreadable or of another shape."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        index = {name: i for i, name in enumerate(data["names"])}
        table = data["table"][[index[n] for n in names]]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError):
        return None
    return table if table.shape == (len(names), n_options) else None


def cached_error_table(
    weights: dict[str, torch.Tensor],
    options: Sequence[QuantOption] = OPTION_SPACE,
    fisher: dict[str, torch.Tensor] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """:func:`error_table`, read from the disk cache when present, else computed and written there."""
    path = table_cache_path(weights, options, fisher, family, cache_dir)
    names = list(weights)
    table = _load_table(path, names, len(options))
    if table is None:
        table = error_table(weights, options, fisher, family)
        save_atomic({"names": names, "table": table}, path)
    return table


# ----------------------------------------------------------------------------------------------- solver


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


#: HiGHS stops within this relative gap of the optimum's error, or after this many seconds with the best
#: feasible point. Near-tied tables (random or tiny weights) otherwise take minutes to prove optimality for
#: a 1e-4 difference in quantization error that no accuracy number can see.
MIP_REL_GAP = 1e-4
MIP_TIME_LIMIT_S = 2.0


def solve_mckp(
    errors: torch.Tensor | np.ndarray, costs: torch.Tensor | np.ndarray, capacity: float
) -> list[int]:
    """Option index per row minimising total error with total cost <= capacity (multiple-choice knapsack).

    Dominated options are dropped; a Lagrangian relaxation gives a feasible greedy choice; HiGHS solves the
    integer program over the non-dominated options to within MIP_REL_GAP (or its time limit) and the
    better of the two is returned. The result never exceeds ``capacity`` (see :func:`_solve_fronts`).
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
    _, _, greedy = _lagrangian(errors, costs, capacity)
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

    Integer costs (what :func:`allocate` passes) are solved as integers, exactly. Otherwise HiGHS works in
    scaled floats and may accept a point over capacity by its feasibility tolerance: then the capacity is
    cut by the excess and the problem solved again, with cheapest downgrades as the last resort.
    """
    integral = bool(np.all(costs == np.round(costs))) and float(np.abs(costs).sum(axis=1).max()) < 2.0**52
    limit = float(math.floor(capacity * (1 + _COST_RTOL))) if integral else float(capacity)
    rows = np.arange(len(fronts))
    choice = _milp_choice(errors, costs, fronts, limit, scale_costs=not integral)
    if choice is None:
        raise CoaloraError("the knapsack solver found no feasible choice; try a larger budget")
    for _ in range(3):
        excess = costs[rows, choice].sum() - capacity
        if excess <= abs(capacity) * _COST_RTOL:
            return choice
        limit -= excess
        choice = _milp_choice(errors, costs, fronts, limit, scale_costs=not integral) or choice
    return _repair(choice, fronts, errors, costs, capacity)


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
            options={"mip_rel_gap": MIP_REL_GAP, "time_limit": MIP_TIME_LIMIT_S},
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


# -------------------------------------------------------------------------------------------- allocation


def option_costs(space: ConfigSpace, options: Sequence[QuantOption] = OPTION_SPACE) -> np.ndarray:
    """(N, K) storage bits of every option on every matrix: bits(option) * numel."""
    bits = np.array([o.storage_bits for o in options], dtype=np.float64)
    return space.numel.numpy()[:, None] * bits[None, :]


def budget_range(options: Sequence[QuantOption] = OPTION_SPACE) -> tuple[float, float]:
    """Cheapest and dearest achievable avg_bits (every matrix at the cheapest or dearest option)."""
    bits = [o.storage_bits for o in options]
    return min(bits), max(bits)


def check_budget(budget_bits: float, options: Sequence[QuantOption] = OPTION_SPACE) -> None:
    """Raise a one-line error when no configuration can meet ``budget_bits`` or it exceeds the dearest one."""
    low, high = budget_range(options)
    if not low <= budget_bits <= high:
        raise CoaloraError(
            f"budget {budget_bits:g} bits is outside the achievable range "
            f"{math.ceil(low * 1e4) / 1e4:.4f}..{math.floor(high * 1e4) / 1e4:.4f} bits; choose one inside it"
        )


def allocate(
    space: ConfigSpace,
    errors: torch.Tensor | np.ndarray,
    budget_bits: float,
    options: Sequence[QuantOption] = OPTION_SPACE,
) -> QConfig:
    """The configuration with least total error whose avg_bits does not exceed ``budget_bits``."""
    check_budget(budget_bits, options)
    errors = np.asarray(errors, dtype=np.float64)
    if errors.shape != (len(space), len(options)):
        raise CoaloraError(
            f"error table is {errors.shape}, expected ({len(space)}, {len(options)}); "
            "recompute it for this model"
        )
    costs, capacity = _integer_costs(space, options, budget_bits)
    choice = solve_mckp(errors, costs, capacity)
    return space.make(options[j] for j in choice)


def cached_allocate(
    space: ConfigSpace,
    errors: torch.Tensor | np.ndarray,
    budget_bits: float,
    cache_dir: str | os.PathLike | None = None,
) -> QConfig:
    """:func:`allocate`, remembered on disk per (error table, budget): a run allocates its grid once."""
    table = np.ascontiguousarray(np.asarray(errors, dtype=np.float64))
    digest = hashlib.sha256(table.tobytes() + "|".join(space.names).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / "allocations" / f"{digest}-{budget_bits:.4f}.json"
    if path.is_file():
        try:
            return space.validate(QConfig.load(path))
        except CoaloraError:
            pass  # a stale or damaged entry: recompute it
    config = allocate(space, table, budget_bits)
    space.save(config, path)
    return config


def _integer_costs(
    space: ConfigSpace, options: Sequence[QuantOption], budget_bits: float
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
    space: ConfigSpace, errors: torch.Tensor, config: QConfig, options: Sequence[QuantOption] = OPTION_SPACE
) -> float:
    """Sum of the table's errors for the options ``config`` chose."""
    column = {o: k for k, o in enumerate(options)}
    return float(sum(errors[i, column[config.matrices[n]]] for i, n in enumerate(space.names)))


def model_error_table(
    model_name: str,
    fisher_texts: list[str] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
    fisher_samples: int = 256,
) -> tuple[ConfigSpace, torch.Tensor]:
    """Load the backbone (as a classifier, whose module names the qconfig files use) and its error table."""
    from coalora.backbone import discover_targets, load_classifier, target_weights
    from coalora.fisher import quiet_transformers

    with quiet_transformers():
        model = load_classifier(model_name, num_labels=2)
    targets = discover_targets(model)
    weights = target_weights(model, targets)
    fisher = None
    if fisher_texts is not None:
        from coalora.fisher import cached_fisher

        fisher = cached_fisher(
            model_name, fisher_texts, targets, weights, cache_dir, num_samples=fisher_samples
        )
    table = cached_error_table(weights, OPTION_SPACE, fisher, family, cache_dir)
    return ConfigSpace(targets, model=model_name), table


def allocate_for_model(
    model_name: str,
    budgets: list[float],
    fisher_texts: list[str] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
) -> list[tuple[QConfig, float]]:
    """One configuration (and its avg_bits) per budget, for a backbone named on the hub or a local folder."""
    for budget in budgets:  # fail before the expensive part
        check_budget(budget)
    space, table = model_error_table(model_name, fisher_texts, family, cache_dir)
    results = []
    for budget in budgets:
        config = allocate(space, table, budget)
        results.append((config, space.avg_bits(config)))
    return results
