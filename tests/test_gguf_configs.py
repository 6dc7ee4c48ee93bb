"""The ``gguf`` code family's configuration space (issue #26 item 2), without a model: which types each
row length takes, allocation to a budget, qconfig files, the mapper's and the search's encoding of an
option (its one type index), the weight cache, and the one-line refusals (gptq, budgets out of reach).

Rows of 256 and 512 weights take every type; rows of 96 only the 32-weight types (Q4_0 .. Q8_0).
The end-to-end run (fit, evaluate, adapt, load, llama.cpp) is tests/test_gguf_training.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from coalora.errors import CoaloraError
from coalora.quant.families import get_family
from coalora.quant.families.gguf_family import TYPE_NAMES, GGUFOption
from coalora.quant.qconfig import ConfigSpace, QConfig
from coalora.quant.targets import TargetMatrix

GGUF = get_family("gguf")
pytestmark = pytest.mark.usefixtures("module_cache")


def _space() -> ConfigSpace:
    """Rows of 256 (any type), 96 (32-weight types only) and 512 (any type)."""
    targets = [
        TargetMatrix("a.q", "q", 0, 64, 256),
        TargetMatrix("a.down", "down", 0, 256, 96),
        TargetMatrix("b.up", "up", 1, 96, 512),
    ]
    return ConfigSpace(targets, model="toy", family="gguf")


def _fits(space: ConfigSpace, config: QConfig) -> bool:
    return all(GGUF.allowed(config.matrices[t.name], t.in_features) for t in space.targets)


# -- configuration space, allocation ---------------------------------------------------------------------
def test_the_space_gives_each_row_length_only_the_types_that_tile_it():
    space = _space()
    mask = space.option_mask
    assert mask[0].all() and mask[2].all()
    assert {TYPE_NAMES[k] for k in mask[1].nonzero().squeeze(1).tolist()} == {
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"
    }  # fmt: skip
    low, high = space.budget_range()
    assert low == pytest.approx((2.625 * (64 * 256 + 96 * 512) + 4.5 * 256 * 96) / space.total_numel)
    assert high == 8.5
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert _fits(space, space.random(generator))
        near = space.random_near(3.0, generator)
        assert _fits(space, near) and near.matrices["a.down"].type == "Q4_0"  # the cheapest its rows take
    assert {space.random_near(6.2, generator).matrices["a.q"].type for _ in range(60)} == {"Q5_1", "Q6_K"}


def test_allocation_meets_the_budget_and_never_picks_a_type_a_row_refuses():
    from coalora.quant.allocate import allocate, cached_allocate

    space = _space()
    # the refused K-quants are the least-error options of the 96-row matrix: only the mask keeps them out
    errors = torch.tensor([[10.0 - k for k in range(10)]] * 3, dtype=torch.float64)
    for budget in (3.14, 4.0, 4.6, 5.5, 7.0, 8.5):
        config = allocate(space, errors, budget)
        assert _fits(space, config) and space.avg_bits(config) <= budget + 1e-12
    # the family's own table (+inf where a type cannot tile) through the task's cached path
    weights = {
        t.name: torch.randn(t.out_features, t.in_features, generator=torch.Generator().manual_seed(i))
        for i, t in enumerate(space.targets)
    }
    table = GGUF.error_table(weights, GGUF.option_space)
    assert torch.isinf(table[1]).sum() == 5 and torch.isfinite(table[[0, 2]]).all()
    config = cached_allocate(space, table, 4.0)
    assert _fits(space, config) and space.avg_bits(config) <= 4.0
    assert cached_allocate(space, table, 4.0) == config  # read back from the allocation cache
    with pytest.raises(
        CoaloraError, match=r"outside what gguf options reach on this model \(3\.1364\.\.8\.5000 bits\)"
    ) as e:
        allocate(space, table, 2.7)
    assert "\n" not in str(e.value)


def test_a_qconfig_round_trips_and_bad_ones_are_refused_in_one_line(tmp_path):
    space = _space()
    config = space.make([GGUFOption("Q4_K"), GGUFOption("Q5_0"), GGUFOption("Q8_0")])
    path = tmp_path / "mix.json"
    space.save(config, path)
    assert json.loads(path.read_text())["matrices"]["a.down"] == {"type": "Q5_0"}
    assert space.load(path) == config
    data = json.loads(path.read_text())
    bad_cases = {
        "Q7_K": r"matrix 'a\.q': unknown gguf option type 'Q7_K'; use one of: Q2_K",
        "Q4_K@down": r"'a\.down' \(rows of 96 weights\) cannot take gguf Q4_K; its rows allow Q4_0",
    }
    for case, message in bad_cases.items():
        broken = json.loads(json.dumps(data))
        broken.pop("avg_bits")
        if case == "Q7_K":
            broken["matrices"]["a.q"] = {"type": "Q7_K"}
        else:
            broken["matrices"]["a.down"] = {"type": "Q4_K"}
        path.write_text(json.dumps(broken))
        with pytest.raises(CoaloraError, match=message) as e:
            space.load(path)
        assert "\n" not in str(e.value)
    with pytest.raises(CoaloraError, match="not a 'gguf' option") as e:  # an nf option in a gguf space
        from coalora.quant.options import NF4_DOUBLE_QUANT

        space.validate(space.uniform(NF4_DOUBLE_QUANT))
    assert "\n" not in str(e.value)


# -- mapper, search, weight cache -------------------------------------------------------------------------
def test_the_mapper_and_the_search_encode_a_gguf_option_as_its_type_index():
    from coalora.nn.mapper import ConfigMapper
    from coalora.search.candidates import random_encodings
    from coalora.search.surrogate import EncodingBits

    space = _space()
    config = space.make([GGUFOption("Q2_K"), GGUFOption("Q8_0"), GGUFOption("Q6_K")])
    encoded = space.encode(config)
    assert encoded.tolist() == [[0], [9], [8]] and space.decode(encoded) == config
    assert space.normalise(encoded.unsqueeze(0)).tolist() == [[0.0, 1.0, 8 / 9]]
    mapper = ConfigMapper(4, 2, 3, field_sizes=GGUF.field_sizes)
    assert [e.num_embeddings for e in mapper.field_embeddings] == [10]
    out = mapper(encoded, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 4, 4)
    # a K-quant index on the 96-row matrix moves to the nearest type its rows take, in the search's bits too
    restricted = space.restrict(torch.tensor([[[3], [3], [3]], [[1], [0], [7]]]))
    assert restricted.tolist() == [[[3], [2], [3]], [[1], [2], [7]]]
    bits = EncodingBits(space)(space.normalise(torch.tensor([[[3], [3], [3]]])))
    assert bits.item() == pytest.approx(space.avg_bits(space.decode(restricted[0])))
    drawn = random_encodings(space, 40, torch.Generator().manual_seed(0), (4.0, 7.0))
    assert drawn.shape == (40, 3, 1)
    assert all(_fits(space, space.decode(e)) for e in drawn)


def test_the_weight_cache_holds_gguf_blocks_and_hands_out_llamacpps_dequantization():
    from coalora.nn.weight_cache import QuantCache

    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    option = GGUFOption("Q3_K")
    want = GGUF.fake_quantize(weight, option)
    for mode in ("dense", "packed"):
        cache = QuantCache(1 << 20, "gguf", mode, keep_codes=True)
        assert torch.equal(cache.get("w", option, weight), want)
        assert torch.equal(cache.get("w", option, weight), want) and cache.hits == 1
        packed = cache.packed_form("w", option)
        assert packed is not None and packed.option == option and torch.equal(packed.dequantize(), want)
        assert cache.nbytes >= packed.nbytes == 32 * 256 * 3.4375 / 8


def test_gptq_rounding_and_unknown_families_are_refused_in_one_line():
    from coalora.quant.rounding import Rounder
    from coalora.tasks.validation import check_task_arguments

    for call in (
        lambda: check_task_arguments({"code_family": "gguf", "rounding": "gptq"}),
        lambda: Rounder("gptq", "gguf"),
    ):
        with pytest.raises(CoaloraError, match=r"gptq does not apply to code_family gguf.*use rounding") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(CoaloraError, match=r"budget 2\.5 bits is outside the achievable range 2\.625") as e:
        check_task_arguments({"code_family": "gguf", "eval_budgets": [2.5]})
    assert "\n" not in str(e.value)
