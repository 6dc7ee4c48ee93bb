"""The K-quants' per-sub-block scale searches (llama.cpp's ``make_qx_quants`` / ``make_qkx2_quants`` plans),
vectorised over every candidate at once; :mod:`coalora.quant.gguf_kernels` packs what they choose.

Kept apart from the byte layouts: the layouts must match llama.cpp exactly, the searches only need to be
good (any scale they pick decodes the same way in llama.cpp).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a sub-block whose largest |x| is below this is all zero


def signed_extreme(x: Tensor) -> Tensor:
    """The value with the largest magnitude along the last dim (the first one on ties, as the C loop)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def candidate_sums(iscale: Tensor, x: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor, Tensor]:
    """Codes l = clamp(round(iscale_k · x), lo, hi) for every candidate k -> (sum l, sum l², sum x·l) in
    float64, [..., K] each. One [..., K, n] buffer, rounded in place; x·l as a batched mat-vec."""
    codes = torch.mul(iscale.unsqueeze(-1), x.unsqueeze(-2)).round_().clamp_(lo, hi)
    sum_l = codes.sum(-1)
    sum_xl = torch.matmul(codes, x.unsqueeze(-1)).squeeze(-1)
    sum_l2 = codes.square_().sum(-1)
    return sum_l.double(), sum_l2.double(), sum_xl.double()


def search_symmetric(x: Tensor, nmax: int, search: bool) -> Tensor:
    """``make_qx_quants``' search: the signed scale s of codes l in [-nmax, nmax-1] whose least-squares
    fit s = sum(x l) / sum(l²) leaves the smallest squared error (the largest sum(x l)² / sum(l²)), over
    codes rounded at iscale = -(nmax + 0.1 k) / x_extreme, k in -9..9 (k = 0 only without ``search``)."""
    extreme = signed_extreme(x)
    zero = extreme.abs() < EPS
    steps = torch.arange(-9, 10, device=x.device, dtype=x.dtype) * 0.1 if search else x.new_zeros(1)
    iscale = -(nmax + steps) / torch.where(zero, torch.ones_like(extreme), extreme)  # [..., K]
    _, suml2, sumlx = candidate_sums(iscale, x, -nmax, nmax - 1)
    suml2 = suml2.clamp_min(1e-30)
    best = (sumlx * sumlx / suml2).argmax(-1, keepdim=True)
    scale = (sumlx.gather(-1, best) / suml2.gather(-1, best)).squeeze(-1).float()
    return torch.where(zero.squeeze(-1), torch.zeros_like(scale), scale)


def search_asymmetric(
    x: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, search: bool
) -> tuple[Tensor, Tensor]:
    """``make_qkx2_quants``' search: (scale, min) with x ≈ scale·l - min, l in [0, nmax], min >= 0.

    Candidate 0 is the plain range fit; candidates 1.. round at a range stretched by (rmin + rdelta k)
    levels, then refit scale and offset by least squares. The lowest squared error wins; it is expanded
    in the sums (in float64), so no per-weight residual is formed.
    """
    lo = x.min(-1).values.clamp(max=0)
    span = x.max(-1).values - lo
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    factors = [float(nmax)] + ([rmin + rdelta * k + nmax for k in range(nstep + 1)] if search else [])
    iscale = torch.tensor(factors, device=x.device, dtype=x.dtype) / span.unsqueeze(-1)  # [..., K]
    shifted = x - lo.unsqueeze(-1)
    sum_l, sum_l2, sum_sl = candidate_sums(iscale, shifted, 0, nmax)
    n = x.shape[-1]
    sum_x = x.double().sum(-1, keepdim=True)
    sum_x2 = x.double().square().sum(-1, keepdim=True)
    sum_xl = sum_sl + lo.double().unsqueeze(-1) * sum_l  # sum x·l from sum (x - lo)·l
    det = n * sum_l2 - sum_l * sum_l
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    scale = (n * sum_xl - sum_x * sum_l) / safe_det
    offset = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
    positive = offset > 0  # the grid must reach down to the block's minimum (stored min is >= 0): refit
    scale = torch.where(positive, sum_xl / sum_l2.clamp_min(1e-30), scale)
    offset = torch.where(positive, torch.zeros_like(offset), offset)
    scale[..., 0], offset[..., 0] = 1.0 / iscale[..., 0].double(), lo.double()  # plain fit, admissible
    sse = (
        scale * scale * sum_l2 + n * offset * offset + sum_x2
        + 2 * scale * offset * sum_l - 2 * scale * sum_xl - 2 * offset * sum_x
    )  # fmt: skip
    valid = det > 0
    valid[..., 0] = True
    best = torch.where(valid, sse, torch.inf).argmin(-1, keepdim=True)
    scale, offset = scale.gather(-1, best).squeeze(-1).float(), offset.gather(-1, best).squeeze(-1).float()
    return torch.where(flat, torch.zeros_like(scale), scale), torch.where(flat, -lo, -offset)
