"""LQ-LoRA's initialisation (SPEC §6): W ≈ Q(W − L) + L with L = L₁L₂ of rank r, by alternating SVD and
quantization; and the residual W − L its adapter was trained on, reproduced for export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from coalora.errors import CoaloraError
from coalora.quant.options import QuantOption
from coalora.quant.qconfig import QConfig
from coalora.quant.quantizer import fake_quantize


def lqlora_decompose(
    weight: torch.Tensor, option: QuantOption, rank: int, iters: int = 2, family: str = "nf"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LQ-LoRA's W ≈ Q + L₁L₂: alternate a rank-r SVD of W − Q and Q = quant(W − L) (SPEC §6).

    Returns (dequantized Q, L₁ (out×r), L₂ (r×in)) with L₁L₂ the low-rank part.
    """
    w = weight.detach().to(torch.float32)
    left, right = _truncated_svd(w, rank)  # start from L = SVD_r(W), as LQ-LoRA does
    for _ in range(max(0, iters - 1)):
        left, right = _truncated_svd(w - fake_quantize(w - left @ right, option, family), rank)
    return fake_quantize(w - left @ right, option, family), left, right


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (U√S, √S·Vᵀ) of ``matrix``."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


def lqlora_residuals(
    weights: dict[str, torch.Tensor],
    config: QConfig,
    pinned: dict[str, torch.Tensor],
    rank: int,
    iters: int = 2,
    family: str = "nf",
) -> dict[str, torch.Tensor]:
    """The residuals W − L whose quantization is each matrix's ``pinned`` base, recomputed and checked.

    Export packs Q(W − L) from the residual, so the decomposition must reproduce the pinned base exactly
    (it does on the machine and thread count that trained it; SVD rounding can differ elsewhere).
    """
    residuals = {}
    for name, weight in weights.items():
        option = config.matrices[name]
        _, left, right = lqlora_decompose(weight, option, rank, iters, family)
        residual = weight.to(torch.float32) - left @ right
        if not torch.equal(fake_quantize(residual, option, family).to(pinned[name]), pinned[name]):
            raise CoaloraError(
                f"could not reproduce the LQ-LoRA base of '{name}'; export on the machine that trained it"
            )
        residuals[name] = residual
    return residuals


def init_lqlora_adapters(
    layers: Sequence[Any],
    names: Sequence[str],
    config: QConfig,
    weights: dict[str, torch.Tensor],
    iters: int = 2,
    family: str = "nf",
) -> dict[str, torch.Tensor]:
    """Set each LoRA layer's A, B to LQ-LoRA's L = L₁L₂ (split evenly around its scaling) and return the
    pinned bases Q(W − L) by matrix name, in the layers' weight dtype."""
    pinned = {}
    for name, layer in zip(names, layers, strict=True):
        quantized, left, right = lqlora_decompose(
            weights[name], config.matrices[name], layer.rank, iters, family
        )
        root = layer.scaling**0.5
        with torch.no_grad():
            layer.lora_B.copy_(left / root)
            layer.lora_A.copy_(right / root)
        pinned[name] = quantized.to(layer.weight.dtype)
    return pinned
