"""The ``gguf`` code family (issue #26 item 2, first step): llama.cpp's block types as one registered family.

Costs must be llama.cpp's (held to the part schema's bytes and to the issue's figures), quantize/dequantize
through the family must be the kernels' own bytes and floats (and the ``gguf`` package's decoder), and the
error table must be the direct sum with +inf where a K-quant cannot tile a row.
"""

from __future__ import annotations

import pytest
import torch

from coalora.errors import CoaloraError
from coalora.quant import gguf_kernels
from coalora.quant.families import CodeFamily, family_names, get_family
from coalora.quant.families.gguf_family import TYPE_NAMES, GGUFFamily, GGUFOption, GGUFPacked
from coalora.quant.gguf_types import GGUF_TYPES

FAMILY = get_family("gguf")
OPTIONS = FAMILY.option_space
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Float32 bit-pattern equality (torch.equal would let -0.0 pass for 0.0)."""
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(262)
    w = torch.randn(6, 512, generator=g)
    w[0, :7] *= 20  # a few outliers
    return w


def test_registry_and_option_type():
    assert isinstance(FAMILY, GGUFFamily) and isinstance(FAMILY, CodeFamily)
    assert family_names()[:3] == ("nf", "int", "gguf")
    assert FAMILY.name == "gguf" and FAMILY.field_names == ("type",) and FAMILY.field_sizes == (10,)
    assert GGUFOption("q4_k") == GGUFOption("Q4_K") and hash(GGUFOption("q4_k")) == hash(GGUFOption("Q4_K"))
    with pytest.raises(CoaloraError, match=r"unknown gguf option type 'Q7_K'; use one of: Q2_K, Q3_K") as e:
        GGUFOption("Q7_K")
    assert "\n" not in str(e.value)
    with pytest.raises(CoaloraError, match="no codebook"):
        FAMILY.codebook(4)


def test_gguf_is_offered_for_training_and_a_family_that_does_not_train_is_refused_up_front():
    """gguf trains (issue #26 item 2); a registered family with ``trains = False`` is still refused."""
    from coalora.quant.families import register_family, unregister_family
    from coalora.quant.families.gguf_family import GGUFFamily
    from coalora.tasks.validation import check_task_arguments

    assert "gguf" in family_names(trainable=True)
    assert family_names(trainable=True)[:2] == ("nf", "int")
    check_task_arguments({"code_family": "gguf"})
    check_task_arguments({"code_family": "int"})

    class Frozen(GGUFFamily):
        name = "toy-frozen"
        trains = False

    register_family(Frozen())
    try:
        assert "toy-frozen" in family_names() and "toy-frozen" not in family_names(trainable=True)
        with pytest.raises(CoaloraError, match="cannot train with it yet") as e:
            check_task_arguments({"code_family": "toy-frozen"})
        assert "\n" not in str(e.value)
    finally:
        unregister_family("toy-frozen")


def test_issue_types_present_and_index_monotone_in_bits():
    assert {"Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q4_0"} <= set(TYPE_NAMES)
    bits = [FAMILY.bits_per_weight(o) for o in OPTIONS]
    assert bits == sorted(bits)
    assert TYPE_NAMES[0] == "Q2_K" and TYPE_NAMES[-1] == "Q8_0"


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.type)
def test_bits_match_part_schema_and_encoding_round_trips(option):
    numel = 256 * 4
    schema = FAMILY.part_schema(option, numel)
    assert list(schema) == list(FAMILY.part_names) == ["blocks"]
    assert schema["blocks"].dtype == torch.uint8
    assert FAMILY.bits_per_weight(option) == schema["blocks"].nbytes * 8 / numel
    assert FAMILY.bits_per_weight(option) == GGUF_TYPES[option.type].bits_per_weight == option.bits
    assert FAMILY.decode(FAMILY.encode(option)) == option
    assert FAMILY.encode(option) == (TYPE_NAMES.index(option.type),)


def test_issue_bits_and_vectorised_bits():
    assert FAMILY.bits_per_weight(GGUFOption("Q2_K")) == 2.625
    assert FAMILY.bits_per_weight(GGUFOption("Q8_0")) == 8.5
    indices = torch.arange(len(OPTIONS)).reshape(-1, 1)
    vector = FAMILY.bits_from_indices(indices)
    assert vector.dtype == torch.float64
    assert vector.tolist() == [FAMILY.bits_per_weight(o) for o in OPTIONS]
    assert FAMILY.bits_from_indices(torch.tensor([[[9], [0]]])).tolist() == [[8.5, 2.625]]
    with pytest.raises(CoaloraError, match="one index"):
        FAMILY.decode([10])


def test_part_schema_refuses_partial_blocks():
    with pytest.raises(CoaloraError, match="whole blocks of 256 weights; 320 weights are not"):
        FAMILY.part_schema(GGUFOption("Q4_K"), 320)
    assert FAMILY.part_schema(GGUFOption("Q4_0"), 320)["blocks"].count == 10 * 18


def test_allowed_keeps_k_quants_off_short_rows():
    assert FAMILY.allowed(GGUFOption("Q4_K"), 512) and not FAMILY.allowed(GGUFOption("Q4_K"), 320)
    assert [o.type for o in FAMILY.allowed_options(320)] == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    assert FAMILY.allowed_options(512) == OPTIONS
    assert FAMILY.allowed_options(100) == ()


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.type)
def test_quantize_dequantize_equal_the_kernels(option, weight):
    packed = FAMILY.quantize(weight, option)
    assert isinstance(packed, GGUFPacked) and packed.shape == (6, 512) and packed.option == option
    expected_bytes = gguf_kernels.quantize(weight, option.type)
    assert torch.equal(packed.blocks, expected_bytes.reshape(-1))
    assert packed.nbytes == FAMILY.part_schema(option, weight.numel())["blocks"].nbytes
    assert packed.nbytes == gguf_kernels.packed_bytes(weight.shape, option.type)
    expected = gguf_kernels.dequantize(expected_bytes, option.type, weight.shape)
    assert _same_bits(FAMILY.dequantize(packed), expected)
    assert _same_bits(FAMILY.fake_quantize(weight, option), expected)
    both = FAMILY.quantize_both(weight, option)
    assert torch.equal(both[0].blocks, packed.blocks) and _same_bits(both[1], expected)
    buffer = torch.full((weight.numel() + 5,), 7.0)
    into = packed.dequantize(out=buffer)
    assert _same_bits(into, expected) and into.data_ptr() == buffer.data_ptr()
    assert buffer[-5:].eq(7.0).all()


@pytest.mark.parametrize("name", ["Q2_K", "Q5_K", "Q8_0"])
def test_dequantize_equals_the_gguf_package(name, weight):
    gguf = pytest.importorskip("gguf")
    packed = FAMILY.quantize(weight, GGUFOption(name))
    raw = packed.blocks.reshape(weight.shape[0], -1).numpy()
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]))
    assert _same_bits(packed.dequantize(), theirs.reshape(weight.shape))


def test_quantize_refuses_what_does_not_apply(weight):
    with pytest.raises(CoaloraError, match="without absmax"):
        FAMILY.quantize(weight, GGUFOption("Q4_0"), absmax=torch.ones(1))
    with pytest.raises(CoaloraError, match="multiple of 256, got 320"):
        FAMILY.quantize(torch.randn(2, 320), GGUFOption("Q3_K"))


def _direct(w: torch.Tensor, name: str) -> torch.Tensor:
    """E = W - dequant(quant(W)) straight from the kernels, float64."""
    deq = gguf_kernels.dequantize(gguf_kernels.quantize(w, name), name, w.shape)
    return (w - deq).double()


def test_error_table_plain_fisher_and_inf_for_short_rows():
    g = torch.Generator().manual_seed(7)
    weights = {"a": torch.randn(4, 512, generator=g), "short": torch.randn(3, 320, generator=g)}
    fisher = {k: torch.rand(w.shape, generator=g) for k, w in weights.items()}
    names = ["Q4_0", "Q4_K", "Q8_0", "Q2_K"]
    options = [GGUFOption(n) for n in names]
    plain = FAMILY.error_table(weights, options)
    weighted = FAMILY.error_table(weights, options, fisher=fisher)
    assert plain.shape == weighted.shape == (2, 4) and plain.dtype == torch.float64
    for i, (key, w) in enumerate(weights.items()):
        for k, name in enumerate(names):
            if key == "short" and name in K_TYPES:
                assert plain[i, k] == torch.inf and weighted[i, k] == torch.inf
                continue
            residual = _direct(w, name)
            assert plain[i, k].item() == pytest.approx(residual.square().sum().item(), rel=1e-12)
            direct_f = (fisher[key].double() * residual.square()).sum().item()
            assert weighted[i, k].item() == pytest.approx(direct_f, rel=1e-12)
            assert 0 < plain[i, k] < torch.inf
    assert plain[0, 2] < plain[0, 0] < plain[0, 3]  # Q8_0 beats Q4_0 beats Q2_K


def test_error_table_activation_weighted():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(3, 256, generator=g)
    x = torch.randn(64, 256, generator=g)
    h = x.T @ x / 64
    h[0, 1] += 0.5  # not symmetric (its antisymmetric part adds nothing to tr(E H Eᵀ))
    table = FAMILY.error_table({"m": w}, [GGUFOption("Q3_K"), GGUFOption("Q4_1")], hessians={"m": h})
    for k, name in enumerate(["Q3_K", "Q4_1"]):
        e = _direct(w, name)
        sym = (h.double() + h.double().T) / 2
        assert table[0, k].item() == pytest.approx(torch.trace(e @ sym @ e.T).item(), rel=1e-10)
    with pytest.raises(CoaloraError, match="not both"):
        FAMILY.error_table({"m": w}, [GGUFOption("Q3_K")], fisher={"m": w}, hessians={"m": h})
