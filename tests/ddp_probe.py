"""A callback for the DDP tests: each rank writes what it trained on to a JSON file."""

from __future__ import annotations

import hashlib
import json
import os

import lightning as L


def _digest(configs) -> str:
    return hashlib.sha256(json.dumps([c.to_json() for c in configs], sort_keys=True).encode()).hexdigest()[
        :16
    ]


class RecordConfigs(L.Callback):
    """Records the rank's training set and the configurations of each step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(_digest([c for c in pl_module.sample_configs() if c is not None]))

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.json")
        with open(path, "w") as handle:
            json.dump({"train_set": _digest(pl_module.train_configs), "steps": self.steps}, handle)
