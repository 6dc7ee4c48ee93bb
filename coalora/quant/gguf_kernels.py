"""llama.cpp block quantization in torch: llama.cpp's block bytes on the way in, its decoder on the way out.

:func:`quantize` writes each row as llama.cpp lays it out in a ``.gguf`` file (``ggml-common.h``: field order,
fp16 super-scales, 6-bit scale/min packing, nibble and high-bit order), so the bytes load in llama.cpp as
they are. :func:`dequantize` computes what ``dequantize_row_*`` computes, in the same order (fp16 factors
widened to fp32, ``d * sc`` before ``* q``, ``- m`` last), so its floats equal llama.cpp's bit for bit; the
tests hold it to the ``gguf`` package's numpy decoders, which mirror llama.cpp's.

Encoders. Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 follow ``quantize_row_*_ref`` exactly (one scale from the block's
extreme; llama-quantize does the same without an importance matrix), so their bytes equal the ``gguf``
package's quantizers'. The K-quants follow the reference's plan (a scale, and for Q2/4/5_K a min, per
16/32-weight sub-block; those quantized to 4/6/8 bits against fp16 super-scales; codes re-rounded against
the stored grid) with the per-sub-block search vectorised over all candidates at once: Q2/4/5_K try
``make_qkx2_quants``' candidate ranges with a least-squares refit of scale and min; Q3/6_K try
``make_qx_quants``' candidate scales (Q3_K's coordinate descent in ``make_q3_quants`` is replaced by the
same search). Where the reference weights the fit (by |x|, rms + |x|, x², or |error| for Q2_K) to favour
large weights, the fit here is plain squared error, the quantity the error tables measure (on Gaussian
weights this search with the reference's weightings gave RMSE/std 0.298 for Q2_K and 0.153 for Q3_K;
unweighted, 0.269 and 0.144). So bytes differ from llama-quantize's; any decoder reads them the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy
import torch

from coalora.errors import CoaloraError
from coalora.quant.gguf_search import EPS as _EPS
from coalora.quant.gguf_search import search_asymmetric as _search_asymmetric
from coalora.quant.gguf_search import search_symmetric as _search_symmetric
from coalora.quant.gguf_search import signed_extreme as _signed_extreme
from coalora.quant.gguf_types import GGUFType, check_row_length

Tensor = torch.Tensor
#: weights encoded at once: the scale search holds ~20 candidates per weight, so this bounds its memory
CHUNK_WEIGHTS = 1 << 16


# ---------------------------------------------------------------------------------------------- helpers
def _f16_bytes(x: Tensor) -> Tensor:
    """[n] float32 -> [n, 2] little-endian fp16 bytes (round to nearest even, as GGML_FP32_TO_FP16)."""
    return x.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _stored(x: Tensor) -> Tensor:
    """The float32 value an fp16 field decodes to (the encoder re-rounds codes against it)."""
    return x.to(torch.float16).float()


def _f16_field(blocks: Tensor, start: int) -> Tensor:
    """The fp16 field at byte ``start`` of each block, widened to float32, as [n, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _crumbs(data: Tensor, width: int) -> Tensor:
    """[..., k] bytes -> [..., 8 // width, k]: plane i holds the ``width``-bit field at shift i*width."""
    shifts = torch.arange(0, 8, width, device=data.device).reshape(-1, 1)
    return (data.unsqueeze(-2).long() >> shifts) & ((1 << width) - 1)


def _pack_planes(planes: Tensor, width: int) -> Tensor:
    """Inverse of :func:`_crumbs`: [..., P, k] ``width``-bit fields -> [..., k] bytes, plane i at i*width."""
    shifts = torch.arange(0, planes.shape[-2] * width, width, device=planes.device).reshape(-1, 1)
    return (planes.long() << shifts).sum(-2)


def _high_bits(q: Tensor) -> Tensor:
    """Bit 4 of 32 five-bit codes -> the 4 bytes of a little-endian uint32, bit i for weight i (Q5_0/Q5_1)."""
    return _pack_planes((q >> 4).reshape(-1, 4, 8).transpose(1, 2), 1)


def _round_away(x: Tensor) -> Tensor:
    """C's ``roundf`` (halves away from zero), exactly: the fraction of |x| is exact, unlike |x| + 0.5."""
    a = x.abs()
    whole = a.floor()
    return torch.copysign(whole + (a - whole >= 0.5).float(), x)


def _inverse(d: Tensor) -> Tensor:
    """``d ? 1/d : 0`` of the reference encoders."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _cat(*fields: Tensor) -> Tensor:
    return torch.cat([f.to(torch.uint8) for f in fields], dim=-1)


# -------------------------------------------------------------------------------- 32-weight types
def _enc_q4_0(x: Tensor, search: bool) -> Tensor:
    d = _signed_extreme(x) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).long()
    return _cat(_f16_bytes(d), q[:, :16] | q[:, 16:] << 4)


def _enc_q4_1(x: Tensor, search: bool) -> Tensor:
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    d = (hi - lo) / 15
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 15).long()
    return _cat(_f16_bytes(d), _f16_bytes(lo), q[:, :16] | q[:, 16:] << 4)


def _enc_q5_0(x: Tensor, search: bool) -> Tensor:
    d = _signed_extreme(x) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(0, 31).long()
    return _cat(_f16_bytes(d), _high_bits(q), (q[:, :16] & 15) | (q[:, 16:] & 15) << 4)


def _enc_q5_1(x: Tensor, search: bool) -> Tensor:
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    d = (hi - lo) / 31
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 31).long()
    return _cat(_f16_bytes(d), _f16_bytes(lo), _high_bits(q), (q[:, :16] & 15) | (q[:, 16:] & 15) << 4)


def _enc_q8_0(x: Tensor, search: bool) -> Tensor:
    d = x.abs().max(-1, keepdim=True).values / 127
    q = _round_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return _cat(_f16_bytes(d), q)


def _dec_q4_0(b: Tensor) -> Tensor:
    q = _crumbs(b[:, 2:], 4).reshape(-1, 32) - 8
    return _f16_field(b, 0) * q.float()


def _dec_q4_1(b: Tensor) -> Tensor:
    q = _crumbs(b[:, 4:], 4).reshape(-1, 32)
    return _f16_field(b, 0) * q.float() + _f16_field(b, 2)


def _five_bit(b: Tensor, qh_at: int) -> Tensor:
    high = _crumbs(b[:, qh_at : qh_at + 4], 1).transpose(-1, -2).reshape(-1, 32)  # bit i: weight i
    return _crumbs(b[:, qh_at + 4 :], 4).reshape(-1, 32) | high << 4


def _dec_q5_0(b: Tensor) -> Tensor:
    return _f16_field(b, 0) * (_five_bit(b, 2) - 16).float()


def _dec_q5_1(b: Tensor) -> Tensor:
    return _f16_field(b, 0) * _five_bit(b, 4).float() + _f16_field(b, 2)


def _dec_q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16_field(b, 0)


def _grid_codes(num: Tensor, step: Tensor, lo: int, hi: int) -> Tensor:
    """round(num / step) clamped to [lo, hi] against the stored (fp16-derived) step; 0 where step is 0."""
    safe = torch.where(step == 0, torch.ones_like(step), step)
    return torch.where(step == 0, 0.0, (num / safe).round().clamp(lo, hi)).long()


def _super_scale(values: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Non-negative sub-block values -> (their ``levels``-step codes, the fp16 super-scale's value)."""
    top = values.max(-1, keepdim=True).values.clamp_min(0)
    inv = torch.where(top > 0, levels / torch.where(top > 0, top, 1.0), 0.0)
    codes = (inv * values).round().clamp(0, levels).long()
    return codes, top / levels


# ------------------------------------------------------------------------------------- K-quants
def _asym_k(x: Tensor, sub: int, nmax: int, search: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Q2_K/Q4_K/Q5_K's shared half: codes [n, 256], scale codes, min codes, d and dmin (fp16 values)."""
    xs = x.reshape(x.shape[0], -1, sub)
    rmin, nstep = {3: (-0.5, 15), 15: (-1.0, 20), 31: (-0.5, 15)}[nmax]  # the reference's candidate ranges
    scales, mins = _search_asymmetric(xs, nmax, rmin, 0.1, nstep, search)
    levels = 15 if nmax == 3 else 63  # Q2_K packs scale and min in a nibble each, Q4_K/Q5_K in 6 bits
    ls, d = _super_scale(scales, levels)
    lm, dmin = _super_scale(mins, levels)
    step = _stored(d) * ls.float()
    shift = _stored(dmin) * lm.float()
    codes = _grid_codes(xs + shift.unsqueeze(-1), step.unsqueeze(-1), 0, nmax)
    return codes.reshape(x.shape[0], -1), ls, lm, d, dmin


def _pack_k_scales(ls: Tensor, lm: Tensor) -> Tensor:
    """Eight 6-bit scales and mins -> llama.cpp's 12 bytes (``get_scale_min_k4`` reads them back)."""
    low = torch.cat([ls[:, :4] | (ls[:, 4:] >> 4) << 6, lm[:, :4] | (lm[:, 4:] >> 4) << 6], -1)
    return torch.cat([low, (ls[:, 4:] & 15) | (lm[:, 4:] & 15) << 4], -1)


def _unpack_k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    s = s.long()
    sc = torch.cat([s[:, :4] & 63, (s[:, 8:] & 15) | (s[:, :4] >> 6) << 4], -1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:] >> 4) | (s[:, 4:8] >> 6) << 4], -1)
    return sc, mn


def _nibbles_64(codes: Tensor) -> Tensor:
    """[n, 256] 4-bit codes -> 128 bytes: per 64 weights, 32 bytes with the first 32 in the low nibbles."""
    c = codes.reshape(-1, 4, 2, 32)
    return (c[:, :, 0] | c[:, :, 1] << 4).reshape(-1, 128)


def _enc_q2_k(x: Tensor, search: bool) -> Tensor:
    codes, ls, lm, d, dmin = _asym_k(x, 16, 3, search)
    c = codes.reshape(-1, 2, 4, 32)  # (half, shift, lane)
    qs = _pack_planes(c, 2).reshape(-1, 64)
    return _cat(ls | lm << 4, qs, _f16_bytes(d), _f16_bytes(dmin))


def _enc_q4_k(x: Tensor, search: bool) -> Tensor:
    codes, ls, lm, d, dmin = _asym_k(x, 32, 15, search)
    return _cat(_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(ls, lm), _nibbles_64(codes))


def _enc_q5_k(x: Tensor, search: bool) -> Tensor:
    codes, ls, lm, d, dmin = _asym_k(x, 32, 31, search)
    qh = _pack_planes((codes >> 4).reshape(-1, 8, 32), 1)  # qh[l] bit k: weight 32k + l
    return _cat(_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(ls, lm), qh, _nibbles_64(codes & 15))


def _sym_k(x: Tensor, nmax: int, levels: int, search: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Q3_K/Q6_K's shared half: codes in [-nmax, nmax-1], signed sub-block scale codes, fp16 d's value."""
    xs = x.reshape(x.shape[0], 16, 16)
    scales = _search_symmetric(xs, nmax, search)
    extreme = _signed_extreme(scales)
    zero = extreme.abs() < _EPS
    iscale = torch.where(zero, 0.0, -levels / torch.where(zero, 1.0, extreme))
    sc = (iscale * scales).round().clamp(-levels, levels - 1).long()
    d = torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, iscale))
    codes = _grid_codes(xs, (_stored(d) * sc.float()).unsqueeze(-1), -nmax, nmax - 1)
    return codes.reshape(x.shape[0], -1), sc, d


def _enc_q3_k(x: Tensor, search: bool) -> Tensor:
    codes, sc, d = _sym_k(x, 4, 32, search)
    u = (codes + 4).reshape(-1, 8, 32)  # (weight // 32, lane)
    hmask = _pack_planes(u >> 2, 1)  # hmask[l] bit k: weight 32k + l
    qs = _pack_planes((u & 3).reshape(-1, 2, 4, 32), 2).reshape(-1, 64)
    s = sc + 32
    low = (s & 15).reshape(-1, 2, 8)
    high = _pack_planes((s >> 4).reshape(-1, 4, 4), 2)
    return _cat(hmask, qs, low[:, 0] | low[:, 1] << 4, high, _f16_bytes(d))


def _enc_q6_k(x: Tensor, search: bool) -> Tensor:
    codes, sc, d = _sym_k(x, 32, 128, search)
    u = (codes + 32).reshape(-1, 2, 4, 32)  # (half, quarter, lane)
    low = u & 15
    ql = torch.cat([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], -1).reshape(-1, 128)
    qh = _pack_planes(u >> 4, 2).reshape(-1, 64)
    return _cat(ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d))


def _dec_q2_k(b: Tensor) -> Tensor:
    sc = b[:, :16].long()
    dl = (_f16_field(b, 80) * (sc & 15).float()).unsqueeze(-1)
    ml = (_f16_field(b, 82) * (sc >> 4).float()).unsqueeze(-1)
    q = _crumbs(b[:, 16:80].reshape(-1, 2, 32), 2).reshape(-1, 16, 16).float()
    return (dl * q - ml).reshape(-1, 256)


def _dec_q3_k(b: Tensor) -> Tensor:
    s = b[:, 96:108].long()
    low = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], -1)
    high = _crumbs(s[:, 8:], 2).reshape(-1, 16)
    dl = (_f16_field(b, 108) * ((low | high << 4) - 32).float()).unsqueeze(-1)
    lo2 = _crumbs(b[:, 32:96].reshape(-1, 2, 32), 2).reshape(-1, 256)
    hbit = _crumbs(b[:, :32], 1).reshape(-1, 256)
    q = (lo2 - 4 * (1 - hbit)).reshape(-1, 16, 16).float()
    return (dl * q).reshape(-1, 256)


def _dec_q45_k(b: Tensor, high: Tensor | None) -> Tensor:
    sc, mn = _unpack_k_scales(b[:, 4:16])
    d1 = (_f16_field(b, 0) * sc.float()).unsqueeze(-1)
    m1 = (_f16_field(b, 2) * mn.float()).unsqueeze(-1)
    q = _crumbs(b[:, -128:].reshape(-1, 4, 32), 4).reshape(-1, 256)
    if high is not None:
        q = q | high << 4
    return (d1 * q.reshape(-1, 8, 32).float() - m1).reshape(-1, 256)


def _dec_q6_k(b: Tensor) -> Tensor:
    # per half: (nibble, byte 0..63) = (nibble, group of 32, lane), and quarter j = 2 * nibble + group
    low = _crumbs(b[:, :128].reshape(-1, 2, 64), 4).reshape(-1, 256)
    high = _crumbs(b[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 256)
    q = ((low | high << 4) - 32).reshape(-1, 16, 16).float()
    d = (_f16_field(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
    return (d * q).reshape(-1, 256)


_ENCODERS: dict[str, Callable[[Tensor, bool], Tensor]] = {
    "Q4_0": _enc_q4_0, "Q4_1": _enc_q4_1, "Q5_0": _enc_q5_0, "Q5_1": _enc_q5_1, "Q8_0": _enc_q8_0,
    "Q2_K": _enc_q2_k, "Q3_K": _enc_q3_k, "Q4_K": _enc_q4_k, "Q5_K": _enc_q5_k, "Q6_K": _enc_q6_k,
}  # fmt: skip
_DECODERS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q4_0": _dec_q4_0, "Q4_1": _dec_q4_1, "Q5_0": _dec_q5_0, "Q5_1": _dec_q5_1, "Q8_0": _dec_q8_0,
    "Q2_K": _dec_q2_k, "Q3_K": _dec_q3_k,
    "Q4_K": lambda b: _dec_q45_k(b, None),
    "Q5_K": lambda b: _dec_q45_k(b, _crumbs(b[:, 16:48], 1).reshape(-1, 256)),
    "Q6_K": _dec_q6_k,
}  # fmt: skip


# ------------------------------------------------------------------------------------------ public
def quantize(weight: Tensor, kind: str | GGUFType, *, search: bool = True) -> Tensor:
    """``weight`` [..., row] -> uint8 [..., row_bytes]: each row as llama.cpp's blocks of type ``kind``.

    Rows run along the last dimension (llama.cpp's ``ne[0]``: a torch ``[out, in]`` weight's input side).
    ``search=False`` keeps each K-quant sub-block's plain range fit (the reference's first guess), to
    measure what the scale search buys; the 32-weight types have one encoding either way. Raises
    :class:`CoaloraError` for a row length the type cannot tile, and for NaN/Inf weights (every scale of
    their block would be garbage, silently).
    """
    t = check_row_length(kind, int(weight.shape[-1]) if weight.dim() else 0)
    blocks = weight.detach().float().reshape(-1, t.block_size)
    if not bool(torch.isfinite(blocks).all()):
        raise CoaloraError(
            f"cannot quantize to {t.name}: the weights hold NaN or Inf; fix the checkpoint first"
        )
    per_chunk = max(1, CHUNK_WEIGHTS // t.block_size)
    encode = _ENCODERS[t.name]
    out = torch.cat([encode(c, search) for c in blocks.split(per_chunk)]) if len(blocks) else blocks.byte()
    return out.reshape(*weight.shape[:-1], t.row_bytes(int(weight.shape[-1])))


def dequantize(
    data: Tensor | numpy.ndarray, kind: str | GGUFType, shape: tuple[int, ...] | torch.Size
) -> Tensor:
    """Block bytes of type ``kind`` -> float32 weights of ``shape``, as ``dequantize_row_*`` computes."""
    t = check_row_length(kind, int(shape[-1]) if len(shape) else 0)
    raw = torch.from_numpy(numpy.ascontiguousarray(data)) if isinstance(data, numpy.ndarray) else data
    rows = int(torch.Size(shape[:-1]).numel())
    expected = rows * t.row_bytes(int(shape[-1]))
    if raw.dtype != torch.uint8 or raw.numel() != expected:
        raise CoaloraError(
            f"{t.name} data for shape {tuple(shape)} must be {expected} uint8 bytes; "
            f"got {raw.numel()} {str(raw.dtype).removeprefix('torch.')} elements"
        )
    blocks = raw.reshape(-1, t.type_size)
    return _DECODERS[t.name](blocks).reshape(tuple(shape))


def packed_bytes(shape: tuple[int, ...] | torch.Size, kind: str | GGUFType) -> int:
    """Bytes a ``shape`` tensor takes in type ``kind`` (llama.cpp's ``ggml_nbytes``), after the row check."""
    t = check_row_length(kind, int(shape[-1]) if len(shape) else 0)
    return int(torch.Size(shape[:-1]).numel()) * t.row_bytes(int(shape[-1]))


__all__ = ["CHUNK_WEIGHTS", "dequantize", "packed_bytes", "quantize"]
