"""Which archive entries a search round re-scores, and what the others' scores become.

Scoring is most of a round's cost (each configuration is a forward pass over the whole search split), and
re-scoring the whole archive every round grows with it. What the next round acts on is the training set,
the archive's Pareto front (the entries the segment filter may pick) and the new candidates; every other
entry was dominated when last scored, and training moves all losses down together, so its old score plus
the shift measured on the re-scored entries stands in for a fresh one.

Policies (``ParetoConfigSearch(rescore=...)``):

- ``all``: every entry, every round (the behaviour before; costs grow with the archive).
- ``relevant``: the training set, the front and never-scored entries; the rest are shifted by the median
  change of the re-scored entries that had a score before.
- ``new``: only never-scored entries; old scores stay as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor

from coalora.search.archive import Archive
from coalora.search.pareto import pareto_mask

RESCORE_POLICIES = ("all", "relevant", "new")


def rows_to_score(archive: Archive, current_rows: Tensor, policy: str) -> Tensor:
    """Sorted archive rows a round scores before proposing, under ``policy``."""
    everything = torch.arange(len(archive))
    unscored = archive.f1.isnan()
    if policy == "all":
        return everything
    if policy == "new":
        return everything[unscored]
    wanted = unscored.clone()
    wanted[current_rows] = True
    scored = archive.f1.isfinite().nonzero().squeeze(1)
    if len(scored):
        wanted[scored[pareto_mask(archive.objectives(scored))]] = True
    return everything[wanted]


def carry_drift(archive: Archive, rescored: Tensor, before: Tensor) -> float:
    """Shift every scored entry outside ``rescored`` by the median change of the ``rescored`` ones that had
    a score (``before``: their f1 before this round). Returns the shift (0 when nothing to measure)."""
    had = before.isfinite()
    if not had.any():
        return 0.0
    shift = float((archive.f1[rescored][had] - before[had]).median())
    stale = archive.f1.isfinite()
    stale[rescored] = False
    archive.f1[stale] += shift
    return shift
