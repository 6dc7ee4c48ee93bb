"""Code families as objects (issue #26 item 1): the registry, one cost formula that agrees with the part
schema and the vectorised search encoding, and quantize/dequantize through the family object."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from coalora.deploy.sizes import packed_layout, packed_nbytes
from coalora.errors import CoaloraError
from coalora.quant import quantizer
from coalora.quant.codebooks import codebook
from coalora.quant.error_table import error_table
from coalora.quant.families import (
    CodeFamily,
    family_names,
    get_family,
    register_family,
    unregister_family,
)
from coalora.quant.families.blocked_codebook import BlockedCodebookFamily
from coalora.quant.options import OPTION_SPACE, QuantOption
from coalora.quant.qconfig import ConfigSpace
from coalora.quant.targets import TargetMatrix
from tests.test_quantizer import _reference_fake_quantize, _reference_pack_bits, _reference_parts

FAMILIES = ("nf", "int")
#: every 23rd option, then a few by hand: all bit widths, block sizes and scale2 dtypes are covered
SAMPLE = [*OPTION_SPACE[::23], QuantOption(8, 8, "bf16", 16, 16), QuantOption(2, 2, "fp16", 64, 256)]


def test_registry_returns_the_builtin_families():
    assert family_names()[:2] == FAMILIES
    for name in FAMILIES:
        family = get_family(name)
        assert isinstance(family, CodeFamily)
        assert family.name == name
    assert not torch.equal(get_family("nf").codebook(4), get_family("int").codebook(4)[:15])


def test_unknown_family_is_refused_in_one_line():
    with pytest.raises(CoaloraError) as caught:
        get_family("fp4")
    message = str(caught.value)
    assert "\n" not in message
    assert "unknown code family 'fp4'" in message and "nf, int" in message
    with pytest.raises(CoaloraError, match="code family 'fp4'"):
        codebook(4, "fp4")  # the old entry point goes through the registry too
    with pytest.raises(CoaloraError, match="code family 'fp4'"):
        quantizer.quantize(torch.ones(4, 16), QuantOption(), "fp4")


@pytest.mark.parametrize("name", FAMILIES)
def test_bits_per_weight_is_the_part_schema_per_weight(name):
    """For a size that fills whole groups of blocks, the stored bytes are bits_per_weight per weight plus
    the fp32 offset: the one cost formula and the artifact's part schema cannot drift apart."""
    family = get_family(name)
    for option in family.option_space:
        numel = option.block * option.block2 * 3
        schema = family.part_schema(option, numel)
        assert tuple(schema) == family.part_names
        nbytes = sum(part.nbytes for part in schema.values())
        per_matrix = schema["offset"].nbytes * 8
        assert nbytes * 8 == numel * family.bits_per_weight(option) + per_matrix, option
        double = sum(part.nbytes for part in family.part_schema(option, 2 * numel).values())
        assert (double - nbytes) * 8 / numel == family.bits_per_weight(option) == option.storage_bits
        assert packed_nbytes(option, numel, name) == nbytes
        assert packed_layout(option, numel, name) == {k: (p.dtype, p.count) for k, p in schema.items()}


@pytest.mark.parametrize("option", SAMPLE[::3], ids=lambda o: o.short())
def test_part_schema_is_what_quantize_stores(option):
    weight = torch.randn(37, 61, generator=torch.Generator().manual_seed(1))
    for name in FAMILIES:
        packed = get_family(name).quantize(weight, option)
        schema = get_family(name).part_schema(option, weight.numel())
        assert list(packed.parts()) == list(schema)
        for part, spec in schema.items():
            tensor = packed.parts()[part]
            assert (tensor.dtype, tensor.numel()) == (spec.dtype, spec.count), part
        assert packed.nbytes == sum(spec.nbytes for spec in schema.values())


@pytest.mark.parametrize("name", FAMILIES)
def test_vectorised_bits_equal_per_option_bits_for_all_432(name):
    family = get_family(name)
    assert len(family.option_space) == 432
    encoded = torch.tensor([family.encode(o) for o in family.option_space], dtype=torch.long)
    vectorised = family.bits_from_indices(encoded)
    expected = torch.tensor([family.bits_per_weight(o) for o in family.option_space], dtype=torch.float64)
    assert vectorised.dtype == torch.float64
    assert torch.equal(vectorised, expected)
    assert [family.decode(row) for row in encoded.tolist()] == list(family.option_space)
    # the search's batched cost goes through the same formula: a space whose matrices all take one option
    space = ConfigSpace([TargetMatrix("a", "q", 0, 16, 64), TargetMatrix("b", "k", 0, 32, 64)], family=name)
    batch = encoded.unsqueeze(1).expand(-1, 2, -1)
    assert torch.allclose(space.avg_bits_encoded(batch), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("option", SAMPLE, ids=lambda o: o.short())
def test_family_quantize_dequantize_is_bit_identical_to_the_quantizer(name, option):
    family = get_family(name)
    weight = torch.randn(37, 61, generator=torch.Generator().manual_seed(7)) * 0.05
    packed = family.quantize(weight, option)
    expected = quantizer._numpy_quantize(weight, option, name, None)  # the path the kernel must match
    for part, tensor in expected.parts().items():
        assert torch.equal(packed.parts()[part], tensor), part
    dense = family.dequantize(packed)
    assert torch.equal(dense, packed.dequantize())
    assert torch.equal(dense, quantizer.fake_quantize(weight, option, name))
    assert torch.equal(dense, family.fake_quantize(weight, option))
    # and to the pre-issue-#13 algorithm kept in test_quantizer as the oracle
    assert torch.equal(dense, _reference_fake_quantize(weight, option, name))
    codes = _reference_parts(weight, option, name)[0]
    assert torch.equal(packed.codes, _reference_pack_bits(codes, option.bits))


def test_error_table_dispatches_through_the_family():
    weights = {"w": torch.randn(24, 64, generator=torch.Generator().manual_seed(3))}
    options = SAMPLE[:6]
    for name in FAMILIES:
        table = get_family(name).error_table(weights, options)
        assert torch.equal(table, error_table(weights, options, family=name))
        direct = [
            float((weights["w"] - quantizer.fake_quantize(weights["w"], o, name)).square().sum())
            for o in options
        ]
        assert table[0].tolist() == pytest.approx(direct, rel=1e-4)


def _even_grid(bits: int) -> tuple[float, ...]:
    """2^bits evenly spaced levels with no zero level: unlike both built-in codebooks."""
    count = 2**bits
    return tuple(-1.0 + 2.0 * k / (count - 1) for k in range(count))


@pytest.fixture
def toy_family() -> Iterator[BlockedCodebookFamily]:
    family = register_family(BlockedCodebookFamily("toy-even", _even_grid, "test-only even grid"))
    yield family
    unregister_family("toy-even")


def test_registered_family_is_visible_and_used(toy_family):
    assert get_family("toy-even") is toy_family
    assert "toy-even" in family_names()
    assert codebook(2, "toy-even").tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    weight = torch.randn(20, 48, generator=torch.Generator().manual_seed(5))
    option = QuantOption(2, 8, "fp32", 16, 16)
    packed = quantizer.quantize(weight, option, "toy-even")
    assert packed.family == "toy-even"
    dense = packed.dequantize()
    assert torch.equal(dense, _reference_fake_quantize(weight, option, "toy-even"))
    assert not torch.equal(dense, quantizer.fake_quantize(weight, option, "int"))
    scales = packed.scales().repeat_interleave(option.block)[: weight.numel()].view(weight.shape)
    normalised = (dense / scales).unique()  # each weight is one of the toy levels times its block's scale
    assert all(min(abs(v - level) for level in _even_grid(2)) < 1e-5 for v in normalised.tolist())


def test_registry_refuses_duplicates_and_bad_codebooks(toy_family):
    with pytest.raises(CoaloraError, match="already registered"):
        register_family(BlockedCodebookFamily("toy-even", _even_grid))
    with pytest.raises(CoaloraError, match="built in"):
        unregister_family("nf")
    with pytest.raises(CoaloraError, match="built in"):
        register_family(BlockedCodebookFamily("int", _even_grid), replace=True)
    assert get_family("int").codebook(2).tolist() == [-1, 0, 1]
    bad = register_family(BlockedCodebookFamily("toy-bad", lambda bits: (0.5, -0.5)))
    try:
        with pytest.raises(CoaloraError, match="increasing values in"):
            bad.codebook(2)
    finally:
        unregister_family("toy-bad")
    with pytest.raises(CoaloraError, match="unknown code family 'toy-bad'"):
        get_family("toy-bad")
