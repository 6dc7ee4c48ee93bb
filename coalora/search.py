"""Pareto-based configuration search (SPEC §5), no Lightning: archive, GP, acquisition, candidates, filter.

Both objectives are minimised: f1 is the model's task loss under a configuration, f2 its exact avg_bits.
botorch maximises, so everything handed to botorch is negated. Configurations are (N, 5) integer option
indices; the GP sees them flattened to d = 5N and normalised by the known field sizes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from botorch.acquisition.multi_objective.logei import qLogExpectedHypervolumeImprovement
from botorch.exceptions.warnings import InputDataWarning, OptimizationWarning
from botorch.models import ModelList, SingleTaskGP
from botorch.models.deterministic import GenericDeterministicModel
from botorch.models.model import Model
from botorch.models.transforms import Standardize
from botorch.optim.fit import fit_gpytorch_mll_scipy
from botorch.optim.optimize import optimize_acqf_discrete_local_search
from botorch.posteriors import GPyTorchPosterior
from botorch.sampling import ListSampler, SobolQMCNormalSampler
from botorch.sampling.index_sampler import IndexSampler
from botorch.utils.multi_objective.box_decompositions import (
    DominatedPartitioning,
    FastNondominatedPartitioning,
)
from botorch.utils.multi_objective.pareto import is_non_dominated
from gpytorch.distributions import MultivariateNormal
from gpytorch.mlls import ExactMarginalLogLikelihood
from linear_operator.operators import DiagLinearOperator
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from coalora.errors import CoaloraError
from coalora.options import FIELD_SIZES
from coalora.qconfig import ConfigSpace
from coalora.threads import intra_op_threads

CANDIDATE_METHODS = ("coordinate", "botorch")
#: Relative margin of the reference point beyond the worst observation in each objective.
REF_MARGIN = 0.1


# ------------------------------------------------------------------------------------------------ archive


@dataclass
class Archive:
    """Every configuration seen so far, with its latest scores; f1 is NaN until first scored."""

    encoded: Tensor = field(default_factory=lambda: torch.empty(0, 0, 5, dtype=torch.long))
    f1: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    f2: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    epoch: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.f1)

    def keys(self) -> dict[bytes, int]:
        return {_key(e): i for i, e in enumerate(self.encoded)}

    def add(self, encoded: Tensor, f2: Tensor) -> Tensor:
        """Append the configurations not yet present (f1 unscored); return every row's archive index."""
        known = self.keys()
        rows, fresh = [], []
        for pos, e in enumerate(encoded):
            k = _key(e)
            if k not in known:
                known[k] = len(self) + len(fresh)
                fresh.append(pos)
            rows.append(known[k])
        if fresh:
            picked = torch.tensor(fresh, dtype=torch.long)
            added = encoded[picked].long()
            self.encoded = added if len(self) == 0 else torch.cat([self.encoded, added])
            self.f1 = torch.cat([self.f1, torch.full((len(fresh),), math.nan, dtype=torch.float64)])
            self.f2 = torch.cat([self.f2, f2[picked].to(torch.float64)])
            self.epoch = torch.cat([self.epoch, torch.full((len(fresh),), -1, dtype=torch.long)])
        return torch.tensor(rows, dtype=torch.long)

    def objectives(self, rows: Tensor | None = None) -> Tensor:
        """(n, 2) minimised objectives (f1, f2) of ``rows`` (all by default)."""
        y = torch.stack([self.f1, self.f2], dim=-1)
        return y if rows is None else y[rows]

    def state_dict(self) -> dict:
        return {"encoded": self.encoded.to(torch.int8), "f1": self.f1, "f2": self.f2, "epoch": self.epoch}

    @classmethod
    def from_state(cls, state: dict) -> Archive:
        return cls(state["encoded"].long(), state["f1"].double(), state["f2"].double(), state["epoch"].long())


def _key(encoded: Tensor) -> bytes:
    return encoded.to(torch.int8).numpy().tobytes()


# ---------------------------------------------------------------------------------- objective utilities


def reference_point(y: Tensor, margin: float = REF_MARGIN) -> Tensor:
    """A point strictly worse than every row of ``y`` (minimised): max + margin · scale, per objective.

    The scale is the objective's spread, or its magnitude (at least 1) when all values are equal, and never
    under 1e-6 of the magnitude, so the point is never on or rounded onto an observation (the authors' fixed
    (0, 0) was not even worse than theirs).
    """
    if y.ndim != 2 or len(y) == 0:
        raise CoaloraError("the reference point needs at least one scored configuration")
    high, low = y.max(dim=0).values, y.min(dim=0).values
    spread = high - low
    scale = torch.where(spread > 0, spread, high.abs().clamp_min(1.0))
    return high + margin * torch.maximum(scale, high.abs() * 1e-6)


def hypervolume(y: Tensor, ref: Tensor) -> float:
    """Area dominated by the minimised points ``y`` and bounded by ``ref``."""
    if len(y) == 0:
        return 0.0
    partition = DominatedPartitioning(ref_point=-ref.double(), Y=-y.double())
    return float(partition.compute_hypervolume())


def pareto_mask(y: Tensor) -> Tensor:
    """Non-dominated rows of minimised ``y`` (duplicates kept once)."""
    return is_non_dominated(-y, deduplicate=True)


def segment_filter(y: Tensor, num_segments: int, bits_range: tuple[float, float]) -> Tensor:
    """Indices of each avg-bits segment's non-dominated points, by rising f2 (SPEC §5 step 6).

    Segments split ``bits_range`` evenly; points outside it fall into the end segments, so none is lost.
    """
    if num_segments < 1:
        raise CoaloraError(f"num_segments must be >= 1, got {num_segments}")
    low, high = bits_range
    if not high > low:
        raise CoaloraError(f"bits_range must rise, got {bits_range}")
    width = (high - low) / num_segments
    segment = ((y[:, 1] - low) / width).floor().long().clamp(0, num_segments - 1)
    keep = []
    for s in segment.unique().tolist():
        rows = (segment == s).nonzero().squeeze(1)
        keep.append(rows[pareto_mask(y[rows])])
    if not keep:
        return torch.empty(0, dtype=torch.long)
    kept = torch.cat(keep)
    order = torch.argsort(y[kept, 1], stable=True)
    return kept[order]


# ------------------------------------------------------------------------------------------- surrogate


def fit_gp(x: Tensor, f1: Tensor, maxiter: int = 100) -> SingleTaskGP:
    """A SingleTaskGP on -f1 over normalised encodings, fitted by a bounded, deterministic L-BFGS-B.

    Inputs are already in [0, 1] by known field sizes (constant columns are harmless); Standardize maps
    constant or single outcomes to unit scale instead of dividing by zero. No random restarts: the fit
    never touches the global RNG, so resumed and DDP runs agree. A failed fit keeps the prior's
    hyperparameters (with a warning) rather than ending the training run.
    """
    with warnings.catch_warnings():
        # expected here: outcomes that Standardize cannot scale (all equal), maxiter reached, jitter added
        for category in (InputDataWarning, OptimizationWarning, NumericalWarning):
            warnings.simplefilter("ignore", category)
        gp = SingleTaskGP(x.double(), -f1.double().unsqueeze(-1), outcome_transform=Standardize(m=1))
        mll = ExactMarginalLogLikelihood(gp.likelihood, gp)
        mll.train()
        prior = {k: v.clone() for k, v in mll.state_dict().items()}
        try:
            fit_gpytorch_mll_scipy(mll, options={"maxiter": maxiter})
            failure = None
        except (RuntimeError, ValueError) as err:
            mll.load_state_dict(prior)
            failure = err
    if failure is not None:
        warnings.warn(f"GP fit failed ({failure}); using the prior hyperparameters", stacklevel=2)
    mll.eval()
    return gp


class MarginalGP(Model):
    """A fitted single-output exact GP seen through its marginals: b points cost one (b, n) cross-kernel.

    gpytorch's exact prediction builds the joint kernel of train and test points, (n + b)² · d work, which
    dominates a step of 1440 neighbours at d = 720; EHVI of single points (q = 1) needs only each point's
    mean and variance, computed here from a Cholesky factor cached once per fit.
    """

    def __init__(self, gp: SingleTaskGP) -> None:
        super().__init__()
        gp.eval()
        self.gp = gp
        x = gp.train_inputs[0]
        with torch.no_grad():
            k = gp.covar_module(x).to_dense()
            k = k + gp.likelihood.noise.reshape(-1)[0] * torch.eye(len(x), dtype=k.dtype)
            self.chol = psd_safe_cholesky(k)
            residual = (gp.train_targets - gp.mean_module(x)).unsqueeze(-1)
            self.alpha = torch.cholesky_solve(residual, self.chol)

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size()

    def posterior(self, X: Tensor, output_indices=None, observation_noise=False, posterior_transform=None):
        if X.shape[-2] != 1:
            raise CoaloraError("MarginalGP evaluates single points (q = 1) only")
        flat = X.reshape(-1, X.shape[-1])
        gp = self.gp
        cross = gp.covar_module(flat, gp.train_inputs[0]).to_dense()  # (b, n)
        mean = gp.mean_module(flat) + (cross @ self.alpha).squeeze(-1)
        reduced = torch.linalg.solve_triangular(self.chol, cross.T, upper=False)
        variance = (gp.covar_module(flat, diag=True) - reduced.square().sum(0)).clamp_min(1e-12)
        mean, variance = gp.outcome_transform.untransform(mean.unsqueeze(-1), variance.unsqueeze(-1))
        shape = X.shape[:-1]
        mvn = MultivariateNormal(mean.reshape(shape), DiagLinearOperator(variance.reshape(shape)))
        return GPyTorchPosterior(mvn)


class EncodingBits:
    """f2 as a botorch-callable: normalised encodings (..., d) -> exact avg_bits (...)."""

    def __init__(self, space: ConfigSpace) -> None:
        self.space = space
        self.top = field_tops(len(space)).double()

    def __call__(self, x: Tensor) -> Tensor:
        indices = torch.round(x.double() * self.top).long().clamp_min(0)
        indices = torch.minimum(indices, self.top.long())
        return self.space.avg_bits_encoded(indices.reshape(*x.shape[:-1], len(self.space), len(FIELD_SIZES)))


def field_tops(num_matrices: int) -> Tensor:
    """Largest index of every flat coordinate: (d,) long."""
    return (torch.tensor(FIELD_SIZES, dtype=torch.long) - 1).repeat(num_matrices)


def make_acquisition(
    gp: SingleTaskGP, bits: EncodingBits, y: Tensor, ref: Tensor, seed: int, mc_samples: int = 32
) -> qLogExpectedHypervolumeImprovement:
    """qLogEHVI of (f1, f2) over the archive's front, f2 exact via a deterministic model.

    Fixed quasi-MC base samples make the acquisition a deterministic function, so finite differences
    between neighbours measure the surface, not sampling noise.
    """
    model = ModelList(
        MarginalGP(gp), GenericDeterministicModel(lambda x: -bits(x).unsqueeze(-1), num_outputs=1)
    )
    partition = FastNondominatedPartitioning(ref_point=-ref.double(), Y=-y.double())
    shape = torch.Size([mc_samples])
    sampler = ListSampler(SobolQMCNormalSampler(shape, seed=seed), IndexSampler(shape, seed=seed))
    return qLogExpectedHypervolumeImprovement(model, (-ref).tolist(), partition, sampler=sampler)


def batched(acq: Callable[[Tensor], Tensor], chunk: int = 1024) -> Callable[[Tensor], Tensor]:
    """Evaluate an acquisition on (b, d) points in chunks of (chunk, 1, d), without autograd."""

    def evaluate(x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([acq(part.unsqueeze(1)) for part in x.split(chunk)])

    return evaluate


# ------------------------------------------------------------------------------------------- candidates


def coordinate_ascent(
    value: Callable[[Tensor], Tensor], starts: Tensor, tops: Tensor, max_steps: int = 20
) -> Tensor:
    """Greedy integer-grid ascent of ``value`` from each start (rows of flat indices), all starts batched.

    Per step and coordinate the slope is a finite difference of the acquisition over ±1 index: central
    where both neighbours exist, one-sided at a bound. The coordinate with the steepest improving slope
    moves one step, provided the move really raises the value (so the ascent is monotone); a start stops
    when no coordinate improves or after ``max_steps``. Moves never leave [0, top]; every in-range
    neighbour of every active start goes through ``value`` in one call.
    """
    x = starts.clone().long()
    if len(x) == 0:
        return x
    current = value(_unit(x, tops))
    active = torch.arange(len(x))
    for _ in range(max_steps):
        if len(active) == 0:
            break
        here = x[active]
        has_up, has_down = here < tops, here > 0
        v_up, v_down = _neighbour_values(value, here, has_up, has_down, tops, current[active])
        base = current[active].unsqueeze(1)
        slope = (v_up - v_down) / (has_up.double() + has_down.double()).clamp_min(1.0)
        step = torch.where((slope > 0) & has_up, 1, torch.where((slope < 0) & has_down, -1, 0))
        moved = torch.where(step > 0, v_up, v_down)
        score = torch.where((step != 0) & (moved > base), slope.abs(), -math.inf)
        best = score.argmax(dim=1)
        rows = torch.arange(len(active))
        improving = score[rows, best] > -math.inf
        winners, coords = active[improving], best[improving]
        x[winners, coords] += step[rows, best][improving]
        current[winners] = moved[rows, best][improving]
        active = winners
    return x


def _neighbour_values(
    value: Callable[[Tensor], Tensor],
    here: Tensor,
    has_up: Tensor,
    has_down: Tensor,
    tops: Tensor,
    current: Tensor,
) -> tuple[Tensor, Tensor]:
    """Acquisition at x ± e_j for every in-range move; out-of-range moves read as the current value."""
    ups, downs = has_up.nonzero(), has_down.nonzero()
    moves = torch.cat([here[ups[:, 0]], here[downs[:, 0]]])
    moves[torch.arange(len(ups)), ups[:, 1]] += 1
    moves[torch.arange(len(ups), len(moves)), downs[:, 1]] -= 1
    values = value(_unit(moves, tops)) if len(moves) else current[:0]
    v_up = current.unsqueeze(1).expand_as(has_up).clone()
    v_down = v_up.clone()
    v_up[ups[:, 0], ups[:, 1]] = values[: len(ups)]
    v_down[downs[:, 0], downs[:, 1]] = values[len(ups) :]
    return v_up, v_down


def _unit(indices: Tensor, tops: Tensor) -> Tensor:
    return indices.double() / tops.double()


def botorch_local_search(
    acq: qLogExpectedHypervolumeImprovement, starts: Tensor, tops: Tensor, seed: int
) -> Tensor:
    """botorch's discrete local search from each start (one candidate per start)."""
    choices = [torch.linspace(0, 1, int(t) + 1, dtype=torch.float64) for t in tops]
    found = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # its initial-condition sampler uses the global RNG; keep ours untouched
        for start in starts:
            x, _ = optimize_acqf_discrete_local_search(
                acq,
                choices,
                q=1,
                num_restarts=1,
                batch_initial_conditions=_unit(start.unsqueeze(0), tops).unsqueeze(1),
                return_acq_values=False,
            )
            found.append(torch.round(x.squeeze(0) * tops.double()).long())
    return torch.stack(found) if found else starts.clone()


@dataclass
class SearchSettings:
    """Knobs of one proposal step."""

    num_starts: int = 5
    max_steps: int = 20
    candidate_method: str = "coordinate"
    mc_samples: int = 32
    gp_maxiter: int = 100
    max_fit_points: int = 512
    threads: int = 1


def propose(
    space: ConfigSpace,
    archive: Archive,
    generator: torch.Generator,
    settings: SearchSettings,
    keep: Tensor | None = None,
) -> Tensor:
    """New candidate encodings (k, N, 5), k <= num_starts, none already in the archive.

    Fits the GP to the scored archive (at most ``max_fit_points``: rows in ``keep`` first, then the most
    recent), builds qLogEHVI with a reference point worse than every observation, and climbs from
    ``num_starts`` starts: half from the archive's front, the rest uniformly random. Runs on
    ``settings.threads`` threads: its many small ops lose more to OpenMP barriers than they gain.
    """
    if settings.candidate_method not in CANDIDATE_METHODS:
        raise CoaloraError(
            f"unknown candidate_method '{settings.candidate_method}'; "
            f"use one of: {', '.join(CANDIDATE_METHODS)}"
        )
    empty = torch.empty(0, len(space), len(FIELD_SIZES), dtype=torch.long)
    scored = archive.f1.isfinite().nonzero().squeeze(1)
    if len(scored) == 0 or settings.num_starts < 1:
        return empty
    with intra_op_threads(settings.threads):
        found = _climb(space, archive, _fit_rows(scored, keep, settings.max_fit_points), generator, settings)
    known = archive.keys()
    unique: dict[bytes, Tensor] = {}
    for flat in found:
        encoded = flat.reshape(len(space), len(FIELD_SIZES))
        if _key(encoded) not in known:
            unique.setdefault(_key(encoded), encoded)
    return torch.stack(list(unique.values())) if unique else empty


def _climb(
    space: ConfigSpace, archive: Archive, rows: Tensor, generator: torch.Generator, settings: SearchSettings
) -> Tensor:
    """Fit, build the acquisition and run the chosen ascent: (num_starts, d) flat index rows."""
    y = archive.objectives(rows)
    gp = fit_gp(space.normalise(archive.encoded[rows]), y[:, 0], settings.gp_maxiter)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    acq = make_acquisition(gp, EncodingBits(space), y, reference_point(y), seed, settings.mc_samples)
    tops = field_tops(len(space))
    starts = _starts(space, archive.encoded[rows][pareto_mask(y)], settings.num_starts, generator)
    if settings.candidate_method == "coordinate":
        return coordinate_ascent(batched(acq), starts, tops, settings.max_steps)
    return botorch_local_search(acq, starts, tops, seed)


def _fit_rows(scored: Tensor, keep: Tensor | None, cap: int) -> Tensor:
    """At most ``cap`` of the ``scored`` rows for the GP: ``keep`` rows first, then the newest others."""
    if len(scored) <= cap:
        return scored
    first = scored[torch.isin(scored, keep)] if keep is not None else scored[:0]
    rest = scored[~torch.isin(scored, first)]
    room = max(cap - len(first), 0)
    return torch.cat([first[:cap], rest[len(rest) - room :] if room else rest[:0]]).sort().values


def _starts(space: ConfigSpace, front: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` flat start encodings: up to half from ``front`` (drawn without replacement), rest random."""
    from_front = min(len(front), (count + 1) // 2)
    picks = torch.randperm(len(front), generator=generator)[:from_front]
    chosen = [front[int(i)].reshape(-1) for i in picks]
    tops = field_tops(len(space))
    for _ in range(count - from_front):
        chosen.append((torch.rand(len(tops), generator=generator, dtype=torch.float64) * (tops + 1)).long())
    return torch.stack(chosen)


def random_encodings(
    space: ConfigSpace,
    count: int,
    generator: torch.Generator,
    bits_range: tuple[float, float] | None = None,
    max_tries: int = 100,
) -> Tensor:
    """``count`` uniform random encodings (each option index uniform), kept inside ``bits_range`` if given.

    Rejection sampling; after ``max_tries`` rounds the remainder is filled without the restriction.
    """
    tops = field_tops(len(space))
    shape = (len(space), len(FIELD_SIZES))
    found: list[Tensor] = []
    for attempt in range(max_tries + 1):
        need = count - len(found)
        if need <= 0:
            break
        draw = (torch.rand(need, len(tops), generator=generator, dtype=torch.float64) * (tops + 1)).long()
        draw = draw.reshape(need, *shape)
        if bits_range is not None and attempt < max_tries:
            bits = space.avg_bits_encoded(draw)
            draw = draw[(bits >= bits_range[0]) & (bits <= bits_range[1])]
        found.extend(draw)
    return torch.stack(found) if found else torch.empty(0, *shape, dtype=torch.long)
