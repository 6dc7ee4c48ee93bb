"""The search archive: every configuration seen so far (as (N, 5) option indices) with its latest scores."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from coalora.quant.qconfig import ConfigSpace

#: the format of the archive file a search round writes (``search_archive.json``)
ARCHIVE_FORMAT = "coalora.search_archive/1"


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

    def to_json(
        self,
        space: ConfigSpace,
        training: Collection[int],
        on_front: Tensor,
        rescored: Collection[int],
        header: dict,
    ) -> dict:
        """The archive as the round's JSON file: ``header`` (epoch, mode, reference point, hypervolume),
        then one entry per configuration (its qconfig, scores, and whether it trains, is on the front,
        was scored this round)."""
        entries = []
        for i in range(len(self)):
            f1, f2 = float(self.f1[i]), float(self.f2[i])
            entries.append(
                {
                    "qconfig": space.decode(self.encoded[i]).to_json(avg_bits=f2),
                    "f1": f1 if math.isfinite(f1) else None,
                    "f2": f2,
                    "epoch": int(self.epoch[i]),
                    "training": i in training,
                    "pareto": bool(on_front[i]),
                    "rescored": i in rescored,
                }
            )
        return {"format": ARCHIVE_FORMAT, **header, "entries": entries}

    def state_dict(self) -> dict:
        return {"encoded": self.encoded.to(torch.int8), "f1": self.f1, "f2": self.f2, "epoch": self.epoch}

    @classmethod
    def from_state(cls, state: dict) -> Archive:
        return cls(state["encoded"].long(), state["f1"].double(), state["f2"].double(), state["epoch"].long())


def encoding_key(encoded: Tensor) -> bytes:
    return encoded.to(torch.int8).numpy().tobytes()
