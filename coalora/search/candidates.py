"""New candidate configurations: finite-difference coordinate ascent of the acquisition (or botorch's
discrete local search) from starts on the front and at random, and uniform random encodings."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from botorch.acquisition.multi_objective.logei import qLogExpectedHypervolumeImprovement
from botorch.optim.optimize import optimize_acqf_discrete_local_search
from torch import Tensor

from coalora.errors import CoaloraError
from coalora.quant.qconfig import ConfigSpace
from coalora.search.archive import Archive, encoding_key
from coalora.search.pareto import pareto_mask, reference_point
from coalora.search.surrogate import EncodingBits, batched, field_tops, fit_gp, make_acquisition
from coalora.utils import intra_op_threads

CANDIDATE_METHODS = ("coordinate", "botorch")


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
    """New candidate encodings (k, N, F), k <= num_starts, none already in the archive (F: the family's
    option fields; options a matrix's rows do not allow are moved to the nearest allowed one).

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
    fields = len(space.family.field_sizes)
    empty = torch.empty(0, len(space), fields, dtype=torch.long)
    scored = archive.f1.isfinite().nonzero().squeeze(1)
    if len(scored) == 0 or settings.num_starts < 1:
        return empty
    with intra_op_threads(settings.threads):
        found = _climb(space, archive, _fit_rows(scored, keep, settings.max_fit_points), generator, settings)
    known = archive.keys()
    unique: dict[bytes, Tensor] = {}
    for flat in found:
        encoded = space.restrict(flat.reshape(len(space), fields))
        if encoding_key(encoded) not in known:
            unique.setdefault(encoding_key(encoded), encoded)
    return torch.stack(list(unique.values())) if unique else empty


def _climb(
    space: ConfigSpace, archive: Archive, rows: Tensor, generator: torch.Generator, settings: SearchSettings
) -> Tensor:
    """Fit, build the acquisition and run the chosen ascent: (num_starts, d) flat index rows."""
    y = archive.objectives(rows)
    gp = fit_gp(space.normalise(archive.encoded[rows]), y[:, 0], settings.gp_maxiter)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    acq = make_acquisition(gp, EncodingBits(space), y, reference_point(y), seed, settings.mc_samples)
    tops = field_tops(len(space), space.family.field_sizes)
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
    tops = field_tops(len(space), space.family.field_sizes)
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
    """``count`` uniform random encodings (each option index uniform, then moved to the nearest option its
    matrix's rows allow), kept inside ``bits_range`` if given.

    Rejection sampling; after ``max_tries`` rounds the remainder is filled without the restriction.
    """
    tops = field_tops(len(space), space.family.field_sizes)
    shape = (len(space), len(space.family.field_sizes))
    found: list[Tensor] = []
    for attempt in range(max_tries + 1):
        need = count - len(found)
        if need <= 0:
            break
        draw = (torch.rand(need, len(tops), generator=generator, dtype=torch.float64) * (tops + 1)).long()
        draw = space.restrict(draw.reshape(need, *shape))
        if bits_range is not None and attempt < max_tries:
            bits = space.avg_bits_encoded(draw)
            draw = draw[(bits >= bits_range[0]) & (bits <= bits_range[1])]
        found.extend(draw)
    return torch.stack(found) if found else torch.empty(0, *shape, dtype=torch.long)
