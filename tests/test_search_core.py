"""The Pareto-based configuration search's pure core on a synthetic problem (the callback: test_search.py).

The synthetic problem shares the real ConfigSpace encoding: f1 is the log of a numel-weighted quantization-
error proxy that falls with every field's precision, f2 the exact avg_bits, so they conflict and the front
is known to run from ~2 to ~8.6 bits.
"""

from __future__ import annotations

import math

import pytest
import torch

from coalora.errors import CoaloraError
from coalora.quant.options import FIELD_SIZES, OPTION_SPACE, QuantOption
from coalora.quant.qconfig import ConfigSpace
from coalora.quant.targets import TargetMatrix
from coalora.search import (
    candidates,
    pareto,
    surrogate,
)
from coalora.search.archive import Archive, encoding_key

# --------------------------------------------------------------------------------------- synthetic problem


def synthetic_space(blocks: int = 3) -> ConfigSpace:
    shapes = [(64, 64), (64, 64), (128, 64), (64, 128)]
    targets = [
        TargetMatrix(f"layer.{b}.m{j}", f"m{j}", b, out, inp)
        for b in range(blocks)
        for j, (out, inp) in enumerate(shapes)
    ]
    return ConfigSpace(targets, model="synthetic")


def synthetic_f1(space: ConfigSpace, seed: int = 1):
    """f1(encoded (..., N, 5)) = log of a numel-weighted error proxy; falls as any field gets finer."""
    weight = torch.rand(len(space), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    table = torch.zeros(*FIELD_SIZES, dtype=torch.float64)
    for o in OPTION_SPACE:
        table[o.indices] = (
            2.0 ** (-2 * o.bits)
            * (1 + 2.0 ** (1 - o.scale_bits))
            * (o.block / 64) ** 0.5
            * (1 + 0.1 * math.log2(o.block2 / 16))
            * (1.0 if o.scale2_dtype == "fp32" else 1.3)
        )

    def f1(encoded: torch.Tensor) -> torch.Tensor:
        errors = table[tuple(encoded[..., i] for i in range(len(FIELD_SIZES)))]
        return torch.log((errors * weight * space.numel).sum(-1) / space.total_numel)

    return f1


def initial_archive(space: ConfigSpace, f1) -> Archive:
    """Four uniform configurations (2, 3, 4, 8 bits) and six random ones, all scored."""
    uniform = [space.encode(space.uniform(QuantOption(b, 8, "fp32", 64, 256))) for b in (2, 3, 4, 8)]
    encoded = torch.cat(
        [torch.stack(uniform), candidates.random_encodings(space, 6, torch.Generator().manual_seed(100))]
    )
    archive = Archive()
    archive.add(encoded, space.avg_bits_encoded(encoded))
    archive.f1 = f1(archive.encoded)
    return archive


def score_new(archive: Archive, space: ConfigSpace, encoded: torch.Tensor, f1) -> None:
    rows = archive.add(encoded, space.avg_bits_encoded(encoded))
    archive.f1[rows] = f1(archive.encoded[rows])


FAST = candidates.SearchSettings(num_starts=5, max_steps=10, gp_maxiter=50)

# ------------------------------------------------------------------------------------------ pure core


def test_search_beats_random_sampling_in_hypervolume() -> None:
    space = synthetic_space()
    f1 = synthetic_f1(space)
    found = initial_archive(space, f1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        score_new(found, space, candidates.propose(space, found, generator, FAST), f1)
    sampled = initial_archive(space, f1)
    extra = len(found) - len(sampled)
    assert extra >= 15  # the search really proposed new configurations each round
    score_new(sampled, space, candidates.random_encodings(space, extra, torch.Generator().manual_seed(0)), f1)
    assert len(sampled) == len(found)

    ref = pareto.reference_point(torch.cat([found.objectives(), sampled.objectives()]))
    start = pareto.hypervolume(initial_archive(space, f1).objectives(), ref)
    gain_search = pareto.hypervolume(found.objectives(), ref) - start
    gain_random = pareto.hypervolume(sampled.objectives(), ref) - start
    assert gain_search > 0
    assert gain_search > gain_random + 0.25 * gain_search


@pytest.mark.parametrize(
    "y",
    [
        torch.tensor([[0.7, 3.0]]),  # a single point
        torch.tensor([[0.7, 3.0], [0.7, 3.0], [0.7, 3.0]]),  # constant columns
        torch.tensor([[-5.0, 2.1], [-4.0, 2.0], [-6.0, 8.6]]),  # negative losses
        torch.tensor([[0.0, 0.0], [0.0, 4.0]]),  # zeros: the authors' (0, 0) would sit on a point
        torch.tensor([[1e9, 3.0], [1e9 + 1e-6, 3.0]], dtype=torch.float64),  # a spread lost in rounding
    ],
)
def test_reference_point_is_dominated_by_every_observation(y: torch.Tensor) -> None:
    ref = pareto.reference_point(y)
    assert (y < ref).all()


def test_reference_point_on_random_archives() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        y = torch.randn(int(torch.randint(1, 30, (1,), generator=generator)), 2, generator=generator) * 3
        assert (y < pareto.reference_point(y)).all()
    with pytest.raises(CoaloraError, match="at least one"):
        pareto.reference_point(torch.empty(0, 2))


def test_segment_filter_keeps_every_covered_segment_and_only_its_front() -> None:
    generator = torch.Generator().manual_seed(0)
    low, high, segments = 2.25, 7.15, 40
    f2 = torch.linspace(low, high - 1e-6, 400, dtype=torch.float64)
    f1 = -0.1 * f2 + 0.3 * torch.rand(400, generator=generator, dtype=torch.float64)  # noisy trade-off
    y = torch.stack([f1, f2], dim=-1)
    kept = pareto.segment_filter(y, segments, (low, high))

    segment_of = ((y[:, 1] - low) / ((high - low) / segments)).floor().long()
    assert set(segment_of[kept].tolist()) == set(range(segments))  # every segment stays populated
    assert torch.equal(kept, kept[torch.argsort(y[kept, 1], stable=True)])  # by rising bits
    for s in range(segments):
        rows = (segment_of == s).nonzero().squeeze(1)
        mine = kept[segment_of[kept] == s]
        for r in rows.tolist():
            dominated = ((y[mine] <= y[r]).all(-1) & (y[mine] < y[r]).any(-1)).any()
            assert bool(dominated) != (r in mine.tolist())  # kept iff non-dominated in its segment
    # a global front loses coverage: the segments are what keeps low and high budgets
    assert int(pareto.pareto_mask(y).sum()) < len(kept)


def test_segment_filter_puts_outliers_into_the_end_segments() -> None:
    y = torch.tensor([[0.5, 2.0], [0.4, 2.3], [0.3, 9.0], [0.2, 7.0]], dtype=torch.float64)
    kept = pareto.segment_filter(y, 4, (2.25, 7.15))
    assert kept.tolist() == [0, 1, 3]  # 2.0 shares 2.3's segment, neither dominates; 7.0 dominates 9.0
    with pytest.raises(CoaloraError):
        pareto.segment_filter(y, 0, (2.25, 7.15))
    with pytest.raises(CoaloraError):
        pareto.segment_filter(y, 4, (3.0, 3.0))


def test_coordinate_ascent_climbs_from_bounds_by_differences_not_raw_values() -> None:
    tops = torch.tensor([3, 3, 2, 2, 2])
    target = torch.tensor([2, 0, 1, 2, 0])
    calls = []

    def value(x: torch.Tensor) -> torch.Tensor:  # negative everywhere: raw values would never "improve"
        calls.append(len(x))
        return -100.0 - ((x * tops - target) ** 2).sum(-1)

    starts = torch.tensor([[0, 3, 2, 0, 2], [3, 0, 0, 2, 1]])
    found = candidates.coordinate_ascent(value, starts, tops, max_steps=20)
    assert torch.equal(found, target.expand(2, -1))
    assert all(n <= 2 * 2 * len(tops) for n in calls[1:])  # one batched call per step for all starts
    assert len(calls) <= 1 + 20


def test_coordinate_ascent_respects_max_steps_and_range() -> None:
    tops = torch.tensor([3, 2])

    def value(x: torch.Tensor) -> torch.Tensor:
        return (x * tops).sum(-1)  # grows without bound inside the box: the ascent must stop at the edge

    start = torch.tensor([[0, 0]])
    assert (candidates.coordinate_ascent(value, start, tops, max_steps=1) - start).abs().sum() == 1
    assert torch.equal(candidates.coordinate_ascent(value, start, tops, max_steps=50), tops.unsqueeze(0))
    flat = candidates.coordinate_ascent(lambda x: torch.zeros(len(x), dtype=torch.float64), start, tops)
    assert torch.equal(flat, start)  # nothing improves: stay


def test_marginal_gp_matches_the_exact_posterior() -> None:
    space = synthetic_space(1)
    archive = initial_archive(space, synthetic_f1(space))
    x = space.normalise(archive.encoded)
    gp = surrogate.fit_gp(x, archive.f1, maxiter=30)
    test = space.normalise(candidates.random_encodings(space, 7, torch.Generator().manual_seed(1)))
    test = torch.cat([test, x[:3]])
    with torch.no_grad():
        fast = surrogate.MarginalGP(gp).posterior(test.unsqueeze(1))
        exact = gp.posterior(test)
    assert torch.allclose(fast.mean.reshape(-1), exact.mean.reshape(-1), atol=1e-9)
    assert torch.allclose(fast.variance.reshape(-1), exact.variance.reshape(-1), atol=1e-9)


def test_encoding_bits_is_exact_avg_bits() -> None:
    space = synthetic_space(1)
    encoded = candidates.random_encodings(space, 5, torch.Generator().manual_seed(2))
    bits = surrogate.EncodingBits(space)(space.normalise(encoded))
    expected = torch.tensor([space.avg_bits(space.decode(e)) for e in encoded], dtype=torch.float64)
    assert torch.allclose(bits, expected, atol=1e-12)


def test_degenerate_archives_do_not_crash() -> None:
    space = synthetic_space(1)
    generator = torch.Generator().manual_seed(0)
    one = Archive()
    encoded = space.encode(space.uniform(QuantOption())).unsqueeze(0)
    one.add(encoded, space.avg_bits_encoded(encoded))
    one.f1[:] = 0.7
    found = candidates.propose(space, one, generator, FAST)  # a single scored point
    assert 0 < len(found) <= FAST.num_starts

    flat = Archive()
    encoded = torch.zeros(6, len(space), 5, dtype=torch.long)  # constant columns everywhere but one
    encoded[:, 0, 0] = torch.tensor([0, 1, 2, 3, 0, 1])
    flat.add(encoded, space.avg_bits_encoded(encoded))
    flat.f1[:] = 1.0  # constant outcome too
    assert len(candidates.propose(space, flat, generator, FAST)) > 0

    assert len(candidates.propose(space, Archive(), generator, FAST)) == 0  # nothing scored yet
    with pytest.raises(CoaloraError, match="candidate_method"):
        candidates.propose(space, one, generator, candidates.SearchSettings(candidate_method="grid"))


def test_no_candidates_when_the_archive_holds_the_whole_space() -> None:
    space = ConfigSpace([TargetMatrix("layer.0.q", "q", 0, 64, 64)], model="one-matrix")
    encoded = torch.tensor([o.indices for o in OPTION_SPACE]).unsqueeze(1)  # all 432 configurations
    archive = Archive()
    archive.add(encoded, space.avg_bits_encoded(encoded))
    archive.f1 = synthetic_f1(space)(archive.encoded)
    settings = candidates.SearchSettings(num_starts=3, max_steps=3, gp_maxiter=10)
    found = candidates.propose(space, archive, torch.Generator().manual_seed(0), settings)
    assert found.shape == (0, 1, 5)


def test_botorch_local_search_switch() -> None:
    space = synthetic_space(1)
    f1 = synthetic_f1(space)
    archive = initial_archive(space, f1)
    settings = candidates.SearchSettings(num_starts=2, candidate_method="botorch", gp_maxiter=30)
    state = torch.random.get_rng_state()
    found = candidates.propose(space, archive, torch.Generator().manual_seed(0), settings)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert 0 < len(found) <= 2
    assert (found >= 0).all() and (found <= surrogate.field_tops(1).reshape(1, 5)).all()
    assert not set(archive.keys()) & {encoding_key(e) for e in found}


def test_proposals_are_reproducible_from_the_generator() -> None:
    space = synthetic_space(1)
    archive = initial_archive(space, synthetic_f1(space))
    first = candidates.propose(space, archive, torch.Generator().manual_seed(5), FAST)
    again = candidates.propose(space, archive, torch.Generator().manual_seed(5), FAST)
    assert torch.equal(first, again)


def test_archive_add_deduplicates_and_round_trips() -> None:
    space = synthetic_space(1)
    encoded = candidates.random_encodings(space, 3, torch.Generator().manual_seed(0))
    archive = Archive()
    rows = archive.add(
        torch.cat([encoded, encoded[:1]]), space.avg_bits_encoded(torch.cat([encoded, encoded[:1]]))
    )
    assert rows.tolist() == [0, 1, 2, 0]
    assert archive.f1.isnan().all() and (archive.epoch == -1).all()
    assert archive.add(encoded[1:2], space.avg_bits_encoded(encoded[1:2])).tolist() == [1]
    back = Archive.from_state(archive.state_dict())
    assert torch.equal(back.encoded, archive.encoded) and torch.equal(back.f2, archive.f2)


def test_fit_rows_cap_keeps_the_training_set_and_the_newest() -> None:
    scored = torch.arange(10)
    assert torch.equal(candidates._fit_rows(scored, torch.tensor([1, 2]), 20), scored)
    assert candidates._fit_rows(scored, torch.tensor([1, 2]), 5).tolist() == [1, 2, 7, 8, 9]
    assert candidates._fit_rows(scored, None, 3).tolist() == [7, 8, 9]


def test_random_encodings_respect_the_bits_range() -> None:
    space = synthetic_space(1)
    encoded = candidates.random_encodings(space, 20, torch.Generator().manual_seed(0), (4.0, 5.0))
    bits = space.avg_bits_encoded(encoded)
    assert len(encoded) == 20 and ((bits >= 4.0) & (bits <= 5.0)).all()
