"""The task's checkpoint hooks: what a checkpoint keeps of a task, and the checks when one is loaded.

A checkpoint holds what training changed (LoRA, mapper, head) and the configuration sets, not the frozen
backbone: loading rebuilds it from ``model_name`` and checks the weights' fingerprint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from coalora.errors import CoaloraError

if TYPE_CHECKING:
    from coalora.tasks.configurations import ConfigurationSets

    _TaskModule = nn.Module
else:
    _TaskModule = object


class CheckpointState(_TaskModule):
    """Mixin for the task: Lightning's ``on_save_checkpoint``/``on_load_checkpoint``."""

    if TYPE_CHECKING:
        task_type: ClassVar[str]
        fingerprint: str
        configs: ConfigurationSets

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save what training changed (LoRA, mapper, head) and the configuration sets, not the frozen
        backbone: loading rebuilds it from ``model_name`` and checks the weights' fingerprint."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["coalora"] = {
            "task": self.task_type,
            "fingerprint": self.fingerprint,
            **self.configs.state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("coalora")
        if state is None:
            raise CoaloraError("checkpoint has no coalora state; was it written by `coalora fit`?")
        written_by = state.get("task", self.task_type)
        if written_by != self.task_type:
            raise CoaloraError(
                f"checkpoint was written by a '{written_by}' task, not '{self.task_type}'; "
                "load it with that task (or `coalora evaluate`, which picks the task itself)"
            )
        if state["fingerprint"] != self.fingerprint:
            raise CoaloraError(
                f"checkpoint was trained on another backbone (weights {state['fingerprint']}, "
                f"this model {self.fingerprint}); pass the model_name it was trained with"
            )
        for key, value in self.state_dict().items():  # the frozen backbone, verified by the fingerprint above
            checkpoint["state_dict"].setdefault(key, value)
        self.configs.load_state(state)
