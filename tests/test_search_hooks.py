"""The search callback's Lightning hooks keep Lightning's signatures and refuse a foreign module."""

from __future__ import annotations

import inspect

import lightning as L
import pytest

from callbacks.pareto_search import ParetoConfigSearch
from coalora.errors import CoaloraError


def test_the_hooks_take_lightnings_arguments():
    for hook in ("on_train_epoch_end", "on_train_epoch_start", "on_train_batch_end"):
        ours = list(inspect.signature(getattr(ParetoConfigSearch, hook)).parameters)
        theirs = list(inspect.signature(getattr(L.Callback, hook)).parameters)
        assert ours == theirs, hook


class _Trainer:
    current_epoch = 0


def test_a_module_that_is_not_a_coalora_task_is_refused_in_one_line():
    with pytest.raises(CoaloraError, match="coalora task's configurations, got a LightningModule") as err:
        ParetoConfigSearch().on_train_epoch_end(_Trainer(), L.LightningModule())  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
