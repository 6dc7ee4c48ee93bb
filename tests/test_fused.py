"""The compiled quantizer pass (issue #25 part 2) against the numpy path and the oracle, the block absmax
store, the weight cache's one-rounding-per-entry and kept codes, and budgets through the allocation cache.

The numpy path (``fused.ENABLED = False``) is today's quantizer before this issue, kept as the fallback;
tests/test_quantizer.py's ``_reference_parts`` is the oracle both must match bit for bit.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from coalora.nn.weight_cache import AbsmaxStore, QuantCache
from coalora.quant import fused
from coalora.quant.options import OPTION_SPACE, TORCH_DTYPES, QuantOption
from coalora.quant.quantizer import (
    PackedTensor,
    block_absmax,
    compiled,
    fake_quantize,
    quantize,
    quantize_both,
)
from coalora.quant.rounding import Rounder
from tests.test_quantizer import _check_against_reference, _matrices, _same_bits

needs_kernel = pytest.mark.skipif(
    not compiled(torch.zeros(1)), reason="the fused kernel could not be built here (no C++ compiler?)"
)


def _forms(w: torch.Tensor, option: QuantOption, family: str, on: bool, absmax=None) -> list[torch.Tensor]:
    """Everything the quantizer returns for ``w``, with the compiled pass on or off."""
    saved, fused.ENABLED = fused.ENABLED, on
    try:
        packed, dense = quantize_both(w, option, family, absmax)
        alone = quantize(w, option, family, absmax)
        return [
            *(
                getattr(p, part)
                for p in (packed, alone)
                for part in ("codes", "scale_codes", "scale2", "offset")
            ),
            dense,
            fake_quantize(w, option, family, absmax),
            packed.dequantize(),
        ]
    finally:
        fused.ENABLED = saved


def _assert_same(w: torch.Tensor, option: QuantOption, family: str, absmax=None) -> None:
    fast, slow = _forms(w, option, family, True, absmax), _forms(w, option, family, False)
    for k, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert _same_bits(a, b), (option, family, k)
    assert _same_bits(fast[8], fast[9]) and _same_bits(fast[8], fast[10])  # one pass, three ways


@needs_kernel
@pytest.mark.parametrize("family", ["nf", "int"])
def test_the_compiled_pass_gives_the_numpy_paths_bits_for_every_option(family):
    g = torch.Generator().manual_seed(21)
    heavy = torch.randn(9, 61, generator=g) * torch.randn(9, 61, generator=g).mul(1.5).exp() * 0.01
    for option in OPTION_SPACE:  # 549 weights: a partial last block and partial second-level groups
        _assert_same(heavy, option, family)


@needs_kernel
@pytest.mark.parametrize("name", ["ties", "edges", "negative_zero", "odd"])
def test_the_compiled_pass_matches_on_ties_edges_and_tails(name):
    w = _matrices()[name]
    for k, option in enumerate(OPTION_SPACE[::5]):
        _assert_same(w, option, ("nf", "int")[k % 2])


@needs_kernel
def test_the_compiled_pass_matches_on_real_minilm_weights():
    from coalora.pretrained import DEFAULT_MODEL, load_classifier
    from coalora.quant.targets import discover_targets, target_weights

    model = load_classifier(DEFAULT_MODEL, num_labels=2)
    weights = list(target_weights(model, discover_targets(model)).values())
    query, intermediate = weights[0], next(w for w in weights if w.shape[0] != w.shape[1])
    grid = itertools.product((2, 3, 4, 8), (16, 32, 64))  # every bit width and block size
    for k, (bits, block) in enumerate(grid):
        option = QuantOption(
            bits, (2, 3, 4, 8)[k % 4], ("bf16", "fp16", "fp32")[k % 3], block, (16, 64, 256)[k % 3]
        )
        w = query if k % 2 else intermediate
        _assert_same(w, option, ("nf", "int")[k % 3 % 2], absmax=block_absmax(w, block))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_weight_dtypes_take_the_compiled_pass_with_the_same_bits(dtype):
    w = (torch.randn(7, 48, generator=torch.Generator().manual_seed(4)) * 0.05).to(dtype)
    for option in OPTION_SPACE[::31]:
        _assert_same(w, option, "nf")


@needs_kernel
def test_weights_that_are_not_finite_fall_back_to_the_numpy_path():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    w[1, 3], w[2, 9] = float("nan"), float("inf")
    for option in (QuantOption(2, 8, "fp32", 16, 16), QuantOption(3, 4, "bf16", 64, 256)):  # a NaN is
        fast, slow = _forms(w, option, "nf", True), _forms(w, option, "nf", False)  # code 0 there
        assert all(_same_bits(a, b) for a, b in zip(fast, slow, strict=True))


@needs_kernel
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_the_kernel_stores_second_level_scales_as_torch_converts_them(dtype):
    kernel = fused.kernel(lambda k: True)
    assert kernel is not None
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 0x7F800000, (1 << 20,), generator=g, dtype=torch.int64)  # finite, >= 0
    ties = torch.arange(0, 0x7F800000, 0x10000 * 97, dtype=torch.int64)  # low 16 bits exactly half
    ties = torch.cat([ties | 0x8000, ties | 0x18000, ties | 0x1000, ties | 0x3000, ties | 0x7FFF])
    subnormal = torch.randint(0, 0x800000, (4096,), generator=g, dtype=torch.int64)
    x = torch.cat([patterns, ties, subnormal]).to(torch.int32).view(torch.float32)
    edges = [0.0, 65504.0, 65519.996, 65520.0, 65536.0, 3e38, 2.0**-14, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25]
    x = torch.cat([x, torch.tensor(edges), torch.tensor(edges).nextafter(torch.tensor(1e39))])
    assert _same_bits(kernel.scale2(x, dtype), x.to(TORCH_DTYPES[dtype]))


@needs_kernel
@pytest.mark.parametrize("scale", [1e-9, 1e5, 3e38])
def test_tiny_and_huge_weights_take_the_same_path_either_way(scale):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(9)) * scale  # fp16 scale2: 0 or inf
    for option in OPTION_SPACE[::17]:
        _assert_same(w.clamp(-3.4e38, 3.4e38), option, "nf")


@pytest.mark.parametrize("family", ["nf", "int"])
def test_the_numpy_path_still_matches_the_oracle(family, monkeypatch):
    monkeypatch.setattr(fused, "ENABLED", False)
    for name in ("normal", "odd", "edges", "ties"):
        for option in OPTION_SPACE[::19]:
            _check_against_reference(_matrices()[name], option, family)


def test_block_absmax_is_the_same_either_way_and_feeds_every_option(monkeypatch):
    w = _matrices()["heavy_tailed"]
    found = block_absmax(w, 16)
    monkeypatch.setattr(fused, "ENABLED", False)
    assert _same_bits(found, block_absmax(w, 16))
    assert _same_bits(found, w.reshape(-1, 16).abs().amax(1))
    for option in [o for o in OPTION_SPACE if o.block == 16][::9]:
        assert _same_bits(quantize(w, option, absmax=found).codes, quantize(w, option).codes)


def test_the_absmax_store_reuses_only_the_same_weight_at_the_same_version(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "coalora.nn.weight_cache.block_absmax", lambda w, b: calls.append(b) or block_absmax(w, b)
    )
    store = AbsmaxStore(1 << 20)
    w = torch.randn(8, 64)
    first = store.get("w", w, 64)
    assert store.get("w", w.detach(), 64) is first and len(calls) == 1  # a view of the same memory
    assert store.get("w", w, 32) is not first and len(calls) == 2  # another block size
    with torch.no_grad():
        w.mul_(2)  # an in-place change bumps the version
    assert _same_bits(store.get("w", w, 64), first * 2) and len(calls) == 3
    assert _same_bits(store.get("w", w.clone(), 64), first * 2) and len(calls) == 4  # other memory
    small = AbsmaxStore(40)  # room for one entry of 8 blocks (32 bytes)
    small.get("a", w, 64)
    small.get("b", w, 64)
    small.get("a", w, 64)
    assert len(calls) == 7  # "a" was evicted by "b"


def test_quantize_both_is_quantize_and_fake_quantize():
    w = torch.randn(37, 13, generator=torch.Generator().manual_seed(8))
    for option in OPTION_SPACE[::53]:
        packed, dense = quantize_both(w, option, "int")
        assert _same_bits(packed.codes, quantize(w, option, "int").codes)
        assert _same_bits(dense, fake_quantize(w, option, "int")) and dense.shape == w.shape


def _counting(monkeypatch) -> list[str]:
    """Record every quantization the rounder runs, by form."""
    calls: list[str] = []
    for name in ("quantize", "fake_quantize", "quantize_both"):
        original = getattr(__import__("coalora.quant.rounding", fromlist=[name]), name)
        monkeypatch.setattr(
            f"coalora.quant.rounding.{name}",
            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k),
        )
    return calls


def test_auto_cache_quantizes_the_overflowing_entry_once(monkeypatch):
    calls = _counting(monkeypatch)
    weight = torch.randn(64, 64)  # 16 KiB dense
    cache = QuantCache(max_bytes=40_000, mode="auto")
    for bits in (2, 3, 4):  # the third dense entry would overflow: it is quantized packed, once
        got = cache.get("w", QuantOption(bits, 8, "fp32", 64, 256), weight)
        assert _same_bits(got, fake_quantize(weight, QuantOption(bits, 8, "fp32", 64, 256)))
    assert cache.packed and len(calls) == 3 and calls[-1] == "quantize"


def test_kept_codes_are_the_packed_form_and_count_in_the_bound():
    weight, option = torch.randn(64, 64), QuantOption(3, 4, "bf16", 32, 64)
    cache = QuantCache(max_bytes=1 << 20, mode="dense", keep_codes=True)
    dense = cache.get("w", option, weight)
    held = cache.packed_form("w", option)
    expected = quantize(weight, option)
    assert isinstance(held, PackedTensor) and _same_bits(held.codes, expected.codes)
    assert _same_bits(held.dequantize(), dense) and cache.nbytes == weight.numel() * 4 + expected.nbytes
    assert QuantCache(1 << 20, mode="dense").packed_form("w", option) is None


@needs_kernel
def test_threads_give_the_same_forms(monkeypatch):
    weights = [torch.randn(48, 64, generator=torch.Generator().manual_seed(k)) for k in range(5)]
    options = [OPTION_SPACE[k * 61] for k in range(5)]
    rounder = Rounder("nearest", "nf")
    one = rounder.forms_many(["w"] * 5, weights, options, True, True, threads=1)
    two = rounder.forms_many(["w"] * 5, weights, options, True, True, threads=2)
    for (p1, d1), (p2, d2) in zip(one, two, strict=True):
        assert p1 is not None and p2 is not None and d1 is not None and d2 is not None
        assert _same_bits(p1.codes, p2.codes) and _same_bits(d1, d2)


def test_a_failed_build_is_said_once_and_the_numpy_path_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(fused, "_LOADED", {})
    monkeypatch.setenv("COALORA_KERNELS", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="fused quantizer is unavailable"):
        assert fused.kernel(lambda k: True) is None
    assert list(tmp_path.glob("*.failed"))  # remembered: the next process does not try again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.kernel(lambda k: True) is None  # said once
        w = torch.randn(16, 16)
        assert not compiled(w) and _same_bits(
            quantize(w, QuantOption()).codes, _forms(w, QuantOption(), "nf", False)[0]
        )


STUB = f"""extern "C" {{
int coalora_version() {{ return {fused._VERSION}; }}
int coalora_absmax() {{ return 0; }}
void coalora_scale2() {{}}
int coalora_quantize() {{ return 0; }}
int coalora_dequantize() {{ return 0; }}
}}
"""


@needs_kernel
def test_a_kernel_that_disagrees_is_not_kept(tmp_path, monkeypatch):
    source = tmp_path / "stub.cpp"  # builds in a fraction of the real kernel's time
    source.write_text(STUB)
    monkeypatch.setattr(fused, "SOURCE", source)
    monkeypatch.setattr(fused, "_LOADED", {})
    monkeypatch.setenv("COALORA_KERNELS", str(tmp_path / "kernels"))
    with pytest.warns(UserWarning, match="disagrees"):
        assert fused.kernel(lambda k: False) is None
    folder = tmp_path / "kernels"
    assert not list(folder.glob("*.so")) and list(folder.glob("*.failed"))
    monkeypatch.setattr(fused, "_LOADED", {})
    source.write_text("// another source\n" + STUB)
    kept = fused.kernel(lambda k: True)  # another source, a check that passes: built and kept
    assert kept is not None and list(folder.glob("*.so"))


@pytest.fixture(scope="module")
def task(tiny_models_dir):
    from coalora.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    name = str(tiny_models_dir / "tiny-bert")
    return ClassificationTask(model_name=name, rank=4, train_budgets=[], eval_budgets=[3.0]).eval()


@pytest.mark.usefixtures("module_cache")
def test_a_budget_is_allocated_once_then_read_from_the_allocation_cache(task, monkeypatch):
    from coalora.deploy.resolve import resolve_config
    from coalora.quant import allocate as allocate_module

    assert task.eval_configs  # its own budgets, allocated when first asked for
    solved: list[float] = []
    original = allocate_module.allocate
    monkeypatch.setattr(
        allocate_module, "allocate", lambda s, e, b, *a: solved.append(b) or original(s, e, b, *a)
    )
    first = resolve_config(task, budget=3.3).config
    second = resolve_config(task, budget=3.3).config  # as a later process would: from the disk cache
    assert first == second and solved == [3.3]


@pytest.mark.usefixtures("module_cache")
def test_an_export_packs_nothing_again_for_a_configuration_switched_to(task, monkeypatch):
    from coalora.deploy.adaptive import AdaptiveModel
    from coalora.deploy.artifact import build_artifact
    from coalora.deploy.layout import Resolution
    from coalora.quant.targets import target_weights

    config = task.eval_configs["3.0"]
    AdaptiveModel(task).adapt(config)
    weights = target_weights(task.model.backbone, task.model.space.targets)
    monkeypatch.setattr(task.model.rounder, "packed_many", lambda *a: pytest.fail("quantized again"))
    artifact = build_artifact(task, Resolution(config, "a given configuration"))
    for name, packed in artifact.packed.items():
        expected = quantize(weights[name], config.matrices[name], task.model.rounder.family)
        assert _same_bits(packed.codes, expected.codes) and _same_bits(packed.scale2, expected.scale2)


@needs_kernel
@pytest.mark.parametrize("family", ["nf", "int"])
def test_compiled_dequantize_gives_the_numpy_paths_bits(family, monkeypatch):
    """Serving's dequantization (every bit width, block size and scale format, a partial last block)."""
    w = _matrices()["heavy_tailed"]
    for option in OPTION_SPACE[::5]:
        packed = quantize(w, option, family)
        compiled = packed.dequantize()
        monkeypatch.setattr(fused, "ENABLED", False)
        assert _same_bits(compiled, packed.dequantize()), option
        monkeypatch.setattr(fused, "ENABLED", True)


@needs_kernel
def test_a_code_the_codebook_lacks_comes_out_nan():
    """The symmetric 2-bit integer codebook has 3 levels: code 3 is read from a NaN entry, not past the
    table's end."""
    packed = quantize(torch.randn(4, 64) * 0.1, QuantOption(2, 8, "fp16", 64, 256), "int")
    packed.codes.fill_(0xFF)  # every code 3
    assert torch.isnan(packed.dequantize()).all()


@needs_kernel
def test_serving_never_waits_for_the_compiler(tmp_path, monkeypatch):
    """``build=False`` (how dequantization asks) takes a library already built here, and builds none."""
    source = tmp_path / "stub.cpp"
    source.write_text(STUB)
    monkeypatch.setattr(fused, "SOURCE", source)
    monkeypatch.setattr(fused, "_LOADED", {})
    monkeypatch.setenv("COALORA_KERNELS", str(tmp_path / "kernels"))
    looked = []
    real_path = fused.library_path
    monkeypatch.setattr(fused, "library_path", lambda compiler: looked.append(1) or real_path(compiler))
    assert fused.kernel(lambda k: True, build=False) is None
    assert fused.kernel(lambda k: True, build=False) is None
    assert len(looked) == 1  # looked for once: every layer's dequantize asks again
    assert not (tmp_path / "kernels").exists() or not list((tmp_path / "kernels").iterdir())
    assert fused.kernel(lambda k: True) is not None  # quantizing builds it (the refusal was not cached)
    monkeypatch.setattr(fused, "_LOADED", {})  # a new process
    assert fused.kernel(lambda k: True, build=False) is not None


@pytest.mark.parametrize("family", ["nf", "int"])
def test_an_8_bit_bin_entry_gives_the_nearest_level_either_side_of_its_midpoint(family):
    """The 8-bit pass reads each bin's {midpoints below, midpoint, level below, level above} in one load:
    for values just below and just above every bin's midpoint, the entry's code and level are
    NearestLookup's answer and the codebook's level of that code."""
    from coalora.quant.codebooks import codebook, nearest_codes

    entries = fused.Search.of(8, family).tables[2]
    levels = codebook(8, family).float()
    below, midpoint = entries[:, 0].contiguous().view(torch.int32).long(), entries[:, 1]
    inside = torch.isfinite(midpoint)
    assert inside.sum() > 100  # most bins of an 8-bit codebook hold a midpoint
    for side in (
        torch.nextafter(midpoint[inside], torch.tensor(-2.0)),
        torch.nextafter(midpoint[inside], torch.tensor(2.0)),
    ):
        bins = torch.nonzero(inside).squeeze(1)
        code = below[bins] + (side > midpoint[bins]).long()
        level = torch.where(side > midpoint[bins], entries[bins, 3], entries[bins, 2])
        assert torch.equal(code, nearest_codes(side, 8, family).long())
        assert torch.equal(level, levels[code])


def test_every_header_the_kernel_includes_is_hashed_and_shipped():
    """A header missing from HEADERS would leave a stale library in use after an edit; one missing from
    the package data would fail the build on an installed copy (the numpy path would then run, slowly)."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # the standard library's from Python 3.11

    included = set()
    for source in (fused.SOURCE, *fused.HEADERS):
        included |= set(re.findall(r'#include "([^"]+)"', source.read_text()))
    assert included == {header.name for header in fused.HEADERS}
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    shipped = set(project["tool"]["setuptools"]["package-data"]["coalora.quant"])
    assert {fused.SOURCE.name, *included} <= shipped
