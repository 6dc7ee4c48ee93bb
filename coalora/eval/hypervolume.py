"""Hypervolume (SPEC §7) of (metric, avg_bits) points, metric maximised and bits minimised, with bits
scaled to [0, 1] over the option space's range [2.0322, 8.625] and the reference point (metric 0, bits
8.625). So a single configuration at 8.625 bits scores 0, and a metric of 1 at the cheapest possible bits
would score 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from coalora.quant.options import OPTION_SPACE

MIN_BITS = min(o.storage_bits for o in OPTION_SPACE)

MAX_BITS = max(o.storage_bits for o in OPTION_SPACE)


def hypervolume(points: Iterable[tuple[float, float]]) -> float:
    """Dominated area of (metric, avg_bits) points; see the module docstring for the reference point."""
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    rows = [(metric, -(bits - MIN_BITS) / (MAX_BITS - MIN_BITS)) for metric, bits in points]
    if not rows:
        return 0.0
    return float(
        Hypervolume(torch.tensor([0.0, -1.0], dtype=torch.float64)).compute(torch.tensor(rows).double())
    )
