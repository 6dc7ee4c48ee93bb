"""How a configuration's codes are chosen: round-to-nearest, or activation-aware (GPTQ) rounding.

Both keep the option's grid, block scales and packed bytes (only the codes differ), so every artifact
reads with the same reader. ``gptq`` needs each target's input statistics H = E[x xᵀ]
(:mod:`coalora.quant.calibration`); a :class:`Rounder` holds them, so the weight cache, the artifact
writer and the adaptive model quantize alike, and one place says which rounding a model uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal, TypeVar, get_args

import torch

from coalora.errors import CoaloraError
from coalora.quant.families import check_rounding_family
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import PackedTensor, compiled, fake_quantize, quantize, quantize_both

Rounding = Literal["nearest", "gptq"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)
#: GPTQ's dampening: this fraction of H's mean diagonal is added to its diagonal before inverting
GPTQ_DAMP = 0.01


_T = TypeVar("_T")
#: one pool of quantizing threads per thread count, kept for the process
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _map(job: Callable[[int], _T], count: int, threads: int, costs: Sequence[int] | None = None) -> list[_T]:
    """``[job(i) for i in range(count)]``, on ``threads`` threads when there are several.

    Each thread gets one share of the indices (balanced by ``costs``, e.g. each matrix's weights) and runs
    it as one task, the calling thread one of them: handing a pool one task per matrix made two threads
    little faster than one on MiniLM (36 matrices of ~0.4 ms each: 17.3 against 19.7 ms), two shares
    12.4 ms, with freed buffers kept (benchmarks/switch_costs.py)."""
    if threads < 2 or count < 2:
        return [job(i) for i in range(count)]
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="coalora-quantize")
    shares = balanced_shares([1] * count if costs is None else list(costs), threads)
    results: list[_T | None] = [None] * count

    def run(share: list[int]) -> None:
        for i in share:
            results[i] = job(i)

    *others, own = [share for share in shares if share]
    pending = [_POOLS[threads].submit(run, share) for share in others]
    try:
        run(own)  # the calling thread takes a share too, rather than wait idle
    finally:
        wait(pending)  # no share outlives the call, even when this one failed
    for done in pending:
        done.result()  # re-raises a share's error here
    return results  # type: ignore[return-value]


def balanced_shares(costs: Sequence[int], parts: int) -> list[list[int]]:
    """Indices split into ``parts`` lists of near-equal total cost (largest first to the lightest list),
    each list in increasing index order."""
    shares: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        lightest = loads.index(min(loads))
        shares[lightest].append(i)
        loads[lightest] += costs[i]
    return [sorted(share) for share in shares]


def check_rounding(rounding: str) -> Rounding:
    if rounding not in ROUNDINGS:
        raise CoaloraError(f"rounding must be one of {', '.join(ROUNDINGS)}, got '{rounding}'")
    return rounding  # type: ignore[return-value]


@dataclass
class Rounder:
    """Quantizes one named target matrix at one option with the model's rounding."""

    method: Rounding = "nearest"
    family: str = "nf"
    #: target name -> H (in × in), for ``gptq``; matrices reading one input may share one tensor
    hessians: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    damp: float = GPTQ_DAMP
    _factors: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_rounding(self.method)
        check_rounding_family(self.method, self.family, "rounding")

    @property
    def ready(self) -> bool:
        """Whether it can quantize now (``gptq`` needs its statistics first)."""
        return self.method == "nearest" or self.hessians is not None

    def _factor(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """GPTQ's feedback factor of ``name``'s input site, computed once per site (matrices reading one
        input share one H tensor, hence one factor)."""
        if self.hessians is None:
            raise CoaloraError(
                "gptq rounding needs calibration statistics first (the task computes them from its "
                "training data); or use rounding: nearest"
            )
        if name not in self.hessians:
            raise CoaloraError(f"no calibration statistics for target '{name}'; recalibrate the model")
        from coalora.quant.gptq_factor import feedback_factor

        hessian = self.hessians[name]
        key = (id(hessian), weight.device)
        if key not in self._factors:
            self._factors[key] = feedback_factor(hessian.to(weight.device), self.damp)
        return self._factors[key]

    def packed(self, name: str, weight: torch.Tensor, option: QuantOption) -> PackedTensor:
        """The packed, deployable form of ``weight`` (matrix ``name``) at ``option``."""
        return self.packed_many([name], [weight], [option])[0]

    def dense(self, name: str, weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
        """The dequantized float32 weight (bit for bit ``packed(...).dequantize()``)."""
        return self.dense_many([name], [weight], [option])[0]

    def packed_many(
        self, names: Sequence[str], weights: Sequence[torch.Tensor], options: Sequence[QuantOption]
    ) -> list[PackedTensor]:
        """:meth:`packed` of several matrices; GPTQ rounds matrices of one input width together (a
        configuration's matrices cost about one matrix's column steps per width)."""
        if self.method == "nearest":
            return [quantize(w.detach(), o, self.family) for w, o in zip(weights, options, strict=True)]
        from coalora.quant.gptq import gptq_quantize_many

        factors = [self._factor(n, w) for n, w in zip(names, weights, strict=True)]
        return gptq_quantize_many([w.detach() for w in weights], list(options), self.family, factors)

    def parallel(self, weight: torch.Tensor) -> bool:
        """Whether :meth:`forms_many` can spread matrices like ``weight`` over threads: round-to-nearest
        with the compiled pass (it lets go of the GIL; numpy's ops are too short to gain)."""
        return self.method == "nearest" and compiled(weight)

    def forms_many(
        self,
        names: Sequence[str],
        weights: Sequence[torch.Tensor],
        options: Sequence[QuantOption],
        packed: bool,
        dense: bool,
        absmax: Sequence[torch.Tensor] | None = None,
        threads: int = 1,
    ) -> list[tuple[PackedTensor | None, torch.Tensor | None]]:
        """Each matrix's packed form (if ``packed``) and dequantized float32 weight (if ``dense``) from one
        rounding: round-to-nearest writes both in one pass (``absmax``: each weight's
        :func:`~coalora.quant.quantizer.block_absmax` at its option's block size, if known), matrices on
        ``threads`` threads where :meth:`parallel`; GPTQ dequantizes its packed forms (bit for bit its
        dense ones)."""
        if self.method != "nearest":
            if not packed:
                return [(None, d) for d in self.dense_many(names, weights, options)]
            found = self.packed_many(names, weights, options)
            return [(p, p.dequantize() if dense else None) for p in found]

        def one(i: int) -> tuple[PackedTensor | None, torch.Tensor | None]:
            w, o, a = weights[i].detach(), options[i], None if absmax is None else absmax[i]
            if packed and dense:
                return quantize_both(w, o, self.family, a)
            return (
                (None, fake_quantize(w, o, self.family, a))
                if dense
                else (quantize(w, o, self.family, a), None)
            )

        spread = threads if weights and self.parallel(weights[0]) else 1
        return _map(one, len(weights), spread, [w.numel() for w in weights])

    def dense_many(
        self, names: Sequence[str], weights: Sequence[torch.Tensor], options: Sequence[QuantOption]
    ) -> list[torch.Tensor]:
        """:meth:`dense` of several matrices (see :meth:`packed_many`)."""
        if self.method == "nearest":
            return [fake_quantize(w.detach(), o, self.family) for w, o in zip(weights, options, strict=True)]
        from coalora.quant.gptq import gptq_fake_quantize_many

        factors = [self._factor(n, w) for n, w in zip(names, weights, strict=True)]
        return gptq_fake_quantize_many([w.detach() for w in weights], list(options), self.family, factors)
