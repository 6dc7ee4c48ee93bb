"""Packed codes back to float32 weights (:meth:`PackedTensor.dequantize` of the nf and int families).

Serving runs this on every forward of a packed layer (:class:`~coalora.nn.packed_lora.PackedLoRALinear`),
so its speed is a served model's latency and what it keeps between calls stays resident. On CPU the
compiled loop of :mod:`coalora.quant.fused` runs where it is built (one pass, nothing kept). The numpy path,
its fallback with the same bits, needs the codes, their int32 copy (``index_select``'s index) and an int64
scratch word per eight codes: 6 bytes a weight of a chunk, kept per thread in :data:`DEQUANT_CHUNK`-weight
pieces, not the quantizer's 15-byte-a-weight scratch (~4 MB at its chunk), which serving never needs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy
import torch

from coalora.quant.codebooks import CODE_FAMILIES, Array, NearestLookup, unpack_codes, uses_numpy
from coalora.quant.quantizer import PackedTensor, compiled_kernel
from coalora.quant.scales import RowScaler

#: Weights per chunk on CPU (~0.8 MB of scratch per thread): large enough that per-chunk dispatch stays a
#: small share of a MiniLM forward's dequantization, a fifth of the quantizer's scratch.
DEQUANT_CHUNK = 1 << 17

_CPU_SCRATCH = threading.local()


@dataclass
class _Scratch:
    codes: torch.Tensor  # uint8 codes of a chunk
    index: torch.Tensor  # their int32 copy: the index of index_select
    words: torch.Tensor  # int64 scratch for unpacking, one word per eight codes
    arrays: tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray] | None  # numpy views, on the numpy path

    @staticmethod
    def new(n: int, device: torch.device) -> _Scratch:
        n = -(-n // 8) * 8
        codes = torch.empty(n, dtype=torch.uint8, device=device)
        index = torch.empty(n, dtype=torch.int32, device=device)
        words = torch.empty(n // 8, dtype=torch.int64, device=device)
        arrays = (codes.numpy(), index.numpy(), words.numpy()) if uses_numpy(device) else None
        return _Scratch(codes, index, words, arrays)

    def views(self, n: int) -> tuple[Array, Array, Array]:
        if self.arrays is None:
            return self.codes[:n], self.index[:n], self.words
        codes, index, words = self.arrays
        return codes[:n], index[:n], words


def _scratch(n: int, device: torch.device) -> _Scratch:
    """This thread's scratch on CPU (made once, grown if a chunk needs more); a fresh one elsewhere."""
    if device.type != "cpu":
        return _Scratch.new(n, device)
    scratch = getattr(_CPU_SCRATCH, "scratch", None)
    if scratch is None or scratch.codes.numel() < n or (scratch.arrays is not None) != uses_numpy(device):
        scratch = _CPU_SCRATCH.scratch = _Scratch.new(n, device)
    return scratch


def blocked_dequantize(packed: PackedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes to levels, times the block scales: a float32 tensor equal, bit for bit, to ``fake_quantize``
    of the original weight (``out``: see :meth:`PackedTensor.dequantize`)."""
    option, device = packed.option, packed.codes.device
    block, bits, n_blocks = option.block, option.bits, packed.n_blocks
    levels = NearestLookup.build(bits, packed.family, device).levels
    if out is None:
        out = torch.empty(n_blocks, block, dtype=torch.float32, device=device)
    else:
        wrong = out.dtype != torch.float32 or out.device != device or not out.is_contiguous()
        if wrong or out.numel() < packed.padded_numel:
            raise ValueError(f"dequantize needs float32 space for {packed.padded_numel} values on {device}")
        out = out.reshape(-1)[: packed.padded_numel].view(n_blocks, block)
    # the compiled loop where it is already built here (one pass, no scratch; about twice the numpy
    # path's speed): a first load never waits for the compiler, which quantizing (adapt, training) runs
    kernel = compiled_kernel(device, build=False) if packed.family in CODE_FAMILIES else None
    if kernel is not None:
        kernel.dequantize(packed.codes, bits, levels, packed.scales().contiguous(), out)
        return out.view(-1)[: packed.numel].view(packed.shape)
    scale = RowScaler(out, packed.scales())
    stream = packed.codes.numpy() if uses_numpy(device) else packed.codes
    rows = min(n_blocks, max(1, DEQUANT_CHUNK // block)) if device.type == "cpu" else n_blocks
    scratch = _scratch(rows * block, device)
    for start in range(0, n_blocks, rows):
        stop = min(start + rows, n_blocks)
        n, span = (stop - start) * block, slice(start * block * bits // 8, stop * block * bits // 8)
        codes, index, words = scratch.views(n)
        unpack_codes(stream[span], bits, codes, words)
        index[...] = codes
        torch.index_select(levels, 0, scratch.index[:n], out=out[start:stop].view(-1))
        scale(start, stop)
    return out.view(-1)[: packed.numel].view(packed.shape)
