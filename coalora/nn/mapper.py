"""The configuration-aware network θ (SPEC §3): a configuration in, one r×r adjustment per matrix out.

Input for matrix i: learned embeddings of its five option fields, its block index and its module type
(every module type has its own embedding), concatenated -> LayerNorm -> MLP -> r×r. All matrices of a
configuration go through in one batched call; M = I + α·out with the last layer initialised near zero,
so training starts from plain LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from coalora.quant.options import FIELD_SIZES


class ConfigMapper(nn.Module):
    def __init__(
        self, rank: int, num_blocks: int, num_types: int, embed_dim: int = 8, hidden: int = 128
    ) -> None:
        super().__init__()
        self.rank = rank
        self.field_embeddings = nn.ModuleList(nn.Embedding(size, embed_dim) for size in FIELD_SIZES)
        self.block_embedding = nn.Embedding(num_blocks, embed_dim)
        self.type_embedding = nn.Embedding(num_types, embed_dim)
        in_dim = embed_dim * (len(FIELD_SIZES) + 2)
        first, last = nn.Linear(in_dim, hidden), nn.Linear(hidden, rank * rank)  # in this order: the RNG
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.LayerNorm(in_dim), first, nn.SiLU(), last)
        self.alpha = nn.Parameter(torch.tensor(1.0))

    def forward(self, options: torch.Tensor, blocks: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """``options`` (N, 5) field indices, ``blocks`` (N,), ``types`` (N,) -> M of shape (N, r, r)."""
        parts = [emb(options[:, i]) for i, emb in enumerate(self.field_embeddings)]
        parts += [self.block_embedding(blocks), self.type_embedding(types)]
        out = self.net(torch.cat(parts, dim=-1)).view(-1, self.rank, self.rank)
        eye = torch.eye(self.rank, device=out.device, dtype=out.dtype)
        return eye + self.alpha * out
