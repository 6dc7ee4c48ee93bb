"""The task's error table (issue 24, item 6): what the training grid and the evaluation budgets are allocated
from, weighted as ``error_weighting`` says (:mod:`coalora.quant.error_weighting`).

``none`` needs only the backbone. ``fisher`` and ``activation`` need the run's *training* rows, so the table
is built on first use, not in the constructor: ``fit`` attaches its data module in ``setup`` and the sets are
allocated in ``on_fit_start``; :func:`~coalora.tasks.checkpoint.load_task` attaches a factory of the
checkpoint's data module, which is only called if a budget the checkpoint lacks is asked for (its
configuration sets come from the checkpoint and are never reallocated). Activation statistics are the base
model's (adapter off) at any time, so a table rebuilt after training is the one training was allocated from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from coalora.errors import CoaloraError
from coalora.quant.error_table import cached_error_table
from coalora.quant.targets import target_weights

if TYPE_CHECKING:
    from coalora.nn.model import CoALoRAModel

#: a data module, or a function that builds one when a weighted table first needs it
AllocationData = Any


class WeightedAllocation:
    """Mixin for the task: :meth:`error_table`, weighted by ``error_weighting``."""

    if TYPE_CHECKING:
        model: CoALoRAModel
        fingerprint: str
        _error_table: torch.Tensor | None

        @property
        def hparams(self) -> Any: ...

        def input_statistics(self, datamodule: Any, adapter: bool) -> dict: ...

    #: where a weighted table's statistics come from (None: not given yet)
    allocation_data: AllocationData = None

    def use_allocation_data(self, data: AllocationData) -> None:
        """Take a weighted table's statistics from ``data``: the run's data module, or a function that
        builds it (called at most once, and only if a weighted table has to be computed)."""
        self.allocation_data = data

    def error_table(self) -> torch.Tensor:
        """The allocator's error table for this backbone and weighting (cached on disk, and here after the
        first use)."""
        if self._error_table is None:
            weights = target_weights(self.model.backbone, self.model.space.targets)
            weighting = self.hparams.get("error_weighting", "none")
            fisher = hessians = None
            if weighting == "fisher":
                fisher = self.fisher_statistics(self.allocation_datamodule(weighting), weights)
            elif weighting == "activation":
                hessians = self.input_statistics(self.allocation_datamodule(weighting), adapter=False)
            family = self.hparams.code_family
            self._error_table = cached_error_table(weights, family=family, fisher=fisher, hessians=hessians)
        return self._error_table

    def allocation_datamodule(self, weighting: str) -> Any:
        """The data module the statistics come from, built now if a factory was given."""
        data = self.allocation_data
        if data is None:
            raise CoaloraError(
                f"model.error_weighting {weighting} takes its statistics from the run's training data, which "
                "this task was not given; fit it with a data module, load it with load_task, or call "
                "task.use_allocation_data(datamodule)"
            )
        if callable(data):  # a factory (data modules are not callable)
            data = data()
            self.allocation_data = data
        return data

    def fisher_statistics(self, datamodule: Any, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The empirical Fisher from the first :data:`~coalora.quant.error_weighting.FISHER_EXAMPLES`
        training examples of the calibration permutation (cached on disk by :func:`cached_fisher`)."""
        from coalora.quant.error_weighting import FISHER_EXAMPLES, training_texts
        from coalora.quant.fisher import cached_fisher

        hp = self.hparams
        texts = training_texts(datamodule, FISHER_EXAMPLES, hp.seed)
        targets = self.model.space.targets
        return cached_fisher(hp.model_name, texts, targets, weights, num_samples=FISHER_EXAMPLES)
