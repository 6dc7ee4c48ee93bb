"""A callback for the DDP tests: each rank writes what it trained on, how many gradient all-reduces it ran
and a digest of its trained parameters to a JSON file."""

from __future__ import annotations

import hashlib
import json
import os

import lightning as L
import torch


def _digest(configs) -> str:
    return hashlib.sha256(json.dumps([c.to_json() for c in configs], sort_keys=True).encode()).hexdigest()[
        :16
    ]


class RecordConfigs(L.Callback):
    """Records the rank's training set and the configurations of each step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps: list[str] = []
        self.allreduces = 0

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_allreduce(state, bucket):
            self.allreduces += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(_digest([c for c in pl_module.sample_configs() if c is not None]))

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.json")
        with open(path, "w") as handle:
            trained = [p.detach().flatten() for p in pl_module.model.trainable_parameters()]
            record = {
                "train_set": _digest(pl_module.train_configs),
                "steps": self.steps,
                "optimizer_steps": trainer.global_step,
                "allreduces": self.allreduces,
                "parameters": hashlib.sha256(torch.cat(trained).numpy().tobytes()).hexdigest()[:16],
            }
            json.dump(record, handle)
