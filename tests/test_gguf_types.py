"""llama.cpp block types in torch (issue #26): bytes, bits per weight, and a decoder equal to llama.cpp's.

The independent decoder is the ``gguf`` package (llama.cpp's own Python package): its numpy
``dequantize_blocks`` mirror ``dequantize_row_*``, so equality with it, bit for bit on float32, is the bar.
Its numpy quantizers (the 32-weight types only) are the error reference: ours must give the same bytes.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from coalora.errors import CoaloraError
from coalora.quant.gguf_kernels import dequantize, packed_bytes, quantize
from coalora.quant.gguf_types import GGUF_TYPES, QK_K, allowed_types, check_row_length, gguf_type

NAMES = tuple(GGUF_TYPES)
K_NAMES = tuple(n for n, t in GGUF_TYPES.items() if t.is_k_quant)
LEGACY = tuple(n for n in NAMES if n not in K_NAMES)
#: llama.cpp's bits per weight (``ggml_type_size * 8 / ggml_blck_size``)
BITS = {
    "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_0": 4.5, "Q4_K": 4.5, "Q4_1": 5.0,
    "Q5_0": 5.5, "Q5_K": 5.5, "Q5_1": 6.0, "Q6_K": 6.5625, "Q8_0": 8.5,
}  # fmt: skip
#: RMSE / std on a 64 x 1024 standard Gaussian, measured (noted in the comment) plus ~10% headroom
RMSE_BOUND = {
    "Q2_K": 0.30,  # 0.2701 (0.3286 with search=False)
    "Q3_K": 0.16,  # 0.1432 (0.1485)
    "Q4_0": 0.095,  # 0.0856 (the gguf package's quantizer: the same bytes)
    "Q4_K": 0.079,  # 0.0714 (0.0784)
    "Q4_1": 0.086,  # 0.0783
    "Q5_0": 0.047,  # 0.0427
    "Q5_K": 0.04,  # 0.0360 (0.0381)
    "Q5_1": 0.042,  # 0.0378
    "Q6_K": 0.019,  # 0.0173 (0.0183)
    "Q8_0": 0.0059,  # 0.0053
}


def _gguf_dequant(blocks: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GGMLQuantizationType[name]))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-pattern equality of float32 tensors (torch.equal would let -0.0 pass for 0.0)."""
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _rel_rmse(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return ((approx - weight).pow(2).mean().sqrt() / weight.std()).item()


@pytest.fixture(scope="module")
def hard_weights() -> torch.Tensor:
    """Gaussian rows with 1% outliers and the blocks encoders trip on: zero, constant, tiny, one-signed."""
    g = torch.Generator().manual_seed(26)
    w = torch.randn(24, 1024, generator=g)
    w = torch.where(torch.rand(w.shape, generator=g) < 0.01, w * 12, w)
    w[0] = 0.0
    w[1, :256] = 0.25
    w[2, :512] *= 1e-7  # fp16 super-scales underflow here
    w[3] = w[3].abs() + 0.5
    w[4] = -w[4].abs()
    w[5, ::2] = 0.0
    w[6, 100] = 40.0  # one spike per row: the sub-block holding it gets the largest scale
    return w


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gaussian_errors(gaussian: torch.Tensor) -> dict[tuple[str, bool], float]:
    """(type, search) -> RMSE / std on :func:`gaussian`."""
    return {
        (n, search): _rel_rmse(dequantize(quantize(gaussian, n, search=search), n, gaussian.shape), gaussian)
        for n in NAMES
        for search in (True, False)
    }


def test_table_matches_llama_cpp() -> None:
    for name, t in GGUF_TYPES.items():
        ggml = GGMLQuantizationType[name]
        assert t.ggml_id == ggml.value
        assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[ggml]
        assert t.bits_per_weight == BITS[name]
        assert t.is_k_quant == (t.block_size == QK_K)
        if t.is_k_quant:  # the fallback tiles any multiple of 32 and costs at least as many bits
            assert t.fallback is not None and not gguf_type(t.fallback).is_k_quant
            assert gguf_type(t.fallback).bits_per_weight >= t.bits_per_weight
    assert set(K_NAMES) == {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert gguf_type("q4_k") is GGUF_TYPES["Q4_K"]


@pytest.mark.parametrize("name", NAMES)
def test_decoder_equals_gguf_bit_for_bit(name: str, hard_weights: torch.Tensor) -> None:
    blocks = quantize(hard_weights, name)
    t = GGUF_TYPES[name]
    assert blocks.dtype == torch.uint8
    assert blocks.shape == (24, 1024 // t.block_size * t.type_size)
    assert (
        blocks.numel() == hard_weights.numel() // t.block_size * t.type_size == packed_bytes((24, 1024), name)
    )
    assert blocks.numel() * 8 / hard_weights.numel() == t.bits_per_weight
    ours = dequantize(blocks, name, hard_weights.shape)
    assert ours.dtype == torch.float32 and bool(torch.isfinite(ours).all())
    assert _same_bits(ours, _gguf_dequant(blocks, name))
    assert torch.equal(ours[0], torch.zeros(1024))  # an all-zero row stays exactly zero
    # numpy bytes read the same as torch bytes
    assert _same_bits(dequantize(blocks.numpy(), name, (24, 1024)), ours)


@pytest.mark.parametrize("name", NAMES)
def test_decoder_on_arbitrary_bytes(name: str) -> None:
    """Every bit pattern decodes as llama.cpp decodes it, not only the encoder's (fp16 fields kept finite)."""
    t = GGUF_TYPES[name]
    raw = torch.randint(
        0, 256, (40, t.type_size), generator=torch.Generator().manual_seed(7), dtype=torch.uint8
    )
    fp16_fields = {"Q2_K": (80, 82), "Q3_K": (108,), "Q6_K": (208,)}.get(
        name, (0, 2) if name[-1] in "1K" else (0,)
    )
    for at in fp16_fields:  # a small finite fp16 (exponent bits not all ones), random sign and mantissa
        raw[:, at + 1] &= 0xBB
    assert _same_bits(dequantize(raw, name, (40, t.block_size)), _gguf_dequant(raw, name))


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_equal_gguf_quantizer(name: str, hard_weights: torch.Tensor) -> None:
    """The 32-weight encoders are llama.cpp's reference ones, as the gguf package also implements them."""
    expected = gguf.quants.quantize(hard_weights.numpy(), GGMLQuantizationType[name])
    assert np.array_equal(quantize(hard_weights, name).numpy(), expected)


@pytest.mark.parametrize("name", NAMES)
def test_error_bounded(name: str, gaussian_errors: dict[tuple[str, bool], float]) -> None:
    assert gaussian_errors[name, True] < RMSE_BOUND[name]
    # the K-quants' scale search never loses to the plain range fit (the 32-weight types have no search)
    assert gaussian_errors[name, True] <= gaussian_errors[name, False] + 1e-6


def test_error_falls_with_bits(gaussian_errors: dict[tuple[str, bool], float]) -> None:
    errors = {n: gaussian_errors[n, True] for n in NAMES}
    k_ladder = [errors[n] for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]
    assert k_ladder == sorted(k_ladder, reverse=True)
    by_bits = sorted(NAMES, key=lambda n: GGUF_TYPES[n].bits_per_weight)
    assert errors[by_bits[0]] == max(errors.values()) and errors[by_bits[-1]] == min(errors.values())
    # at equal bits a K-quant beats the 32-weight type: Q4_K vs Q4_0 (4.5), Q5_K vs Q5_0 (5.5)
    assert errors["Q4_K"] < errors["Q4_0"] and errors["Q5_K"] < errors["Q5_0"]


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_round_trip_is_idempotent(name: str, gaussian: torch.Tensor) -> None:
    """Requantizing decoded weights gives the same bytes: each block's extreme decodes to an exact
    multiple of the stored scale, so the scale and every code come back (blocks with no zero scale).

    Not the K-quants: their sub-block scales are re-searched on the decoded values and then rounded to
    4/6/8 bits against a new fp16 super-scale, which need not land on the old grid (a Q2_K weight can
    move by most of a step)."""
    blocks = quantize(gaussian, name)
    assert torch.equal(quantize(dequantize(blocks, name, gaussian.shape), name), blocks)


def test_any_leading_shape_and_dtype() -> None:
    w = torch.randn(2, 3, 512, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    blocks = quantize(w, "Q4_K")
    assert blocks.shape == (2, 3, 2 * 144)
    flat = dequantize(quantize(w.float().reshape(6, 512), "Q4_K"), "Q4_K", (6, 512))
    assert torch.equal(dequantize(blocks, "Q4_K", w.shape).reshape(6, 512), flat)


def test_k_quant_refused_on_rows_not_a_multiple_of_256() -> None:
    w = torch.randn(8, 384)
    for name in K_NAMES:
        fallback = GGUF_TYPES[name].fallback
        with pytest.raises(
            CoaloraError,
            match=f"{name} needs rows whose length is a multiple of 256, got 384; use {fallback}",
        ) as err:
            quantize(w, name)
        assert "\n" not in str(err.value) and "multiples of 32" in str(err.value)
        with pytest.raises(CoaloraError, match="multiple of 256"):
            dequantize(torch.zeros(8 * 384, dtype=torch.uint8), name, (8, 384))
    for name in LEGACY:  # the fallbacks take it
        assert quantize(w, name).shape[0] == 8
    with pytest.raises(
        CoaloraError, match="multiple of 32, got 48; no GGUF block type fits it, keep this matrix in F16"
    ):
        check_row_length("Q8_0", 48)
    with pytest.raises(CoaloraError, match=r"multiple of 256, got 100; .*F16"):
        check_row_length("Q6_K", 100)
    assert [t.name for t in allowed_types(384)] == list(LEGACY)
    assert [t.name for t in allowed_types(1536)] == list(NAMES)
    assert allowed_types(40) == ()


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(CoaloraError, match="unknown GGUF type 'Q7_K'; use one of: Q4_0"):
        quantize(torch.randn(2, 256), "Q7_K")
    with pytest.raises(
        CoaloraError, match="Q4_K data for shape \\(2, 256\\) must be 288 uint8 bytes; got 10 uint8"
    ):
        dequantize(torch.zeros(10, dtype=torch.uint8), "Q4_K", (2, 256))
    with pytest.raises(CoaloraError, match="got 288 float32"):
        dequantize(torch.zeros(288), "Q4_K", (2, 256))
    with pytest.raises(CoaloraError, match="cannot quantize to Q8_0: the weights hold NaN or Inf"):
        quantize(torch.tensor([[float("nan")] * 32]), "Q8_0")


@pytest.mark.slow
def test_real_minilm_weights() -> None:
    """A real MiniLM layer: the 384-wide rows take the 32-weight types only, the 1536-wide rows all types."""
    from coalora.pretrained import DEFAULT_MODEL, load_classifier

    layer = load_classifier(DEFAULT_MODEL, num_labels=2).bert.encoder.layer[0]
    for weight, names in (
        (layer.intermediate.dense.weight.detach(), LEGACY),  # 1536 x 384
        (layer.output.dense.weight.detach(), NAMES),  # 384 x 1536
    ):
        for name in names:
            blocks = quantize(weight, name)
            ours = dequantize(blocks, name, weight.shape)
            assert _same_bits(ours, _gguf_dequant(blocks, name)), name
            if name in LEGACY:
                expected = gguf.quants.quantize(weight.numpy(), GGMLQuantizationType[name])
                assert np.array_equal(blocks.numpy(), expected), name
            assert _rel_rmse(ours, weight) < 1.5 * RMSE_BOUND[name], name
