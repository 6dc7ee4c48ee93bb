"""Codebooks, storage cost and the block-wise double quantizer (SPEC §2.2, §2.3)."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from coalora.errors import CoaloraError
from coalora.quant import codebooks, dequantize, fused, quantizer
from coalora.quant.codebooks import NearestLookup, SearchScratch, codebook, nearest_codes
from coalora.quant.options import NF4_DOUBLE_QUANT, OPTION_SPACE, TORCH_DTYPES, QuantOption
from coalora.quant.quantizer import PackedTensor, fake_quantize, pack_bits, quantize, unpack_bits

SPEC_LEVELS = {
    2: [-1, 0, 0.3379, 1],
    3: [-1, -0.4786, -0.2171, 0, 0.1609, 0.3379, 0.5626, 1],
    4: [-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0910, 0, 0.0796, 0.1609, 0.2461, 0.3379,
        0.4407, 0.5626, 0.7230, 1],
}  # fmt: skip


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_normalfloat_levels_match_spec(bits):
    assert codebook(bits).tolist() == pytest.approx(SPEC_LEVELS[bits], abs=5e-5)


def test_eight_bit_normalfloat_is_symmetric_grid_of_256_with_exact_zero():
    levels = codebook(8)
    assert len(levels) == 256 and levels[0] == -1 and levels[-1] == 1 and 0.0 in levels.tolist()
    assert bool((levels[1:] > levels[:-1]).all())


def test_integer_family_is_uniform_symmetric():
    assert codebook(2, "int").tolist() == [-1, 0, 1]
    assert codebook(4, "int").tolist() == pytest.approx([k / 7 for k in range(-7, 8)])
    with pytest.raises(CoaloraError, match="code family"):
        codebook(4, "fp")


def test_storage_cost_values_and_range():
    assert NF4_DOUBLE_QUANT.storage_bits == 4.126953125
    costs = [o.storage_bits for o in OPTION_SPACE]
    assert len(OPTION_SPACE) == 432 == len(set(OPTION_SPACE))
    assert min(costs) == pytest.approx(2.0322, abs=1e-4) and max(costs) == 8.625


def test_option_rejects_values_outside_the_space():
    with pytest.raises(CoaloraError, match="'bits' = 5"):
        QuantOption(bits=5)
    with pytest.raises(CoaloraError, match="unknown field"):
        QuantOption.from_dict(
            {"bits": 4, "scale_bits": 8, "scale2_dtype": "fp32", "block": 64, "block2": 256, "x": 1}
        )
    assert QuantOption.from_indices(NF4_DOUBLE_QUANT.indices) == NF4_DOUBLE_QUANT


@pytest.mark.parametrize("family", ["nf", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nearest_codes_equals_binary_search(bits, family):
    levels = codebook(bits, family)
    mids = (levels[1:] + levels[:-1]) / 2
    x = torch.cat([torch.rand(50_000) * 2.4 - 1.2, mids, mids + 1e-7, mids - 1e-7])
    assert torch.equal(nearest_codes(x, bits, family), torch.bucketize(x, mids, out_int32=True))


@pytest.mark.parametrize("numpy_compare", [True, False])  # False: the torch ops other devices run
@pytest.mark.parametrize("family", ["nf", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lookup_codes_and_levels_equal_binary_search(bits, family, numpy_compare):
    levels = codebook(bits, family)
    mids = _mids(levels)
    lookup = NearestLookup.build(bits, family, levels.device)
    assert family == "nf" or lookup.lower is None  # the integer grid needs no gather of lower codes
    edges = torch.arange(lookup.last_bin + 2) / max(lookup.half_bins, 1.0) - 1.0  # the grid's, if any
    probes = torch.cat([mids, edges, levels])
    ends = torch.tensor([math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30])
    x = torch.cat([torch.randn(20_000) * 3, probes, _neighbours(probes), ends])
    scratch = SearchScratch.new(x.numel(), x.device)
    scratch = scratch if numpy_compare else dataclasses.replace(scratch, arrays=None)
    expected = torch.bucketize(x, mids)
    scratch.x.copy_(x)
    assert torch.equal(lookup.codes_into(x.numel(), scratch).long(), expected)
    scratch.x.copy_(x)
    values = torch.empty_like(x)
    lookup.levels_into(x.numel(), values, scratch)
    assert torch.equal(values, levels[expected])


def _mids(levels: torch.Tensor) -> torch.Tensor:
    """The float32 midpoints the search compares with: the exact mean of two levels, rounded once."""
    return ((levels[1:].double() + levels[:-1].double()) / 2).float()


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """The float32 values just above and just below each of ``x``."""
    return torch.cat([x.nextafter(torch.full_like(x, math.inf)), x.nextafter(torch.full_like(x, -math.inf))])


# Today's algorithm before issue #13's fast path, copied from quantizer.py and codebooks.py: the oracle that
# the fast path must match bit for bit (codes, scale codes, second-level scales, bytes, dequantized values).


def _reference_pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-x.numel()) % multiple
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


@functools.cache
def _reference_nearest_tables(bits: int, family: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    levels = codebook(bits, family).double()
    mids = (levels[1:] + levels[:-1]) / 2
    gap = float((mids[1:] - mids[:-1]).min()) if len(mids) > 1 else 2.0
    bins = 1 << max(1, math.ceil(math.log2(4.0 / gap)))
    while True:
        edges = torch.arange(bins + 1, dtype=torch.float64) * (2.0 / bins) - 1.0
        distance = (mids.unsqueeze(1) - edges.unsqueeze(0)).abs().min()
        if distance > 1e-5:
            break
        bins += 1
    lut = torch.searchsorted(mids, edges[:-1]).to(torch.int32)
    mids_ext = torch.cat([mids.float(), torch.tensor([float("inf")])])
    return bins / 2.0, lut, mids_ext


def _reference_nearest_codes(x: torch.Tensor, bits: int, family: str) -> torch.Tensor:
    half_bins, lut, mids_ext = _reference_nearest_tables(bits, family)
    bins = ((x + 1.0) * half_bins).clamp_(0, 2 * half_bins - 1).to(torch.int32)
    code = lut.index_select(0, bins.view(-1)).view(x.shape)
    return code + (x > mids_ext.index_select(0, code.view(-1)).view(x.shape))


def _reference_scale_step(scale2: torch.Tensor, levels: int, n_blocks: int, block2: int) -> torch.Tensor:
    return (scale2.to(torch.float32) / levels).repeat_interleave(block2)[:n_blocks]


def _reference_parts(weight: torch.Tensor, option: QuantOption, family: str) -> tuple[torch.Tensor, ...]:
    """(codes, scale_codes, scale2, offset, scales) exactly as ``_quantize_parts`` computed them."""
    flat = _reference_pad_to(weight.detach().reshape(-1).to(torch.float32), option.block)
    blocks = flat.view(-1, option.block)
    absmax = blocks.abs().amax(dim=1)
    levels = 2**option.scale_bits - 1
    offset = absmax.min()
    shifted = absmax - offset
    scale2 = _reference_pad_to(shifted, option.block2).view(-1, option.block2).amax(dim=1)
    scale2 = scale2.to(TORCH_DTYPES[option.scale2_dtype])
    step = _reference_scale_step(scale2, levels, absmax.numel(), option.block2)
    scale_codes = torch.where(step > 0, torch.round(shifted / step.clamp_min(1e-30)), 0).clamp_(0, levels)
    scales = scale_codes * step + offset
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = _reference_nearest_codes(blocks / safe.unsqueeze(1), option.bits, family).view(-1)
    return codes, scale_codes.to(torch.int32), scale2, offset.to(torch.float32), scales


def _reference_fake_quantize(weight: torch.Tensor, option: QuantOption, family: str) -> torch.Tensor:
    codes, _, _, _, scales = _reference_parts(weight, option, family)
    levels = codebook(option.bits, family)
    values = levels.index_select(0, codes).view(-1, option.block) * scales.unsqueeze(1)
    return values.view(-1)[: weight.numel()].view(weight.shape)


def _reference_pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    count = values.numel()
    flat = values.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    groups = _reference_pad_to(flat, 8).view(-1, 8)
    shifts = bits * torch.arange(8, dtype=torch.int64)
    words = (groups << shifts).sum(dim=1, keepdim=True)
    byte_shifts = 8 * torch.arange(bits, dtype=torch.int64)
    stream = ((words >> byte_shifts) & 0xFF).reshape(-1)
    return stream[: math.ceil(count * bits / 8)].to(torch.uint8)


def _spec_loop_fake_quantize(w: torch.Tensor, o: QuantOption, family: str = "nf") -> torch.Tensor:
    """Slow, loop-based restatement of SPEC §2.3 for one matrix."""
    flat = w.reshape(-1).double().tolist()
    blocks = [flat[i : i + o.block] for i in range(0, len(flat), o.block)]
    s = [max(abs(v) for v in b) for b in blocks]
    off = min(s)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[o.scale2_dtype]
    top = 2**o.scale_bits - 1
    scales = []
    for g in range(0, len(s), o.block2):
        a = float(torch.tensor(max(v - off for v in s[g : g + o.block2])).to(dtype).float())
        for v in s[g : g + o.block2]:
            q = 0 if a == 0 else min(max(round((v - off) * top / a), 0), top)
            scales.append(q * a / top + off)
    levels = codebook(o.bits, family).double().tolist()
    out = []
    for b, sh in zip(blocks, scales):
        for v in b:
            x = v / sh if sh > 0 else 0.0
            out.append(min(levels, key=lambda lv: abs(lv - x)) * sh)
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


@pytest.mark.parametrize(
    "option",
    [QuantOption(2, 2, "bf16", 16, 16), QuantOption(3, 4, "fp16", 32, 16), QuantOption(4, 8, "fp32", 16, 64)],
)
def test_fake_quantize_matches_loop_reference(option):
    torch.manual_seed(0)
    w = torch.randn(8, 64) * 0.05
    expected = _spec_loop_fake_quantize(w, option)
    assert torch.allclose(fake_quantize(w, option).double(), expected, atol=1e-6)


def test_error_falls_as_bits_rise_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    errors = [
        float(((fake_quantize(w, QuantOption(b, 8, "fp32", 64, 256)) - w) ** 2).mean()) for b in (2, 3, 4, 8)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 100


@pytest.mark.parametrize("shape", [(37, 13), (5,), (3, 7, 11), (64, 64)])
def test_padding_never_changes_real_weights(shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    option = QuantOption(3, 4, "bf16", 64, 16)
    q = fake_quantize(w, option)
    assert q.shape == w.shape
    # Appending extra weights after the tail only adds blocks; the real blocks are unchanged when the
    # extra weights never exceed the existing minimum block absmax and fill whole new groups.
    flat = w.reshape(-1)
    n_blocks = math.ceil(flat.numel() / 64)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * 64 - flat.numel()))
    assert torch.equal(fake_quantize(padded, option)[: flat.numel()], q.reshape(-1))


def test_zero_matrix_and_constant_blocks_do_not_produce_nans():
    for w in (torch.zeros(64, 64), torch.ones(32, 32) * 0.3):
        q = fake_quantize(w, QuantOption(2, 2, "bf16", 64, 256))
        assert torch.isfinite(q).all() and torch.allclose(q, w)


def _bitwise_stream(values: torch.Tensor, bits: int) -> list[int]:
    """The reference layout: value i's bit j is stream bit i*bits + j; byte k holds stream bits 8k..8k+7."""
    stream = [(int(v) >> j) & 1 for v in values for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(bit << j for j, bit in enumerate(stream[k : k + 8])) for k in range(0, len(stream), 8)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 13, 1001])
def test_bit_packing_round_trip_and_layout(bits, count):
    values = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert packed.tolist() == _bitwise_stream(values, bits)  # artifacts stay readable across versions
    assert torch.equal(unpack_bits(packed, bits, count), values)


@pytest.mark.parametrize("family", ["nf", "int"])
@pytest.mark.parametrize("option", OPTION_SPACE[::37])
def test_packed_form_dequantizes_exactly_and_has_the_promised_size(option, family):
    torch.manual_seed(2)
    w = torch.randn(64, 256) * 0.02  # numel divisible by every block * block2
    packed = quantize(w, option, family)
    assert torch.equal(packed.dequantize(), fake_quantize(w, option, family))
    assert packed.nbytes == math.ceil(option.storage_bits * w.numel() / 8) + 4  # + fp32 offset


def test_packed_form_of_odd_shape_round_trips():
    w = torch.randn(37, 13)
    option = QuantOption(3, 3, "bf16", 16, 16)
    assert torch.equal(quantize(w, option).dequantize(), fake_quantize(w, option))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality: same dtype and shape, and equal bytes (so -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def _tie_matrix() -> torch.Tensor:
    """Every block's absmax is exactly 1, so every scale is exactly 1 and x = w: midpoints (ties), their
    float neighbours and the levels of every codebook land on the search unchanged."""
    values = []
    for family in ("nf", "int"):
        for bits in (2, 3, 4, 8):
            levels = codebook(bits, family)
            values += [_mids(levels), _neighbours(_mids(levels)), levels]
    rows = _reference_pad_to(torch.cat(values), 15).view(-1, 15)
    ones = torch.tensor([1.0, -1.0]).repeat(rows.shape[0] // 2 + 1)[: rows.shape[0], None]
    return torch.cat([ones, rows], dim=1)  # (n, 16): a ±1 starts every 16 weights


def _edge_matrix() -> torch.Tensor:
    """Regions of 64: zeros, -0.0, tiny blocks whose scale quantizes to 0, ±absmax, a negative absmax."""
    g = torch.Generator().manual_seed(5)
    tiny = torch.randn(64, generator=g) * 1e-3
    spread = torch.randn(64, generator=g)
    spread[3], spread[40] = 2.5, -2.5
    negative = torch.randn(64, generator=g) * 0.1
    negative[17] = -0.9
    return torch.cat([torch.zeros(64), torch.full((64,), -0.0), tiny, spread, negative, tiny * 3]).view(6, 64)


def _matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(13)
    heavy = torch.randn(24, 40, generator=g) * torch.randn(24, 40, generator=g).mul(1.5).exp()
    return {
        "normal": torch.randn(16, 72, generator=g) * 0.02,  # 1152 weights: padded second-level groups
        "heavy_tailed": heavy * 0.01,  # a log-normal scale mixture: blocks with outliers
        "odd": torch.randn(7, 13, generator=g),  # 91 weights: the last block is zero-padded
        "ties": _tie_matrix(),
        "edges": _edge_matrix(),
        "negative_zero": torch.full((2, 40), -0.0),
    }


def _check_against_reference(w: torch.Tensor, option: QuantOption, family: str) -> None:
    codes, scale_codes, scale2, offset, scales = _reference_parts(w, option, family)
    packed = quantize(w, option, family)
    assert torch.equal(unpack_bits(packed.codes, option.bits, codes.numel()), codes.long())
    assert torch.equal(unpack_bits(packed.scale_codes, option.scale_bits, scales.numel()), scale_codes.long())
    assert _same_bits(packed.codes, _reference_pack_bits(codes, option.bits))
    assert _same_bits(packed.scale_codes, _reference_pack_bits(scale_codes, option.scale_bits))
    assert _same_bits(packed.scale2, scale2) and _same_bits(packed.offset, offset.reshape(()))
    expected = _reference_fake_quantize(w, option, family)
    assert _same_bits(fake_quantize(w, option, family), expected)
    assert _same_bits(packed.dequantize(), expected)


@pytest.mark.parametrize("family", ["nf", "int"])
@pytest.mark.parametrize("name", list(_matrices()))
def test_every_option_matches_the_reference_bit_for_bit(name, family):
    w = _matrices()[name]
    for option in OPTION_SPACE:
        _check_against_reference(w, option, family)


@pytest.mark.parametrize("family", ["nf", "int"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_match_the_reference(dtype, family):
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(9, 40, generator=g) * 0.05).to(dtype)
    for option in OPTION_SPACE[::5]:
        _check_against_reference(w, option, family)


@pytest.mark.parametrize("family", ["nf", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ties_go_to_the_lower_level(bits, family):
    w = _tie_matrix()  # scales are exactly 1 (see _tie_matrix)
    mids = _mids(codebook(bits, family))
    codes = unpack_bits(quantize(w, QuantOption(bits=bits), family).codes, bits, w.numel())
    assert torch.equal(codes, torch.bucketize(w.reshape(-1), mids))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 64, 1001, 40_000])
def test_packing_matches_the_reference_packer(bits, count):
    g = torch.Generator().manual_seed(bits + count)
    values = torch.randint(0, 2**bits, (count,), generator=g, dtype=torch.int32)
    old = _reference_pack_bits(values, bits)
    assert _same_bits(pack_bits(values, bits), old)  # artifacts written before and after are the same bytes
    assert torch.equal(unpack_bits(old, bits, count), values.long())  # and read the same
    assert torch.equal(unpack_bits(old, bits, count, torch.uint8), values.to(torch.uint8))


@pytest.mark.parametrize(
    ("chunk", "numpy_on_cpu"),  # numpy_on_cpu False: the torch ops other devices run, here on CPU
    [(16, True), (48, True), (16, False), (quantizer.CPU_CHUNK, False)],
)
def test_chunks_and_the_torch_path_match_the_reference(chunk, numpy_on_cpu, monkeypatch):
    monkeypatch.setattr(quantizer, "CPU_CHUNK", chunk)  # many chunks, a short last one, blocks over chunk
    monkeypatch.setattr(dequantize, "DEQUANT_CHUNK", chunk)  # and the same for the packed tensors' reader
    monkeypatch.setattr(codebooks, "NUMPY_ON_CPU", numpy_on_cpu)
    monkeypatch.setattr(fused, "ENABLED", False)  # the chunked numpy path, not the compiled one
    for name in ("normal", "odd", "edges", "ties"):
        for k, option in enumerate(OPTION_SPACE[::23]):
            _check_against_reference(_matrices()[name], option, ("nf", "int")[k % 2])


def test_a_matrix_over_two_default_chunks_matches_the_reference():
    w = torch.randn(263, 1000, generator=torch.Generator().manual_seed(3)) * 0.03  # CPU_CHUNK + a short tail
    assert quantizer.CPU_CHUNK < w.numel() < 2 * quantizer.CPU_CHUNK
    for option in OPTION_SPACE[::108]:  # bits 2, 3, 4, 8
        _check_against_reference(w, option, "nf" if option.bits != 3 else "int")


@pytest.mark.parametrize("family", ["nf", "int"])
def test_bytes_packed_by_the_earlier_code_still_load(family):
    w = _matrices()["heavy_tailed"]
    for option in OPTION_SPACE[::7]:
        codes, scale_codes, scale2, offset, _ = _reference_parts(w, option, family)
        old = PackedTensor(
            tuple(w.shape), option, family, _reference_pack_bits(codes, option.bits),
            _reference_pack_bits(scale_codes, option.scale_bits), scale2, offset.reshape(()),
        )  # fmt: skip
        assert _same_bits(old.dequantize(), _reference_fake_quantize(w, option, family))
