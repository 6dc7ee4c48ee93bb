"""Run a block on a fixed number of torch CPU threads.

Quantizing, GP fitting and candidate search are chains of short ops that gain little from a second thread,
and OpenMP's barriers make them many times slower whenever another process holds a core.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Limit torch's CPU threads to ``count`` for the block (None: leave them as they are)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
