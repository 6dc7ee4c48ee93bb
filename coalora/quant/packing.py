"""Codes chosen by another rounding (:mod:`coalora.quant.gptq`), packed as :func:`~coalora.quant.quantizer.
quantize` packs its own: the same bytes and format, other codes."""

from __future__ import annotations

import torch

from coalora.quant.codebooks import codebook, pack_bits, pack_codes, uses_numpy
from coalora.quant.options import QuantOption
from coalora.quant.quantizer import BlockedWeight, PackedTensor


def packed_with_codes(
    codes: torch.Tensor, shape: tuple[int, ...], option: QuantOption, family: str, blocked: BlockedWeight
) -> PackedTensor:
    """The packed form of ``codes`` (uint8, one per weight, any layout of the weight's shape) with the
    scales of ``blocked`` (``BlockedWeight.of`` the weight): ``quantize``'s bytes and format, other codes.
    The zero padding of the last block gets the code of 0, as in ``quantize``."""
    n, device = blocked.blocks.numel(), codes.device
    flat = torch.empty(n, dtype=torch.uint8, device=device)
    flat[: codes.numel()].view(codes.shape).copy_(codes)
    if codes.numel() < n:
        levels = codebook(option.bits, family).double()
        flat[codes.numel() :] = int(
            torch.bucketize(torch.zeros(()), ((levels[1:] + levels[:-1]) / 2).float())
        )
    packed = torch.empty(n * option.bits // 8, dtype=torch.uint8, device=device)  # n: whole blocks of 16+
    scratch = torch.empty(n // 8, dtype=torch.int64, device=device)
    if uses_numpy(device):  # numpy views: no parallel region
        pack_codes(flat.numpy(), option.bits, packed.numpy(), scratch.numpy())
    else:
        pack_codes(flat, option.bits, packed, scratch)
    scale_codes = pack_bits(blocked.scale_codes, option.scale_bits)
    return PackedTensor(
        shape, option, family, packed, scale_codes, blocked.scale2, blocked.offset.reshape(())
    )
