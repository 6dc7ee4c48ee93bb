"""A task's configuration sets: what it is evaluated at, what training draws from, what it has trained on.

Every budget (evaluation, QLoRA's one, the training grid) is allocated by a solver that never looks at the
clock, so every method and every machine, loaded or quiet, gets the same configurations. CoA-LoRA's and
Shared-LoRA's sets are allocated on first use: a task loaded from a checkpoint gets them from the checkpoint
and never runs the allocator (the error table takes a minute on a fresh machine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from coalora.errors import CoaloraError
from coalora.quant.allocate import (
    EVAL_BUDGETS,
    budget_grid,
    cached_allocate,
    check_space_budget,
    reachable_budgets,
)
from coalora.quant.qconfig import ConfigSpace, QConfig
from coalora.tasks.methods import MethodSpec
from coalora.utils import budget_label

FP_LABEL = "fp"


class ConfigurationSets:
    """Evaluation configurations by label, the training set, and every configuration a step has used."""

    def __init__(
        self,
        space: ConfigSpace,
        method: MethodSpec,
        error_table: Callable[[], torch.Tensor],
        eval_budgets: Sequence[float] | None = None,
        train_budgets: Sequence[float] | None = None,
    ) -> None:
        """``error_table`` is called on the first allocation only (it takes tens of seconds uncached)."""
        self.space = space
        self.method = method
        self.error_table = error_table
        # the defaults, cut to what this backbone's options reach (a gguf model whose rows K-quants cannot
        # tile starts above 2.5 bits); budgets given are checked as they are
        default_eval = tuple(reachable_budgets(space, EVAL_BUDGETS))
        self.eval_budgets = default_eval if eval_budgets is None else tuple(eval_budgets)
        self.train_budgets = None if train_budgets is None else tuple(train_budgets)
        if method.quantized:  # a bad budget fails now, not at the first (lazy) allocation
            if eval_budgets is None and not self.eval_budgets:
                low, high = space.budget_range()
                raise CoaloraError(
                    f"none of the default evaluation budgets {list(EVAL_BUDGETS)} lies in the {low:.4f}.."
                    f"{high:.4f} bits {space.family_name} options reach on this model; set model.eval_budgets"
                )
            for budget in (*self.eval_budgets, *(self.train_budgets or ())):
                check_space_budget(space, budget)
        self._eval: dict[str, QConfig | None] | None = None
        self._train: list[QConfig] | None = None
        self._trained_on: dict[QConfig, None] = {}

    def allocate(self, budget: float) -> QConfig:
        """The allocated configuration for ``budget`` (error table and allocation cached on disk)."""
        return cached_allocate(self.space, self.error_table(), budget)

    @property
    def labels(self) -> list[str]:
        """Evaluation labels, known without allocating anything."""
        if self._eval is not None:
            return list(self._eval)
        return [budget_label(b) for b in self.eval_budgets]

    @property
    def eval(self) -> dict[str, QConfig | None]:
        if self._eval is None:
            self._eval = {budget_label(b): self.allocate(b) for b in self.eval_budgets}
        return self._eval

    @eval.setter
    def eval(self, configs: dict[str, QConfig | None]) -> None:
        self._eval = dict(configs)

    @property
    def train(self) -> list[QConfig]:
        if self._train is None:
            if self.method.train_set == "eval":
                self._train = [c for c in self.eval.values() if c is not None]
            else:
                grid: Sequence[float] | None = self.train_budgets
                if grid is None:
                    grid = reachable_budgets(self.space, budget_grid()) or [self.space.budget_range()[0]]
                self._train = list(dict.fromkeys(self.allocate(b) for b in grid))
        return self._train

    @train.setter
    def train(self, configs: Sequence[QConfig]) -> None:
        if not configs and self.method.quantized:
            raise CoaloraError("the training configuration set cannot be empty")
        self._train = [self.space.validate(c) for c in configs]

    def draw(self, k: int, generator: torch.Generator, low_bit: float | None = None) -> list[QConfig]:
        """``k`` distinct training configurations: uniformly, or (``low_bit``) one of them from those under
        ``low_bit`` bits and the rest uniformly from the others."""
        train = self.train
        if low_bit is None:
            return [train[int(i)] for i in torch.randperm(len(train), generator=generator)[:k]]
        low = [i for i, c in enumerate(train) if self.space.avg_bits(c) < low_bit]
        if not low:
            return [train[int(i)] for i in torch.randperm(len(train), generator=generator)[:k]]
        first = low[int(torch.randint(len(low), (1,), generator=generator))]
        others = [i for i in range(len(train)) if i != first]
        rest = [others[int(i)] for i in torch.randperm(len(others), generator=generator)[: k - 1]]
        return [train[first]] + [train[i] for i in rest]

    def fix(self, config: QConfig | None, label: str | None = None) -> None:
        """Train and evaluate at this one configuration (QLoRA, LQ-LoRA), or at full precision (None).

        ``label`` names it in metrics (default: its average bits)."""
        if label is None:
            label = FP_LABEL if config is None else budget_label(self.space.avg_bits(config))
        self._eval = {label: config}
        self._train = [] if config is None else [config]

    @property
    def trained_on(self) -> list[QConfig]:
        """Every configuration a training step has drawn, in first-use order: what evaluation calls seen."""
        return list(self._trained_on)

    def record(self, configs: Sequence[QConfig | None]) -> None:
        self._trained_on.update(dict.fromkeys(c for c in configs if c is not None))

    def state(self) -> dict:
        """What a checkpoint stores (JSON-ready)."""
        return {
            "train_configs": [c.to_json() for c in self.train],
            "trained_on": [c.to_json() for c in self.trained_on],
            "eval_configs": {k: None if c is None else c.to_json() for k, c in self.eval.items()},
        }

    def load_state(self, state: dict) -> None:
        def read(data: dict) -> QConfig:
            return self.space.validate(QConfig.from_json(data, family=self.space.family_name))

        self._train = [read(c) for c in state["train_configs"]]
        self._eval = {k: None if c is None else read(c) for k, c in state["eval_configs"].items()}
        # checkpoints from before it was recorded: the final training set is the best guess
        self._trained_on = dict.fromkeys(read(c) for c in state.get("trained_on", state["train_configs"]))
