"""The LoRA'd target matrix: y = x·Ŵ_Cᵀ + bias + s·B·M·A·x (SPEC §3).

The base weight and bias stay frozen and in full precision; the model sets the active dequantized weight
Ŵ_C and the r×r adjustment M before each forward. With neither set, the layer is plain LoRA on the
full-precision base (the fp ceiling).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from coalora.options import QuantOption
from coalora.quantizer import fake_quantize


class QuantLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = (
            None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        )
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        #: dequantized weight of the active configuration (None: full precision); not saved
        self.active_weight: torch.Tensor | None = None
        #: the mapper's r×r adjustment for the active configuration (None: identity)
        self.mixer: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.active_weight is None else self.active_weight
        out = F.linear(x, weight, self.bias)
        hidden = F.linear(self.dropout(x), self.lora_A)
        if self.mixer is not None:
            hidden = F.linear(hidden, self.mixer)  # h·Mᵀ, i.e. M·A·x per token
        return out + self.scaling * F.linear(hidden, self.lora_B)

    def folded_B(self, mixer: torch.Tensor | None = None) -> torch.Tensor:
        """B·M: with it the layer is a plain LoRA for one configuration (deployment)."""
        return self.lora_B if mixer is None else self.lora_B @ mixer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


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
