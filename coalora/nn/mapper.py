"""The configuration-aware network θ (SPEC §3): a configuration in, one r×r adjustment per matrix out.

Input for matrix i: learned embeddings of its option fields (the code family's: five for ``nf``/``int``, one
type index for ``gguf``), its block index and its module type
(every module type has its own embedding), concatenated -> LayerNorm -> MLP -> r×r. All matrices of a
configuration go through in one batched call. It returns the adjustment D = α·out, so M = I + D, with the
last layer initialised near zero, so training starts from plain LoRA.

D is computed in fp32 even under bf16 autocast, and never added to I: in bf16, 1 + 0.0039 is exactly 1.0,
so forming M there would erase every diagonal adjustment below ~0.004. The LoRA layer forms h + D·h in
fp32 instead (see :class:`coalora.nn.lora.LoRALinear`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from coalora.quant.options import FIELD_SIZES


class ConfigMapper(nn.Module):
    def __init__(
        self,
        rank: int,
        num_blocks: int,
        num_types: int,
        embed_dim: int = 8,
        hidden: int = 128,
        field_sizes: Sequence[int] = FIELD_SIZES,
        sees_config: bool = True,
    ) -> None:
        """``field_sizes``: choices per option field, the code family's (default: the blocked schema's).
        ``sees_config`` False: every option field reads index 0 whatever the configuration, so the output
        depends only on the matrix (block, type): a configuration-independent r×r factor per matrix, the
        same network and parameters — the control that tells the mapper's extra parametrisation apart from
        its configuration-awareness."""
        super().__init__()
        self.rank = rank
        self.sees_config = sees_config
        self.field_embeddings = nn.ModuleList(nn.Embedding(size, embed_dim) for size in field_sizes)
        self.block_embedding = nn.Embedding(num_blocks, embed_dim)
        self.type_embedding = nn.Embedding(num_types, embed_dim)
        in_dim = embed_dim * (len(field_sizes) + 2)
        first, last = nn.Linear(in_dim, hidden), nn.Linear(hidden, rank * rank)  # in this order: the RNG
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.LayerNorm(in_dim), first, nn.SiLU(), last)
        self.alpha = nn.Parameter(torch.tensor(1.0))

    def forward(self, options: torch.Tensor, blocks: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """``options`` (N, F) field indices, ``blocks`` (N,), ``types`` (N,) -> D of shape (N, r, r), fp32."""
        if not self.sees_config:
            options = torch.zeros_like(options)
        with torch.autocast(device_type=options.device.type, enabled=False):
            parts = [emb(options[:, i]) for i, emb in enumerate(self.field_embeddings)]
            parts += [self.block_embedding(blocks), self.type_embedding(types)]
            out = self.net(torch.cat(parts, dim=-1).float()).view(-1, self.rank, self.rank)
            return self.alpha.float() * out.float()
