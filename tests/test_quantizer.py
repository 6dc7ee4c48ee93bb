"""Codebooks, storage cost and the block-wise double quantizer (SPEC §2.2, §2.3)."""

from __future__ import annotations

import math

import pytest
import torch

from coalora.errors import CoaloraError
from coalora.quant.codebooks import codebook, nearest_codes
from coalora.quant.options import NF4_DOUBLE_QUANT, OPTION_SPACE, QuantOption
from coalora.quant.quantizer import fake_quantize, pack_bits, quantize, unpack_bits

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


def _reference_fake_quantize(w: torch.Tensor, o: QuantOption, family: str = "nf") -> torch.Tensor:
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
    expected = _reference_fake_quantize(w, option)
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
