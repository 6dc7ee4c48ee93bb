"""Hypervolume (SPEC §7) of (metric, avg_bits) points, metric maximised and bits minimised, with bits
scaled to [0, 1] over the code family's option range ([2.0322, 8.625] for nf/int, [2.625, 8.5] for gguf)
and the reference point (metric 0, the range's top). So a single configuration at the top scores 0, and a
metric of 1 at the cheapest possible bits would score 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from coalora.quant.families import get_family


def bits_range(family: str = "nf") -> tuple[float, float]:
    """Cheapest and dearest bits per weight of the family's options."""
    code = get_family(family)
    bits = [code.bits_per_weight(o) for o in code.option_space]
    return min(bits), max(bits)


def hypervolume(points: Iterable[tuple[float, float]], family: str = "nf") -> float:
    """Dominated area of (metric, avg_bits) points; see the module docstring for the reference point."""
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    low, high = bits_range(family)
    rows = [(metric, -(bits - low) / (high - low)) for metric, bits in points]
    if not rows:
        return 0.0
    return float(
        Hypervolume(torch.tensor([0.0, -1.0], dtype=torch.float64)).compute(torch.tensor(rows).double())
    )
