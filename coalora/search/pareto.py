"""Pareto utilities for the two minimised objectives (f1 = task loss, f2 = avg bits): reference point,
hypervolume, non-dominated rows, and the segment-wise Pareto filter (SPEC §5 step 6). botorch maximises, so
everything handed to it is negated."""

from __future__ import annotations

import torch
from botorch.utils.multi_objective.box_decompositions import (
    DominatedPartitioning,
)
from botorch.utils.multi_objective.pareto import is_non_dominated
from torch import Tensor

from coalora.errors import CoaloraError

#: Relative margin of the reference point beyond the worst observation in each objective.
REF_MARGIN = 0.1


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
