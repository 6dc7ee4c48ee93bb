"""What each method trains and serves, as one table instead of ``if method == ...`` across the code.

| method | trains | serves |
| --- | --- | --- |
| ``coalora`` | shared LoRA + mapper, K configurations per step from the training set | any configuration |
| ``shared`` | shared LoRA, each step one evaluation configuration | any (one adapter for all) |
| ``qlora`` | one LoRA for one configuration (``train_budget`` or ``qconfig``) | that configuration |
| ``lqlora`` | as qlora, initialised by the low-rank + quantized decomposition | that configuration |
| ``fp`` | LoRA on the full-precision backbone | full precision (the ceiling) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from coalora.errors import CoaloraError

Method = Literal["coalora", "shared", "qlora", "lqlora", "fp"]
METHOD_NAMES: tuple[str, ...] = get_args(Method)


@dataclass(frozen=True)
class MethodSpec:
    """One method's row of the table."""

    name: str
    #: the configuration-aware network adjusts the shared adapter per configuration
    uses_mapper: bool
    #: where the training set comes from: the budget grid, the evaluation set, the one own configuration,
    #: or nothing (full precision)
    train_set: Literal["grid", "eval", "own", "none"]
    #: configurations per training step: "k" (``configs_per_step``) or exactly one
    per_step: Literal["k", "one"]
    #: what the adapter may be served at: any configuration, only its own, or full precision only
    serves: Literal["any", "own", "fp"]
    #: LQ-LoRA: the adapter starts from the decomposition and the base is pinned to Q(W − L)
    lqlora_init: bool = False
    #: the configuration search may change the training set
    searchable: bool = False

    @property
    def quantized(self) -> bool:
        return self.serves != "fp"

    @property
    def fixed(self) -> bool:
        """Trained for exactly one configuration it chooses at construction (qlora, lqlora, fp)."""
        return self.train_set in ("own", "none")


METHODS: dict[str, MethodSpec] = {
    "coalora": MethodSpec("coalora", True, "grid", "k", "any", searchable=True),
    "shared": MethodSpec("shared", False, "eval", "one", "any"),
    "qlora": MethodSpec("qlora", False, "own", "one", "own"),
    "lqlora": MethodSpec("lqlora", False, "own", "one", "own", lqlora_init=True),
    "fp": MethodSpec("fp", False, "none", "one", "fp"),
}
assert tuple(METHODS) == METHOD_NAMES


def method_spec(name: str) -> MethodSpec:
    """The table row of ``name``, or a one-line error listing the methods."""
    spec = METHODS.get(name)
    if spec is None:
        raise CoaloraError(f"unknown method '{name}'; use one of: {', '.join(METHODS)}")
    return spec
