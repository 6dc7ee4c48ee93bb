"""GLUE readers, specs and metrics: both file layouts agree, real data counts match, errors are one line."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from coalora.data.glue import TASKS, get_task, glue_metrics, main_metric, predictions_from_logits
from coalora.data.glue_files import (
    default_glue_dir,
    find_split_file,
    find_task_dir,
    load_hub_split,
    load_split,
    read_rows,
    read_split,
    resolve_source,
)
from coalora.errors import CoaloraError

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
ORIGINAL, HF = FIXTURES / "original", FIXTURES / "hf"
DATA = Path(__file__).parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")

#: labels of each fixture's train split, as HF ids (scores for STS-B).
TRAIN_LABELS = {
    "cola": [1, 1, 0],
    "sst2": [1, 0, 1],
    "mrpc": [1, 0, 1],
    "qqp": [1, 0, 1],
    "stsb": [4.8, 1.75, 0.0],
    "mnli": [1, 0, 2],
    "qnli": [0, 1, 0],
    "rte": [0, 1, 0],
    "wnli": [1, 0, 1],
}
FIELDS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


def one_line_error(match: str, call, *args, **kwargs) -> str:
    """Run ``call``, expect a one-line CoaloraError containing ``match``, return its message."""
    with pytest.raises(CoaloraError, match=match) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ specs


def test_task_specs_cover_glue() -> None:
    assert set(TASKS) == set(FIELDS)
    for name, spec in TASKS.items():
        assert spec.text_fields == FIELDS[name]
        assert spec.main_metric in spec.metrics
        assert spec.is_regression == (name == "stsb")
        assert spec.num_labels == (len(spec.label_names) or 1)
    assert get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").eval_splits == ("dev_matched", "dev_mismatched")
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task("STS-B") is TASKS["stsb"]


def test_unknown_task_lists_valid_ones() -> None:
    message = one_line_error("unknown GLUE task 'sst5'", get_task, "sst5")
    assert all(name in message for name in TASKS)


# ------------------------------------------------------------------------------------------ both layouts


SPLITS = [(task, split) for task, spec in TASKS.items() for split in ("train", *spec.eval_splits)]


@pytest.mark.parametrize(("task", "split"), SPLITS)
def test_layouts_read_identically(task: str, split: str) -> None:
    original = read_split(ORIGINAL, task, split)
    exported = read_split(HF, task, split)
    assert original == exported
    assert len(original) >= 2
    for row in original:
        assert set(row) == {*FIELDS[task], "label"}
        assert isinstance(row["label"], float if task == "stsb" else int)
    if split == "train":
        assert [row["label"] for row in original] == TRAIN_LABELS[task]


def test_quotes_stay_literal() -> None:
    cola = read_split(ORIGINAL, "cola", "dev")
    assert cola[0]["sentence"] == '"Maria" seems the dog to be sleeping.'
    qqp = read_split(ORIGINAL, "qqp")
    assert qqp[1]["question1"] == 'What does "carpe diem mean?'  # unbalanced quote, no swallowed lines
    assert len(qqp) == 3
    sst2 = read_split(ORIGINAL, "sst2", "dev")
    assert sst2[0]["sentence"] == '" a mess " , and a long one '


def test_split_files_and_folders() -> None:
    assert find_task_dir(ORIGINAL, "sst2").name == "SST-2"
    assert find_task_dir(HF, "SST-2").name == "sst2"
    assert find_split_file(HF, "mnli", "dev").name == "validation_matched.tsv"
    assert find_split_file(ORIGINAL, "mnli", "validation_mismatched").name == "dev_mismatched.tsv"
    assert find_split_file(HF, "rte", "validation").name == "dev.tsv"
    one_line_error("no split 'dev_mismatched'", find_split_file, HF, "rte", "dev_mismatched")


def test_folder_match_ignores_case(tmp_path: Path) -> None:
    shutil.copytree(ORIGINAL / "STS-B", tmp_path / "sts-b")
    assert [row["label"] for row in read_split(tmp_path, "stsb")] == TRAIN_LABELS["stsb"]


def test_sentence_file(tmp_path: Path) -> None:
    path = tmp_path / "stsa.binary.train"
    path.write_text('1 a " quoted " gem\n0 dull , dull , dull\n\n')
    assert read_rows(path, "sst2") == [
        {"sentence": 'a " quoted " gem', "label": 1},
        {"sentence": "dull , dull , dull", "label": 0},
    ]
    one_line_error("needs sentence pairs", read_rows, path, "rte")


def test_hf_export_without_idx_is_unquoted(tmp_path: Path) -> None:
    """``sentence<TAB>label`` is both the SST-2 and a bare HF header; CSV quoting tells them apart."""
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\n"a ""quoted"" one"\t1\nplain\t0\n')
    rows = read_rows(path, "sst2")
    assert rows == [{"sentence": 'a "quoted" one', "label": 1}, {"sentence": "plain", "label": 0}]


# ------------------------------------------------------------------------------------------- real data


@needs_data
def test_real_sst2() -> None:
    train = read_split(DATA, "sst2")
    dev = read_split(DATA, "sst2", "dev")
    assert len(train) == 67_349 and len(dev) == 872
    assert Counter(row["label"] for row in train) == {0: 29_780, 1: 37_569}
    assert Counter(row["label"] for row in dev) == {0: 428, 1: 444}


@needs_data
def test_real_stsa_sentences() -> None:
    rows = read_rows(DATA / "sst2" / "sentence" / "stsa.binary.train", "sst2")
    assert len(rows) == 6_920
    assert Counter(row["label"] for row in rows) == {0: 3_310, 1: 3_610}


@needs_data
def test_real_rte() -> None:
    train = read_split(DATA, "rte")
    dev = read_split(DATA, "rte", "dev")
    assert len(train) == 2_490 and len(dev) == 277
    assert Counter(row["label"] for row in train) == {0: 1_249, 1: 1_241}
    assert Counter(row["label"] for row in dev) == {0: 146, 1: 131}
    assert any('"' in row["sentence1"] for row in train)  # CSV quoting was undone, not kept


# ---------------------------------------------------------------------------------------------- errors


def test_missing_glue_dir(tmp_path: Path) -> None:
    message = one_line_error("does not exist", read_split, tmp_path / "nope", "rte")
    assert "GLUE_DIR" in message


def test_missing_task_folder(tmp_path: Path) -> None:
    message = one_line_error("no folder for task 'sst2'", read_split, tmp_path, "sst2")
    assert "SST-2" in message and "sst2" in message


def test_missing_split_file(tmp_path: Path) -> None:
    (tmp_path / "RTE").mkdir()
    message = one_line_error("no dev split", read_split, tmp_path, "rte", "dev")
    assert "dev.tsv" in message and "validation.tsv" in message


def test_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("sentence1\tlabel\tidx\nA.\t0\t0\n")
    message = one_line_error("lacks column 'sentence2'", read_rows, path, "rte")
    assert "found: sentence1, label, idx" in message


def test_bad_label(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n1\tA.\tB.\tmaybe\n")
    message = one_line_error("cannot parse label 'maybe'", read_rows, path, "rte")
    assert "line 3" in message and "not_entailment" in message
    path.write_text("sentence\tlabel\tidx\nfine\t2\t0\n")
    one_line_error("cannot parse label '2'", read_rows, path, "sst2")


def test_short_row(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("index\tquestion\tsentence\tlabel\n0\tWhy?\n")
    one_line_error("line 2 has 2 fields", read_rows, path, "qnli")


# ------------------------------------------------------------------------------------ sources and hub


def test_hub_offline_says_glue_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = one_line_error("cannot load GLUE 'rte' from the Hugging Face hub", load_hub_split, "rte")
    assert "GLUE_DIR" in message


def test_hub_rows_match_local(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(path, name, split):
        calls.append((path, name, split))
        rows = read_split(HF, name, "dev")
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        return datasets.Dataset.from_dict({**columns, "idx": list(range(len(rows)))})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_hub_split("stsb", "dev") == read_split(ORIGINAL, "stsb", "dev")
    assert load_split("mnli", "dev", source="hub") == read_split(ORIGINAL, "mnli", "dev_matched")
    assert calls == [("nyu-mll/glue", "stsb", "validation"), ("nyu-mll/glue", "mnli", "validation_matched")]


def test_default_glue_dir_and_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "glue"))
    assert default_glue_dir() == tmp_path / "glue"
    monkeypatch.delenv("GLUE_DIR")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert default_glue_dir() == (tmp_path / "shared" / "data").resolve()
    assert resolve_source("auto", None) == ("local", (tmp_path / "shared" / "data").resolve())
    monkeypatch.chdir(tmp_path / "shared" / "data")
    assert default_glue_dir() is None
    assert resolve_source("auto", None) == ("hub", None)
    assert resolve_source("auto", "somewhere") == ("local", Path("somewhere"))
    one_line_error("no GLUE data folder found", resolve_source, "local", None)
    one_line_error("unknown data source 'web'", resolve_source, "web", None)


# --------------------------------------------------------------------------------------------- metrics


def test_metric_keys() -> None:
    expected = {
        "cola": {"mcc"},
        "sst2": {"accuracy"},
        "mrpc": {"f1", "accuracy"},
        "qqp": {"f1", "accuracy"},
        "stsb": {"pearson", "spearman"},
        "mnli": {"accuracy"},
        "qnli": {"accuracy"},
        "rte": {"accuracy"},
        "wnli": {"accuracy"},
    }
    for task, keys in expected.items():
        assert set(glue_metrics(task).keys()) == keys
        assert main_metric(task) in keys
    assert main_metric("cola") == "mcc" and main_metric("stsb") == "pearson"


def test_classification_metric_values() -> None:
    # TP=2 FP=1 TN=2 FN=1: accuracy 4/6, F1 = 2TP/(2TP+FP+FN) = 4/6, MCC = (2*2-1*1)/sqrt(3^4) = 1/3
    logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [3.0, 0.0], [1.0, 0.0], [0.0, 5.0], [2.0, 1.0]])
    target = torch.tensor([1, 0, 0, 0, 1, 1])
    preds = predictions_from_logits(logits, "mrpc")
    assert preds.tolist() == [1, 1, 0, 0, 1, 0]
    values = glue_metrics("mrpc")(preds, target)
    assert values["accuracy"].item() == pytest.approx(4 / 6)
    assert values["f1"].item() == pytest.approx(4 / 6)
    assert glue_metrics("cola")(preds, target)["mcc"].item() == pytest.approx(1 / 3)
    three = glue_metrics("mnli")(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    assert three["accuracy"].item() == pytest.approx(0.75)


def test_regression_metric_values() -> None:
    target = torch.tensor([0.0, 1.0, 2.0, 3.0])
    logits = torch.tensor([[0.1], [0.9], [2.5], [9.0]])  # same order, not linear
    preds = predictions_from_logits(logits, "stsb")
    assert preds.shape == (4,)
    values = glue_metrics("stsb")(preds, target)
    assert values["spearman"].item() == pytest.approx(1.0)
    assert 0.8 < values["pearson"].item() < 1.0
    assert glue_metrics("stsb")(-target, target)["pearson"].item() == pytest.approx(-1.0)


def test_hypervolumes_never_mix_kinds_of_point():
    """Seen and qconfig points differ per run; a run's hypervolume must not depend on them."""
    from coalora.eval.report import summarise
    from coalora.eval.results import EvalResult

    def point(kind: str, bits: float, accuracy: float) -> EvalResult:
        return EvalResult(
            "run", "coalora", f"{kind}-{bits}", kind, bits, kind == "seen", {"accuracy": accuracy}
        )

    budgets = [point("budget", 3.0, 0.8), point("budget", 4.0, 0.85)]
    randoms = [point("random", 2.6, 0.7)]
    plain = summarise([*budgets, *randoms], "sst2")["run"]
    extra = summarise([*budgets, *randoms, point("seen", 2.3, 0.99), point("qconfig", 2.2, 0.99)], "sst2")[
        "run"
    ]
    assert (
        plain["hypervolume"] == extra["hypervolume"]
        and plain["hypervolume_random"] == extra["hypervolume_random"]
    )
    assert summarise(budgets, "sst2")["run"]["hypervolume"] == plain["hypervolume"]
