"""Which archive entries a search round scores again, and how the others' scores follow (issue #25)."""

from __future__ import annotations

import math

import pytest
import torch

from callbacks import ParetoConfigSearch
from coalora.errors import CoaloraError
from coalora.search.archive import Archive
from coalora.search.rescoring import carry_drift, rows_to_score


def archive(f1: list[float], f2: list[float]) -> Archive:
    n = len(f1)
    encoded = torch.arange(n * 3 * 5).reshape(n, 3, 5) % 7
    return Archive(
        encoded,
        torch.tensor(f1, dtype=torch.float64),
        torch.tensor(f2, dtype=torch.float64),
        torch.zeros(n, dtype=torch.long),
    )


def test_relevant_is_the_set_the_front_and_the_unscored() -> None:
    # front (minimise both): rows 0 (0.1, 4), 2 (0.3, 3), 4 (0.5, 2); row 1, 3 dominated; row 5 unscored
    a = archive([0.1, 0.4, 0.3, 0.6, 0.5, math.nan, 0.9], [4.0, 4.0, 3.0, 3.0, 2.0, 2.5, 5.0])
    current = torch.tensor([6, 3])
    assert rows_to_score(a, current, "relevant").tolist() == [0, 2, 3, 4, 5, 6]
    assert rows_to_score(a, current, "all").tolist() == list(range(7))
    assert rows_to_score(a, current, "new").tolist() == [5]


def test_a_fresh_archive_is_scored_whole_under_every_policy() -> None:
    a = archive([math.nan] * 4, [2.0, 3.0, 4.0, 5.0])
    for policy in ("all", "relevant", "new"):
        assert rows_to_score(a, torch.tensor([1]), policy).tolist() == [0, 1, 2, 3]


def test_stale_scores_move_by_the_median_change_of_the_rescored() -> None:
    a = archive([1.0, 2.0, 3.0, 4.0, math.nan], [2.0, 3.0, 4.0, 5.0, 6.0])
    rescored = torch.tensor([0, 1, 2, 4])
    before = a.f1[rescored].clone()
    a.f1[rescored] = torch.tensor([0.7, 1.9, 2.5, 0.3], dtype=torch.float64)  # changes -0.3, -0.1, -0.5
    shift = carry_drift(a, rescored, before)
    assert shift == pytest.approx(-0.3)
    assert a.f1.tolist() == pytest.approx([0.7, 1.9, 2.5, 3.7, 0.3])  # only row 3 (stale) moved


def test_no_shift_without_an_earlier_score() -> None:
    a = archive([math.nan, 5.0], [2.0, 3.0])
    rescored = torch.tensor([0])
    before = a.f1[rescored].clone()
    a.f1[0] = 1.0
    assert carry_drift(a, rescored, before) == 0.0 and a.f1[1] == 5.0


def test_rescore_and_its_older_name() -> None:
    assert ParetoConfigSearch().rescore == "relevant"
    assert ParetoConfigSearch(refresh_archive=True).rescore == "all"
    assert ParetoConfigSearch(refresh_archive=False).rescore == "new"
    assert ParetoConfigSearch(rescore="all").rescore == "all"
    with pytest.raises(CoaloraError, match="rescore or refresh_archive"):
        ParetoConfigSearch(rescore="all", refresh_archive=True)
    with pytest.raises(CoaloraError, match="unknown rescore 'some'"):
        ParetoConfigSearch(rescore="some")
