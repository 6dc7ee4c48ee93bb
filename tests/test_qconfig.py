"""Configuration files, validation, cost and the search encoding (SPEC §2.2, §2.4)."""

from __future__ import annotations

import json

import pytest
import torch

from coalora.errors import CoaloraError
from coalora.quant.options import NF4_DOUBLE_QUANT, QuantOption
from coalora.quant.qconfig import ConfigSpace, QConfig
from coalora.quant.targets import TargetMatrix

TARGETS = [
    TargetMatrix("enc.0.q", "q", 0, 64, 64),
    TargetMatrix("enc.0.ffn", "ffn", 0, 256, 64),
    TargetMatrix("enc.1.q", "q", 1, 64, 64),
]


@pytest.fixture
def space() -> ConfigSpace:
    return ConfigSpace(TARGETS, model="tiny")


def test_avg_bits_is_weighted_by_numel(space):
    cheap, dear = QuantOption(2, 2, "bf16", 64, 256), QuantOption(8, 8, "fp32", 16, 16)
    config = space.make([cheap, dear, cheap])
    numel = [4096, 16384, 4096]
    expected = (cheap.storage_bits * 8192 + dear.storage_bits * 16384) / sum(numel)
    assert space.avg_bits(config) == pytest.approx(expected)
    assert space.avg_bits(space.uniform(NF4_DOUBLE_QUANT)) == 4.126953125


def test_json_round_trip(space, tmp_path):
    config = space.random(torch.Generator().manual_seed(0))
    path = tmp_path / "cfg.json"
    space.save(config, path)
    data = json.loads(path.read_text())
    assert data["format"] == "coalora.qconfig/1" and data["model"] == "tiny"
    assert data["avg_bits"] == pytest.approx(space.avg_bits(config))
    assert list(data["matrices"]) == space.names
    assert space.load(path) == config


def test_encoding_round_trip_and_vectorised_cost(space):
    gen = torch.Generator().manual_seed(1)
    configs = [space.random(gen) for _ in range(5)]
    encoded = torch.stack([space.encode(c) for c in configs])
    assert [space.decode(e) for e in encoded] == configs
    assert space.avg_bits_encoded(encoded).tolist() == pytest.approx([space.avg_bits(c) for c in configs])
    normalised = space.normalise(encoded)
    assert normalised.shape == (5, space.dim) and normalised.min() >= 0 and normalised.max() <= 1


def _write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _good(space) -> dict:
    return space.uniform(NF4_DOUBLE_QUANT).to_json()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["matrices"]["enc.0.q"].update(colour=1), "unknown field"),
        (lambda d: d["matrices"]["enc.0.q"].update(bits=5), "'bits' = 5 is outside the space"),
        (lambda d: d["matrices"]["enc.0.q"].pop("block"), "missing field"),
        (lambda d: d["matrices"].update({"enc.9.q": d["matrices"]["enc.0.q"]}), "does not have"),
        (lambda d: d["matrices"].pop("enc.1.q"), "missing target module 'enc.1.q'"),
        (lambda d: d.update(model="other-model"), "written for backbone 'other-model'"),
        (lambda d: d.update(format="v0"), "expected 'coalora.qconfig/1'"),
    ],
)
def test_bad_files_give_one_line_errors(space, tmp_path, mutate, message):
    data = _good(space)
    mutate(data)
    with pytest.raises(CoaloraError, match=message) as info:
        space.load(_write(tmp_path, data))
    assert "\n" not in str(info.value)


def test_malformed_and_missing_files(space, tmp_path):
    with pytest.raises(CoaloraError, match="not valid JSON"):
        space.load(_write(tmp_path, "{not json"))
    with pytest.raises(CoaloraError, match="does not exist"):
        space.load(tmp_path / "nope.json")


def test_save_is_atomic(space, tmp_path):
    path = tmp_path / "cfg.json"
    space.save(space.uniform(NF4_DOUBLE_QUANT), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"]
    assert QConfig.load(path).model == "tiny"
