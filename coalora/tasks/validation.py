"""The task's arguments checked before anything loads: every number against its range, and the options
that only make sense together (or apart).

Kept out of :mod:`coalora.tasks.base` so that one table, not a chain of ``if`` statements in the task's
constructor, says what each argument accepts; a value outside it would otherwise surface much later as a
ZeroDivisionError or a tensor-shape error (``rank 0``), or be silently ignored (``train_budget`` on a
qconfig run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from coalora.checks import NON_NEGATIVE, POSITIVE_INT, SEED, Bound, check_values
from coalora.errors import CoaloraError
from coalora.quant.allocate import budget_range, check_budget
from coalora.quant.error_weighting import check_error_weighting
from coalora.quant.families import check_rounding_family, family_names, get_family
from coalora.quant.rounding import ROUNDINGS
from coalora.tasks.methods import method_spec

#: the task arguments with a numeric range (the prefix ``model.`` is what the CLI calls them)
TASK_BOUNDS: dict[str, Bound] = {
    "rank": Bound(1, 4096, integer=True),
    "alpha": Bound(0, open_low=True),
    "lora_dropout": Bound(0, 1, open_high=True),
    "lr": Bound(0, 1, open_low=True),
    "mapper_lr": Bound(0, 1, open_low=True, optional=True),
    "weight_decay": NON_NEGATIVE,
    "configs_per_step": Bound(1, 1024, integer=True),
    "lqlora_iters": Bound(1, 100, integer=True),
    "mapper_embed_dim": POSITIVE_INT,
    "mapper_hidden": POSITIVE_INT,
    "quant_cache_gb": NON_NEGATIVE,
    "seed": SEED,
    "distill_weight": NON_NEGATIVE,
    "train_budgets": Bound(optional=True),
    "eval_budgets": Bound(optional=True),
    "low_bit_draw": Bound(optional=True),
    "train_budget": Bound(optional=True),
    "calibration_examples": POSITIVE_INT,
}
#: the methods a single configuration (``train_budget`` or ``qconfig``) applies to
ONE_CONFIGURATION = ("qlora", "lqlora")


def check_task_arguments(arguments: Mapping[str, Any]) -> None:
    """Raise a one-line :class:`CoaloraError` for the first argument that is out of range or conflicts."""
    check_values(arguments, TASK_BOUNDS, prefix="model.")
    method = method_spec(arguments.get("method", "coalora"))
    families = family_names(trainable=True)  # the built-in ones and any registered before the run
    family = arguments.get("code_family", "nf")
    if family not in families:
        known = "" if family not in family_names() else " (it quantizes, but runs cannot train with it yet)"
        raise CoaloraError(
            f"model.code_family must be one of {', '.join(families)}, got {family!r}{known}; "
            "pass one of those"
        )
    rounding = arguments.get("rounding", "nearest")
    if rounding not in ROUNDINGS:
        raise CoaloraError(f"model.rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    check_rounding_family(rounding, family)
    if rounding == "gptq" and method.lqlora_init:
        raise CoaloraError(
            "model.rounding gptq does not apply to lqlora (its base is LQ-LoRA's own Q(W - L)); "
            "use rounding: nearest, or method qlora with rounding: gptq"
        )
    weighting = check_error_weighting(arguments.get("error_weighting", "none"), "model.error_weighting")
    if weighting != "none" and method.name in ONE_CONFIGURATION:
        raise CoaloraError(
            f"model.error_weighting {weighting} cannot apply to method '{method.name}': its configuration is "
            f"fixed while the task is built, before any data; drop it, or write a qconfig with `coalora "
            f"allocate --error-weighting {weighting} --glue-task TASK --out FILE` and pass model.qconfig FILE"
        )
    options = get_family(family).option_space  # budgets are in the family's bits per weight
    for name in ("train_budgets", "eval_budgets"):
        for budget in arguments.get(name) or ():
            check_budget(budget, options)
    eval_budgets = list(arguments.get("eval_budgets") or ())
    twice = [b for i, b in enumerate(eval_budgets) if b in eval_budgets[:i]]
    if twice:
        raise CoaloraError(f"model.eval_budgets lists {twice[0]:g} twice; give each budget once")
    low_bit = arguments.get("low_bit_draw")
    if low_bit is not None:
        low, high = budget_range(options)
        Bound(low, high).check("model.low_bit_draw", low_bit, "pass a budget in bits, or null to turn it off")
    if not (method.uses_mapper and arguments.get("use_mapper", True)):
        for name, default in (("mapper_lr", None), ("mapper_sees_config", True)):
            if arguments.get(name, default) != default:
                raise CoaloraError(
                    f"model.{name} is set but method '{method.name}' has no mapper here (use_mapper false, "
                    f"or a method without one); drop {name}"
                )
    _check_one_configuration(method.name, arguments.get("train_budget"), arguments.get("qconfig"), options)


def _check_one_configuration(
    method: str, budget: float | None, qconfig: str | None, options: Sequence[Any]
) -> None:
    """qlora/lqlora train at exactly one configuration; every other method has no use for one."""
    if method in ONE_CONFIGURATION:
        if budget is None and qconfig is None:
            raise CoaloraError(f"method '{method}' trains for one configuration; set train_budget or qconfig")
        if budget is not None and qconfig is not None:
            raise CoaloraError(
                f"method '{method}' got both train_budget ({budget:g}) and qconfig ('{qconfig}'); set one "
                "(with the baseline overlay, which sets train_budget, add --model.train_budget null)"
            )
        if budget is not None:
            check_budget(budget, options)
        return
    given = "train_budget" if budget is not None else "qconfig" if qconfig is not None else None
    if given is not None:
        raise CoaloraError(
            f"model.{given} only applies to methods {' and '.join(ONE_CONFIGURATION)}, not '{method}'; "
            f"drop it or set --model.method qlora"
        )


def check_trainable(task: Any) -> None:
    """A task about to be fitted has configurations to train on (``train_budgets: []`` builds a task
    for export or evaluation only)."""
    if task.method.train_set == "grid" and task.hparams.get("train_budgets") == []:
        raise CoaloraError(
            "model.train_budgets is an empty list, so there is nothing to train on; "
            "give at least one budget, or leave it unset for the default grid"
        )
