"""GPTQ's error-feedback factor of one input site (:mod:`coalora.quant.gptq`), and the thread rule.

The factor depends on the site's statistics H only, not on the option: computed once per calibration and
reused for every configuration (a Cholesky factorisation of an (in × in) matrix per site).
"""

from __future__ import annotations

import torch

from coalora.errors import CoaloraError
from coalora.utils import intra_op_threads

#: Products (and factorisations) with fewer multiply-adds run on one thread. On the shared 2-core machine
#: torch's two-thread regions were several times slower, not faster, with other processes busy
#: (docs/bench/gptq.json); only work that dwarfs a scheduler slice uses the caller's threads.
PARALLEL_MIN_MACS = 1 << 31


def feedback_factor(
    hessian: torch.Tensor, damp: float = 0.01, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """GPTQ's error feedback for one input site, ``G`` (float32, strictly upper triangular): column k's
    target is its weight less ``Σ_{j<k} G[j, k] (w_j − q_j)`` (see the module doc: GPTQ's ``U``, without
    inverting anything).

    A dead input (zero diagonal) gets the mean live diagonal and no coupling, so its column is rounded to
    nearest from its own weight (its values never reach the output; RTN keeps them sensible should the
    calibration have missed that input). Then ``damp`` × the mean diagonal is added to the diagonal, as
    GPTQ does, which keeps the factor finite for rank-deficient ``H``. Computed in ``dtype``: float32
    gave the same error as float64 even at condition numbers of 1e14+ (the dampening bounds them), in half
    the time; a float32 factorisation that fails is redone in float64.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise CoaloraError(f"the Hessian must be a square matrix; got shape {tuple(hessian.shape)}")
    with intra_op_threads(torch.get_num_threads() if len(hessian) ** 3 // 3 >= PARALLEL_MIN_MACS else 1):
        if not bool(torch.isfinite(hessian).all()):
            raise CoaloraError(
                "the Hessian has NaN or infinite entries; recompute the calibration statistics"
            )
        for kind in dict.fromkeys([dtype, torch.float64]):
            lower = _reversed_cholesky(hessian.detach().to(kind), damp)
            if lower is not None:
                feedback = (lower / lower.diagonal().unsqueeze(0)).flip(0, 1).neg_()  # −P L₁ P
                feedback.diagonal().zero_()  # I − P L₁ P: L₁'s diagonal is 1
                return feedback.float()
    raise CoaloraError(
        f"the dampened Hessian is not positive definite (damp={damp}); raise damp, e.g. to 0.1"
    )


def _reversed_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor | None:
    """``L`` with ``P H P = L Lᵀ`` for the dampened ``H`` (dead inputs decoupled), or None if not definite."""
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag <= 0
    live_mean = diag[~dead].mean() if bool((~dead).any()) else torch.ones((), dtype=h.dtype)
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = live_mean
    diag.add_(damp * diag.mean())
    lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    return lower if int(info) == 0 else None
