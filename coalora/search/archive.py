"""The search archive: every configuration seen so far (as (N, 5) option indices) with its latest scores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


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
        return {encoding_key(e): i for i, e in enumerate(self.encoded)}

    def add(self, encoded: Tensor, f2: Tensor) -> Tensor:
        """Append the configurations not yet present (f1 unscored); return every row's archive index."""
        known = self.keys()
        rows: list[int] = []
        fresh: list[int] = []
        for pos, e in enumerate(encoded):
            k = encoding_key(e)
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


def encoding_key(encoded: Tensor) -> bytes:
    return encoded.to(torch.int8).numpy().tobytes()
