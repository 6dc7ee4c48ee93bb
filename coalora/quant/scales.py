"""First-level scales and their second level (SPEC §2.3 step 3): the per-block arithmetic the quantizer
(:mod:`coalora.quant.quantizer`) and the error table (:mod:`coalora.quant.error_table`) share.

Tail handling: see the quantizer's module doc (zero padding never changes a real block's result).
"""

from __future__ import annotations

import numpy
import torch

from coalora.quant.codebooks import uses_numpy
from coalora.quant.options import TORCH_DTYPES, QuantOption

SERIAL = 32768  # torch runs a CPU op over at least this many elements in an OpenMP region


def pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-x.numel()) % multiple
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


def double_quantize_scales(absmax: torch.Tensor, option: QuantOption) -> tuple[torch.Tensor, ...]:
    """Second-level quantization of the per-block absmax scales (SPEC §2.3 step 3).

    Returns the scale codes (int32), the second-level scales (in the option's dtype), the offset and the
    dequantized scales (float32). Each block's arithmetic is its group's, broadcast over a (groups, block2)
    view: the values of a per-block ``repeat_interleave`` of the group step, without building it. On CPU
    it runs in numpy: the same float32 operations, rounded alike, on one thread.
    """
    levels, block2, n_blocks = 2**option.scale_bits - 1, option.block2, absmax.numel()
    dtype = TORCH_DTYPES[option.scale2_dtype]
    if not uses_numpy(absmax.device):
        offset = absmax.min()
        shifted = pad_to(absmax - offset, block2).view(-1, block2)  # zero padding: see the module doc
        scale2 = row_max(shifted, torch.empty_like(shifted[:, 0])).to(dtype)  # stored in it: round-trip
        step = (scale2.to(torch.float32) / levels).unsqueeze(1)  # zero where a group's range is zero
        codes = torch.round(shifted / step.clamp_min(1e-30)).clamp_(0, levels).mul_(step > 0)  # finite
        scales = (codes * step + offset).view(-1)[:n_blocks]
        return codes.view(-1)[:n_blocks].to(torch.int32), scale2, offset, scales
    values = absmax.detach().numpy()
    low = values.min()
    rows = numpy.zeros((-(-n_blocks // block2), block2), dtype=numpy.float32)
    numpy.subtract(values, low, out=rows.reshape(-1)[:n_blocks])
    scale2 = torch.from_numpy(rows.max(axis=1)).to(dtype)
    step = (scale2.to(torch.float32).numpy() / numpy.float32(levels))[:, None]
    codes_f = numpy.rint(rows / numpy.maximum(step, numpy.float32(1e-30)))
    codes_f = numpy.clip(codes_f, 0, levels, out=codes_f) * (step > 0)
    scales = codes_f * step + low
    codes_i, low_0d = codes_f.reshape(-1)[:n_blocks].astype(numpy.int32), numpy.asarray(low)
    return (
        torch.from_numpy(codes_i),
        scale2,
        torch.from_numpy(low_0d),
        torch.from_numpy(scales.reshape(-1)[:n_blocks]),
    )


def row_max(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Max of each row, into ``out``. Rows of 16 go through max_pool1d (torch's 16-wide reductions are ~2x
    slower); on CPU, longer rows in slices under :data:`SERIAL` weights."""
    if rows.shape[1] == 16:
        return out.copy_(torch.nn.functional.max_pool1d(rows.reshape(1, 1, -1), 16).view(-1))
    step = max(1, (SERIAL - 1) // rows.shape[1]) if rows.device.type == "cpu" else len(rows)
    for start in range(0, len(rows), step):
        torch.amax(rows[start : start + step], dim=1, out=out[start : start + step])
    return out


class RowScaler:
    """Multiplies rows ``start:stop`` of (n_blocks, block) ``values`` by their scales, in place: the last
    step of both dequantizations (the quantizer's dense pass and a packed tensor's)."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values, self.scales = values, scales.unsqueeze(1)
        self.arrays = (values.numpy(), scales.numpy()[:, None]) if uses_numpy(values.device) else None

    def __call__(self, start: int, stop: int) -> None:
        if self.arrays is None:
            self.values[start:stop].mul_(self.scales[start:stop])
        else:
            rows, scales = self.arrays[0][start:stop], self.arrays[1][start:stop]
            numpy.multiply(rows, scales, out=rows)
