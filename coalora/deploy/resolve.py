"""Which configuration a checkpoint serves: a bit budget, a qconfig or a byte budget turned into one,
checked against what the checkpoint's method was trained to serve (``serves`` in its row of the method
table: coalora and shared any configuration, qlora and lqlora only their own, fp full precision by default
and any configuration post-training quantized, best with ``rounding: gptq``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from coalora.deploy.layout import Resolution
from coalora.deploy.sizes import fixed_nbytes, packed_nbytes, quantized_nbytes
from coalora.errors import CoaloraError
from coalora.quant.allocate import cached_allocate
from coalora.quant.qconfig import QConfig
from coalora.utils import budget_label

if TYPE_CHECKING:
    from coalora.tasks.base import CoALoRATask


def check_serves(module: CoALoRATask, config: QConfig | None) -> None:
    """Refuse a configuration the checkpoint's method was not trained to serve.

    coalora and shared serve any configuration (the mapper adjusts, or one adapter is shared by design);
    qlora and lqlora only the configuration they were trained for (lqlora's base is Q(W − L) for it);
    fp full precision, or any configuration quantized after training (the recipe users know: fine-tune,
    then quantize; per configuration, and activation-aware with ``rounding: gptq``).
    """
    method = module.method.name
    space = module.model.space
    if module.method.serves == "any":
        if config is None:
            raise CoaloraError(
                f"checkpoint is a {method} model that serves quantized configurations; "
                "choose one with --budget, --qconfig or --max-bytes"
            )
        return
    if module.method.serves == "fp":
        return
    own = module.own_config
    if config != own:
        assert own is not None and config is not None  # a fixed method always has its own configuration
        differ = sum(config.matrices[n] != own.matrices[n] for n in space.names)
        raise CoaloraError(
            f"checkpoint is a {method} adapter trained for one configuration "
            f"({space.avg_bits(own):.4f} bits); the requested one ({space.avg_bits(config):.4f} bits, "
            f"{differ} of {len(space)} matrices differ) needs its own adapter: export it without "
            "--budget/--qconfig/--max-bytes, or use a coalora checkpoint"
        )


def config_for_budget(module: CoALoRATask, budget: float) -> QConfig:
    """The allocator's configuration for ``budget`` bits; the checkpoint's own if it evaluated that budget.
    Allocations are remembered on disk per (error table, budget, solver), as training's are: the solve
    (0.2-1.6 s on MiniLM) runs once per machine, not once per process."""
    known = module.eval_configs.get(budget_label(budget))
    if known is not None and abs(float(budget_label(budget)) - budget) < 1e-12:
        return known
    return cached_allocate(module.model.space, module.error_table(), budget)


def config_for_bytes(module: CoALoRATask, max_bytes: int, max_solves: int = 4) -> tuple[QConfig, float]:
    """The allocator's configuration at the largest bit budget whose weights fit ``max_bytes``.

    Weights are the quantized matrices plus the full-precision parts and the folded adapter (file headers,
    tokenizer and JSON are not counted). A configuration's packed size is avg_bits·N/8 plus a few bytes of
    rounding per matrix, bounded per matrix over all options; so every budget below ``low`` fits, none
    above ``high`` does, and a short bisection between them (at most ``max_solves`` allocator solves, as
    the solver can take many seconds per budget) finds the budget to within a few bytes.
    Returns the configuration and the budget it was allocated for.
    """
    space = module.model.space
    quantized_cap = max_bytes - fixed_nbytes(module)
    family, options = space.family, space.family.option_space
    exact = [[packed_nbytes(o, t.numel, family.name) for o in options] for t in space.targets]
    rounding = [
        [size - family.bits_per_weight(o) * t.numel / 8 for size, o in zip(row, options)]
        for row, t in zip(exact, space.targets)
    ]
    smallest = sum(min(row) for row in exact)
    if quantized_cap < smallest:
        need = max_bytes - quantized_cap + smallest
        raise CoaloraError(
            f"no configuration fits in {max_bytes:,} bytes: the smallest model needs {need:,} bytes "
            f"({need - smallest:,} of them full precision and adapter); raise --max-bytes to at least {need}"
        )
    least = min(family.bits_per_weight(o) for o in options)
    most = max(family.bits_per_weight(o) for o in options)
    numel = space.total_numel
    low = max(least, (quantized_cap - sum(max(r) for r in rounding)) * 8 / numel)
    high = min(most, (quantized_cap - sum(min(r) for r in rounding)) * 8 / numel)

    def fits(budget: float) -> QConfig | None:
        config = config_for_budget(module, budget)
        return config if quantized_nbytes(space, config) <= quantized_cap else None

    best = fits(high)
    if best is not None:
        return best, high
    best, budget = fits(low), low
    if best is None:  # only when low was clamped to the cheapest budget and even that is too large
        raise CoaloraError(f"no configuration fits in {max_bytes:,} bytes; raise --max-bytes")
    for _ in range(max_solves - 2):
        if (high - budget) * numel / 8 < 32:  # within 32 bytes of the best possible
            break
        middle = (budget + high) / 2
        found = fits(middle)
        if found is None:
            high = middle
        else:
            best, budget = found, middle
    return best, budget


def _config_for_bytes_of_method(module: CoALoRATask, max_bytes: int) -> tuple[QConfig, float | None]:
    """A byte budget for any method: qlora/lqlora can only check that their own configuration fits."""
    if module.method.serves != "own":
        return config_for_bytes(module, max_bytes)
    config = module.own_config
    assert config is not None
    need = fixed_nbytes(module) + quantized_nbytes(module.model.space, config)
    if need > max_bytes:
        raise CoaloraError(
            f"this {module.method.name} checkpoint's own configuration needs {need:,} bytes, over the "
            f"{max_bytes:,}-byte budget; raise --max-bytes or use a coalora checkpoint"
        )
    return config, None


def resolve_config(
    module: CoALoRATask,
    *,
    budget: float | None = None,
    qconfig: str | os.PathLike | QConfig | None = None,
    max_bytes: int | None = None,
) -> Resolution:
    """Turn at most one of a bit budget, a qconfig (file or object) or a byte budget into a configuration.

    With none, qlora/lqlora/fp checkpoints get their own configuration; coalora/shared need one.
    """
    given = [x for x in (budget, qconfig, max_bytes) if x is not None]
    if len(given) > 1:
        raise CoaloraError("give at most one of a budget, a qconfig and a byte budget")
    space = module.model.space
    if not given:
        config = module.own_config
        check_serves(module, config)
        return Resolution(config, "its own configuration" if config is not None else "full precision")
    if isinstance(qconfig, QConfig):
        resolution = Resolution(space.validate(qconfig), "a given configuration")
    elif qconfig is not None:
        resolution = Resolution(space.load(qconfig), f"qconfig {qconfig}")
    elif budget is not None:
        resolution = Resolution(
            config_for_budget(module, budget), f"budget {float(budget)} bits", float(budget)
        )
    else:
        assert max_bytes is not None
        config, found = _config_for_bytes_of_method(module, int(max_bytes))
        source = f"byte budget {max_bytes:,} -> {space.avg_bits(config):.4f} bits"
        resolution = Resolution(config, source if found is None else f"{source} (budget {found:.4f})", found)
    check_serves(module, resolution.config)
    return resolution
