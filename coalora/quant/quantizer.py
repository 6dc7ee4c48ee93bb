"""Block-wise NormalFloat (or integer) quantization with double-quantized scales, SPEC §2.3.

Written by hand: no maintained library offers 2/3/8-bit NormalFloat with b1-bit first-level scales and a
second level of scales in a chosen dtype. Everything is vectorised over blocks and runs on any device.

Tail handling: a weight count that is not a multiple of the block sizes is padded with zeros. Zeros never
change a block's absmax (|w| >= 0) nor a group's max of (s - o) (>= 0), so padding leaves every real
weight's result unchanged; it only costs the few extra scale slots that a real deployment also stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from coalora.quant.codebooks import codebook, nearest_codes
from coalora.quant.options import TORCH_DTYPES, QuantOption


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-x.numel()) % multiple
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


@dataclass
class _Parts:
    """Intermediate results shared by fake quantization and packing."""

    codes: torch.Tensor  # (n_padded,) int32 index into the codebook
    scale_codes: torch.Tensor  # (n_blocks,) int32 in [0, 2^scale_bits - 1]
    scale2: torch.Tensor  # (n_groups,) second-level scales, in the option's scale2 dtype
    offset: torch.Tensor  # () float32, min of first-level scales
    scales: torch.Tensor  # (n_blocks,) float32 dequantized first-level scales


def double_quantize_scales(absmax: torch.Tensor, option: QuantOption) -> tuple[torch.Tensor, ...]:
    """Second-level quantization of the per-block absmax scales (SPEC §2.3 step 3)."""
    levels = 2**option.scale_bits - 1
    offset = absmax.min()
    shifted = absmax - offset
    scale2 = _pad_to(shifted, option.block2).view(-1, option.block2).amax(dim=1)
    scale2 = scale2.to(TORCH_DTYPES[option.scale2_dtype])  # stored in this dtype: round-trip through it
    step = _scale_step(scale2, levels, absmax.numel(), option.block2)
    scale_codes = torch.where(step > 0, torch.round(shifted / step.clamp_min(1e-30)), 0).clamp_(0, levels)
    return scale_codes.to(torch.int32), scale2, offset, scale_codes * step + offset


def _scale_step(scale2: torch.Tensor, levels: int, n_blocks: int, block2: int) -> torch.Tensor:
    """Per-block quantization step of the first-level scales; zero where a group's range is zero."""
    return (scale2.to(torch.float32) / levels).repeat_interleave(block2)[:n_blocks]


def _quantize_parts(weight: torch.Tensor, option: QuantOption, family: str) -> _Parts:
    flat = _pad_to(weight.detach().reshape(-1).to(torch.float32), option.block)
    blocks = flat.view(-1, option.block)
    absmax = blocks.abs().amax(dim=1)
    scale_codes, scale2, offset, scales = double_quantize_scales(absmax, option)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    normalised = blocks / safe.unsqueeze(1)
    codes = nearest_codes(normalised, option.bits, family).view(-1)
    return _Parts(codes, scale_codes, scale2, offset.to(torch.float32), scales)


def fake_quantize(weight: torch.Tensor, option: QuantOption, family: str = "nf") -> torch.Tensor:
    """The dequantized weight under ``option``: what a deployed model computes with.

    Returns a float32 tensor of ``weight``'s shape on its device.
    """
    parts = _quantize_parts(weight, option, family)
    levels = codebook(option.bits, family).to(weight.device)
    values = levels.index_select(0, parts.codes).view(-1, option.block) * parts.scales.unsqueeze(1)
    return values.view(-1)[: weight.numel()].view(weight.shape)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below 2**bits into a little-endian bit stream of uint8.

    Eight values fill exactly ``bits`` bytes, so each group of eight is assembled into one int64 and split
    into bytes: the same stream as packing bit by bit, without materialising one int per bit.
    """
    count = values.numel()
    flat = values.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    groups = _pad_to(flat, 8).view(-1, 8)
    shifts = bits * torch.arange(8, device=values.device, dtype=torch.int64)
    words = (groups << shifts).sum(dim=1, keepdim=True)  # at most 7 * 8 = 56 bits: fits in an int64
    byte_shifts = 8 * torch.arange(bits, device=values.device, dtype=torch.int64)
    stream = ((words >> byte_shifts) & 0xFF).reshape(-1)
    return stream[: math.ceil(count * bits / 8)].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` integers, as int64."""
    flat = packed.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat[:count]
    groups = _pad_to(flat, bits).view(-1, bits)
    byte_shifts = 8 * torch.arange(bits, device=packed.device, dtype=torch.int64)
    words = (groups << byte_shifts).sum(dim=1, keepdim=True)
    shifts = bits * torch.arange(8, device=packed.device, dtype=torch.int64)
    return ((words >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


@dataclass
class PackedTensor:
    """A deployable quantized matrix: bit-packed codes, bit-packed scale codes, second-level scales, offset.

    Its byte size is what ``option.storage_bits`` promises (plus 4 bytes of offset and byte rounding).
    """

    shape: tuple[int, ...]
    option: QuantOption
    family: str
    codes: torch.Tensor  # uint8, bits * n_padded bits
    scale_codes: torch.Tensor  # uint8, scale_bits * n_blocks bits
    scale2: torch.Tensor  # n_groups values in the scale2 dtype
    offset: torch.Tensor  # float32 scalar

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.option.block)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.codes, self.scale_codes, self.scale2, self.offset)
        )

    def dequantize(self) -> torch.Tensor:
        """Float32 tensor equal, bit for bit, to ``fake_quantize`` of the original weight."""
        option = self.option
        levels_count = 2**option.scale_bits - 1
        n_padded = self.n_blocks * option.block
        codes = unpack_bits(self.codes, option.bits, n_padded)
        scale_codes = unpack_bits(self.scale_codes, option.scale_bits, self.n_blocks).to(torch.float32)
        step = _scale_step(self.scale2, levels_count, self.n_blocks, option.block2)
        scales = scale_codes * step + self.offset
        levels = codebook(option.bits, self.family).to(codes.device)
        values = levels.index_select(0, codes).view(-1, option.block) * scales.unsqueeze(1)
        return values.view(-1)[: self.numel].view(self.shape)


def quantize(weight: torch.Tensor, option: QuantOption, family: str = "nf") -> PackedTensor:
    """Quantize ``weight`` into its packed, deployable form."""
    parts = _quantize_parts(weight, option, family)
    return PackedTensor(
        shape=tuple(weight.shape),
        option=option,
        family=family,
        codes=pack_bits(parts.codes, option.bits),
        scale_codes=pack_bits(parts.scale_codes, option.scale_bits),
        scale2=parts.scale2,
        offset=parts.offset.reshape(()),
    )
