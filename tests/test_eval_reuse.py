"""The comparison scripts reuse an eval.json only when it was written by the same evaluation (issue #23).

``coalora evaluate`` is replaced by a fake that writes an eval.json recording the precision it was asked for
and counts its calls, so each test checks which calls rerun and what they return.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_methods
import lm_compare


class FakeEvaluate:
    """Stands in for ``subprocess.run`` of ``coalora evaluate``: writes eval.json, remembers each call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, command: list[str], **_: object) -> subprocess.CompletedProcess:
        self.calls.append(list(command))
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        precisions = [command[i + 1] for i, flag in enumerate(command) if flag == "--precision"]
        row = {"label": "2.1", "kind": "budget", "avg_bits": 2.1, "seen": False, "accuracy": 0.8}
        row["precision"] = precisions[-1]  # argparse keeps the last one given
        (out / "eval.json").write_text(json.dumps({"results": [row]}))
        return subprocess.CompletedProcess(command, 0)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeEvaluate:
    runner = FakeEvaluate()
    monkeypatch.setattr(subprocess, "run", runner)
    return runner


@pytest.fixture
def record(tmp_path: Path) -> dict:
    ckpt = tmp_path / "coalora-k4" / "last.ckpt"  # the run folder, as training leaves it
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights of one training run")
    return {"name": "coalora-k4", "ckpt": str(ckpt)}


def test_a_changed_precision_reruns_and_the_same_flags_reuse(fake: FakeEvaluate, record: dict) -> None:
    root = Path(record["ckpt"]).parents[1]
    first = compare_methods.evaluate_with(record, root, ["--budgets", "2.1"])
    again = compare_methods.evaluate_with(record, root, ["--budgets", "2.1"])
    assert len(fake.calls) == 1 and again == first and first[0]["precision"] == "bf16"
    fp32 = compare_methods.evaluate_with(record, root, ["--budgets", "2.1", "--precision", "32"])
    assert len(fake.calls) == 2 and fp32[0]["precision"] == "32"  # not bf16's numbers
    compare_methods.evaluate_with(record, root, ["--budgets", "2.1", "--precision", "32"])
    assert len(fake.calls) == 2
    compare_methods.evaluate_with(record, root, ["--budgets", "2.1", "2.3", "--precision", "32"])
    assert len(fake.calls) == 3  # another configuration list


def test_an_edited_qconfig_file_or_a_retrained_checkpoint_reruns(
    fake: FakeEvaluate, record: dict, tmp_path: Path
) -> None:
    root, qconfig = tmp_path, tmp_path / "random-00.json"
    qconfig.write_text('{"bits": [2, 3]}')
    flags = ["--qconfig", str(qconfig)]
    compare_methods.evaluate_with(record, root, flags)
    compare_methods.evaluate_with(record, root, flags)
    assert len(fake.calls) == 1
    qconfig.write_text('{"bits": [3, 3]}')  # the same path, another configuration
    compare_methods.evaluate_with(record, root, flags)
    assert len(fake.calls) == 2
    Path(record["ckpt"]).write_bytes(b"weights of a retrained run")
    compare_methods.evaluate_with(record, root, flags)
    assert len(fake.calls) == 3


def test_an_eval_json_without_a_key_is_not_reused(fake: FakeEvaluate, record: dict, tmp_path: Path) -> None:
    old = tmp_path / "coalora-k4" / "eval"
    old.mkdir(parents=True)
    (old / "eval.json").write_text(json.dumps({"results": [{"label": "2.1", "precision": "unknown"}]}))
    rows = compare_methods.evaluate_with(record, tmp_path, [])
    assert len(fake.calls) == 1 and rows[0]["precision"] == "bf16"


def test_lm_compare_reruns_when_the_random_configurations_change(
    fake: FakeEvaluate, record: dict, tmp_path: Path
) -> None:
    randoms = [tmp_path / f"random-{i:02d}.json" for i in range(3)]
    for i, path in enumerate(randoms):
        path.write_text(json.dumps({"i": i}))
    record = {**record, "name": "coalora"}
    (tmp_path / "coalora").mkdir()
    lm_compare.evaluate(record, tmp_path, randoms)
    lm_compare.evaluate(record, tmp_path, randoms)
    assert len(fake.calls) == 1
    lm_compare.evaluate(record, tmp_path, randoms[:2])
    assert len(fake.calls) == 2
    assert "--split" in fake.calls[-1] and "--qconfig" in fake.calls[-1]
