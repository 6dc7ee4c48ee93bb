"""Bad input through the real entry points: every case exits non-zero (or raises CoaloraError from the
Python API) with exactly one line that names the problem and the fix, no traceback, and no new file.

Cases go through ``coalora.cli.main([...])`` in process; ``{name}`` in an argument is a path from the
``paths`` fixture (a trained tiny checkpoint, broken checkpoints, qconfig files, plain files).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from coalora.cli import main
from coalora.errors import CoaloraError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "conf" / "sst2_tiny.yaml")
TEXT_TINY = str(REPO / "tests" / "conf" / "text_tiny.yaml")
MARKER = "payload-ran"


class _Payload:
    """Unpickling this runs code (creates the marker file): what a weights-only load must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def paths(tiny_models_dir, tmp_path_factory) -> dict[str, str]:
    """A trained tiny checkpoint and every kind of wrong file, outside the folders the cases watch."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    args = ["fit", "--config", TINY, "--model.model_name", str(tiny_models_dir / "tiny-bert")]
    args += ["--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run)]
    assert main([*args, "--trainer.max_steps", "2", "--trainer.max_epochs", "1"]) == 0
    ckpt = next(run.rglob("last.ckpt"))
    good = ckpt.read_bytes()
    files = {
        "ckpt": ckpt,
        "empty": b"",
        "trunc": good[: len(good) // 2],
        "text": b"model: this is not a checkpoint\n",
        "random": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
    }
    out: dict[str, str] = {}
    for name, content in files.items():
        if isinstance(content, bytes):
            (root / f"{name}.ckpt").write_bytes(content)
            out[name] = str(root / f"{name}.ckpt")
        else:
            out[name] = str(content)
    torch.save({"weight": torch.zeros(2)}, root / "plain.ckpt")
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "epoch": 0}, root / "foreign.ckpt")
    torch.save({"state_dict": {}, "coalora": _Payload(root / MARKER)}, root / "evil.ckpt")
    (root / "legacy.ckpt").write_bytes(pickle.dumps(_Payload(root / MARKER)))
    header_only = root / "header_only.tsv"
    header_only.write_text("sentence\tlabel\n")
    (root / "a_file").write_text("not a folder\n")
    (root / "not_an_export").mkdir()
    (root / "not_an_export" / "keep.txt").write_text("mine\n")
    _qconfigs(tiny_models_dir / "tiny-bert", root)
    for name in ("plain", "foreign", "evil", "legacy"):
        out[name] = str(root / f"{name}.ckpt")
    out.update(
        root=str(root),
        header_only=str(header_only),
        file=str(root / "a_file"),
        not_export=str(root / "not_an_export"),
        qconfig=str(root / "good.json"),
        wrong_bits=str(root / "wrong_bits.json"),
        bert=str(tiny_models_dir / "tiny-bert"),
        llama=str(tiny_models_dir / "tiny-llama-lm"),
        glue=str(REPO / "tests" / "fixtures" / "glue_tiny"),
    )
    return out


def _qconfigs(model: Path, root: Path) -> None:
    """A valid qconfig for the tiny backbone, and one whose header avg_bits its matrices disagree with."""
    import json

    from coalora.pretrained import load_classifier
    from coalora.quant.options import OPTION_SPACE
    from coalora.quant.qconfig import ConfigSpace
    from coalora.quant.targets import discover_targets

    space = ConfigSpace(discover_targets(load_classifier(str(model), num_labels=2)), model=str(model))
    config = space.uniform(OPTION_SPACE[len(OPTION_SPACE) // 2])
    space.save(config, root / "good.json")
    data = json.loads((root / "good.json").read_text())
    data["avg_bits"] = round(data["avg_bits"] + 1.5, 4)
    (root / "wrong_bits.json").write_text(json.dumps(data))


def _listing(*folders: Path) -> set[str]:
    return {str(p) for folder in folders if folder.exists() for p in [folder, *folder.rglob("*")]}


def _refused(args: list[str], capsys, watch: list[Path]) -> str:
    """Run ``main(args)``; assert the contract; return the one line."""
    before = _listing(*watch)
    code = main(args)
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert code != 0, (args, err)
    assert "Traceback" not in err, err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("coalora: error:") and ";" in line, line  # the problem; the fix
    assert "weights_only=False" not in line
    assert _listing(*watch) == before, sorted(_listing(*watch) - before)
    return line


def _fill(args: list[str], paths: dict[str, str], tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, **paths) for a in args]


@pytest.fixture
def run_case(paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt_folder = Path(paths["ckpt"]).parents[1]

    def run(args: list[str]) -> str:
        return _refused(_fill(args, paths, tmp_path), capsys, [tmp_path, ckpt_folder, Path(paths["root"])])

    return run


FIT = ["fit", "--config", TINY, "--model.model_name", "{bert}", "--data.glue_dir", "{glue}"]
FIT += ["--trainer.default_root_dir", "{tmp}/run", "--trainer.logger.init_args.save_dir", "{tmp}/run"]

FIT_CASES = [
    (["--model.rank", "0"], "model.rank must be an integer from 1"),
    (["--model.rank", "-4"], "model.rank must be"),
    (["--model.rank", "2.5"], "rank"),
    (["--model.alpha", "0"], "model.alpha must be > 0"),
    (["--model.lr", "-0.001"], "model.lr must be"),
    (["--model.lr", "5"], "model.lr must be"),
    (["--model.lora_dropout", "1.0"], "model.lora_dropout must be a number in [0, 1)"),
    (["--model.configs_per_step", "0"], "model.configs_per_step"),
    (["--model.weight_decay", "-1"], "model.weight_decay must be >= 0"),
    (["--model.seed", "-1"], "model.seed"),
    (["--model.train_budgets", "[]"], "empty list"),
    (["--model.train_budgets", "[1.0, 3.0]"], "outside the achievable range"),
    (["--model.eval_budgets", "[3.0, 3.0]"], "twice"),
    (["--model.eval_budgets", "[99]"], "outside the achievable range"),
    (["--model.method", "qlora"], "set train_budget or qconfig"),
    (["--model.method", "qlora", "--model.train_budget", "3.0", "--model.qconfig", "{qconfig}"], "both"),
    (["--model.train_budget", "3.0"], "only applies to methods qlora and lqlora"),
    (["--model.method", "lqlora", "--model.train_budget", "1.0"], "outside the achievable range"),
    (["--model.method", "qlora", "--model.qconfig", "{tmp}/missing.json"], "does not exist"),
    (["--model.method", "qlora", "--model.qconfig", "{wrong_bits}"], "states avg_bits"),
    (["--model.method", "qlora", "--model.qconfig", "{file}"], "not valid JSON"),
    (["--model.low_bit_draw", "0.5"], "model.low_bit_draw must be"),
    (["--model.distill_weight", "-1"], "distill_weight must be >= 0"),
    (["--model.mapper_lr", "0"], "model.mapper_lr must be"),
    (["--model.mapper_lr", "1e-3", "--model.use_mapper", "false"], "has no mapper here"),
    (["--model.mapper_sees_config", "false", "--model.use_mapper", "false"], "mapper_sees_config is set"),
    (["--model.mapper_sees_config", "false", "--model.method", "fp"], "mapper_sees_config is set"),
    (["--model.mapper_hidden", "0"], "model.mapper_hidden"),
    (["--model.code_family", "float"], "code_family"),
    (["--model.code_family", "gguf", "--model.rounding", "gptq"], "gptq does not apply to code_family gguf"),
    (["--model.code_family", "gguf", "--model.eval_budgets", "[2.5]"], "outside the achievable range 2.625"),
    (["--model.quant_cache_gb", "-1"], "quant_cache_gb"),
    (["--model.method", "magic"], "model.method must be one of"),
    (["--trainer.max_epochs", "0"], "nothing would train"),
    (["--trainer.max_steps", "-5"], "trainer.max_steps must be"),
    (["--trainer.limit_train_batches", "1.5"], "fraction"),
    (["--trainer.limit_val_batches", "-1"], "trainer.limit_val_batches"),
    (["--trainer.accumulate_grad_batches", "0"], "accumulate_grad_batches"),
    (["--trainer.log_every_n_steps", "0"], "log_every_n_steps"),
    (["--trainer.gradient_clip_val", "-1"], "gradient_clip_val"),
    (["--trainer.default_root_dir", "{file}"], "is a file, not a folder"),
    (["--trainer.default_root_dir", "{file}/sub"], "which is a file"),
    (["--trainer.logger.init_args.save_dir", "{file}/logs"], "which is a file"),
    (["--ckpt_path", "{tmp}/missing.ckpt"], "does not exist"),
    (["--ckpt_path", "{empty}"], "is empty"),
    (["--ckpt_path", "{trunc}"], "truncated"),
    (["--ckpt_path", "{text}"], "not a PyTorch checkpoint"),
    (["--ckpt_path", "{random}"], "not a PyTorch checkpoint"),
    (["--ckpt_path", "{plain}"], "not a coalora checkpoint"),
    (["--ckpt_path", "{foreign}"], "another project"),
    (["--ckpt_path", "{evil}"], "weights-only"),
    (["--ckpt_path", "{legacy}"], "weights-only"),
    (["--ckpt_path", "{root}"], "is a folder"),
    (["--ckpt_path", "last"], "no last.ckpt"),
    (["--data.batch_size", "0"], "batch_size"),
    (["--data.max_length", "1"], "max_length"),
    (["--data.search_size", "-1"], "search_size"),
    (["--data.train_file", "{header_only}", "--data.search_size", "0"], "no rows"),
    (["--data.train_file", "{tmp}/nope.tsv"], "does not exist"),
    (["--data.task", "sst3"], "data.task"),
]


@pytest.mark.parametrize("extra, message", FIT_CASES, ids=[" ".join(c[0]) for c in FIT_CASES])
def test_fit_refuses(extra, message, run_case):
    assert message in run_case([*FIT, *extra])


LM_FIT = ["fit", "--config", TEXT_TINY, "--model.model_name", "{llama}"]
LM_FIT += ["--trainer.default_root_dir", "{tmp}/run", "--trainer.logger.init_args.save_dir", "{tmp}/run"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["validate", *FIT[1:], "--ckpt_path", "{trunc}"], "truncated"),
        (["test", *FIT[1:], "--ckpt_path", "{random}"], "not a PyTorch checkpoint"),
        (["validate", *FIT[1:], "--ckpt_path", "{tmp}/missing.ckpt"], "does not exist"),
        (["predict", *FIT[1:]], "not supported"),
        (
            [*LM_FIT, "--ckpt_path", "{ckpt}"],
            "written by a 'classification' task",
        ),
        (["fitt", "--config", TINY], "fitt"),
    ],
)
def test_lightning_commands_refuse(args, message, run_case):
    assert message in run_case(args)


EVALUATE = ["evaluate", "--ckpt", "{ckpt}", "--glue-dir", "{glue}", "--eval-limit", "8"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([*EVALUATE, "--seen", "-2"], "argument --seen: must be an integer >= 0"),
        ([*EVALUATE, "--random", "-1"], "argument --random"),
        ([*EVALUATE, "--seen", "1000"], "or fewer"),
        ([*EVALUATE, "--seen", "two"], "--seen"),
        ([*EVALUATE, "--budgets", "1.0"], "outside the achievable range"),
        ([*EVALUATE, "--budgets"], "at least one value"),
        ([*EVALUATE, "--batch-size", "0"], "--batch-size"),
        ([*EVALUATE[:-2], "--eval-limit", "0"], "--eval-limit"),
        ([*EVALUATE, "--precision", "16"], "--precision"),
        (["evaluate", "--ckpt", "{text}"], "not a PyTorch checkpoint"),
        (["evaluate", "--ckpt", "{random}"], "not a PyTorch checkpoint"),
        (["evaluate", "--ckpt", "{evil}"], "weights-only"),
        (["evaluate", "--ckpt", "{ckpt}", "{empty}"], "is empty"),
        ([*EVALUATE, "--qconfig", "{tmp}/missing.json"], "does not exist"),
        ([*EVALUATE, "--qconfig", "{wrong_bits}"], "states avg_bits"),
        ([*EVALUATE, "--out", "{file}"], "is a file"),
        ([*EVALUATE, "--out", "{file}/eval"], "which is a file"),
        (["evaluate", "--ckpt", "{ckpt}", "--glue-dir", "{tmp}/nope"], "not a folder"),
        (["evaluate"], "required: --ckpt"),
    ],
)
def test_evaluate_refuses(args, message, run_case):
    assert message in run_case(args)


@pytest.mark.parametrize(
    "args, message",
    [
        (["adapt", "--ckpt", "{ckpt}", "--budget", "99", "--out", "{tmp}/x"], "outside the achievable range"),
        (["adapt", "--ckpt", "{ckpt}", "--budget", "3", "--out", "{file}"], "is a file"),
        (["adapt", "--ckpt", "{ckpt}", "--budget", "3", "--out", "{not_export}"], "not a coalora export"),
        (["adapt", "--ckpt", "{ckpt}", "--max-bytes", "0", "--out", "{tmp}/x"], "positive byte count"),
        (["adapt", "--ckpt", "{ckpt}", "--max-bytes", "5XB", "--out", "{tmp}/x"], "not a byte count"),
        (["adapt", "--ckpt", "{text}", "--budget", "3", "--out", "{tmp}/x"], "not a PyTorch checkpoint"),
        (["adapt", "--ckpt", "{random}", "--budget", "3", "--out", "{tmp}/x"], "not a PyTorch checkpoint"),
        (["adapt", "--ckpt", "{tmp}/no.ckpt", "--budget", "3", "--out", "{tmp}/x"], "does not exist"),
        (
            ["adapt", "--ckpt", "{ckpt}", "--budget", "3", "--qconfig", "{qconfig}", "--out", "{tmp}/x"],
            "not allowed",
        ),
        (["adapt", "--ckpt", "{ckpt}", "--qconfig", "{wrong_bits}", "--out", "{tmp}/x"], "states avg_bits"),
        (["adapt", "--ckpt", "{ckpt}", "--budget", "3"], "required: --out"),
        (["allocate", "--model", "{bert}", "--budget", "0.5"], "outside the achievable range"),
        (["allocate", "--model", "{bert}", "--budget", "3", "3.0", "--out-dir", "{tmp}/q"], "twice"),
        (["allocate", "--model", "{bert}", "--budget", "3", "--out", "{tmp}"], "is a folder"),
        (["allocate", "--model", "{bert}", "--budget", "3", "--out-dir", "{file}"], "is a file"),
        (["allocate", "--model", "{bert}", "--budget", "2.5", "3", "--out", "{tmp}/q.json"], "one budget"),
        (["allocate", "--model", "{bert}", "--budget", "3", "--fisher-samples", "0"], "--fisher-samples"),
        (["allocate", "--model", "{bert}", "--budget", "three"], "argument --budget"),
        (["allocate", "--model", "{bert}", "--budget", "3", "--cache-dir", "{file}"], "is a file"),
        (["demo", "--random", "-1"], "argument --random"),
        (["demo", "--out", "{file}", "--config", TINY], "is a file"),
    ],
)
def test_other_commands_refuse(args, message, run_case):
    assert message in run_case(args)


def _api_error(call) -> str:
    with pytest.raises(CoaloraError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and ";" in message and "weights_only=False" not in message
    return message


def test_python_api_refuses(paths, tmp_path):
    import coalora
    from coalora.deploy import AdaptiveModel

    before = _listing(tmp_path, Path(paths["root"]))
    assert "AdaptiveModel.from_checkpoint" in _api_error(lambda: coalora.load("x.ckpt"))
    assert "AdaptiveModel.from_checkpoint" in _api_error(lambda: coalora.load(paths["ckpt"]))
    assert "path of an artifact folder" in _api_error(lambda: coalora.load(None))
    assert "not a coalora artifact" in _api_error(lambda: coalora.load(tmp_path))
    assert "does not exist" in _api_error(lambda: coalora.load(tmp_path / "nothing"))
    for name, message in [("text", "not a PyTorch"), ("evil", "weights-only"), ("trunc", "truncated")]:
        assert message in _api_error(lambda name=name: AdaptiveModel.from_checkpoint(paths[name]))
    assert "does not exist" in _api_error(lambda: AdaptiveModel.from_checkpoint(tmp_path / "no.ckpt"))
    assert "string or a path" in _api_error(lambda: AdaptiveModel.from_checkpoint(None))  # type: ignore[arg-type]
    served = AdaptiveModel.from_checkpoint(paths["ckpt"])
    assert "outside the achievable range" in _api_error(lambda: served.adapt(99.0))
    assert "does not exist" in _api_error(lambda: served.adapt(tmp_path / "missing.json"))
    assert "cannot adapt to a list" in _api_error(lambda: served.adapt([1, 2]))  # type: ignore[arg-type]
    assert "states avg_bits" in _api_error(lambda: served.adapt(paths["wrong_bits"]))
    served.adapt(3.0)
    assert "NoneType" in _api_error(lambda: served.predict(None))  # type: ignore[arg-type]
    assert _listing(tmp_path, Path(paths["root"])) == before
    assert not (Path(paths["root"]) / MARKER).exists()


def test_predict_texts_are_checked():
    from coalora.deploy.texts import check_texts

    assert check_texts("one film") == ["one film"]
    assert check_texts([("a", "b")]) == [("a", "b")]
    for bad, message in [(None, "NoneType"), ([1, 2], "item 0 is a int"), ([], "empty list"), (3, "int")]:
        assert message in _api_error(lambda bad=bad: check_texts(bad))


def test_a_pickled_payload_never_runs(paths, run_case):
    """Every checkpoint path (fit, evaluate, adapt, the API) reads weights-only: the payload is refused."""
    from coalora.deploy import AdaptiveModel
    from coalora.tasks.checkpoint import read_checkpoint

    marker = Path(paths["root"]) / MARKER
    with pytest.raises(OSError):  # the payload works: a plain pickle load would create the marker
        pickle.loads(pickle.dumps(_Payload(marker / "missing" / "x")))
    for name in ("evil", "legacy"):
        placeholder = "{" + name + "}"
        run_case(["evaluate", "--ckpt", placeholder])
        run_case(["adapt", "--ckpt", placeholder, "--budget", "3", "--out", "{tmp}/x"])
        run_case([*FIT, "--ckpt_path", placeholder])
        with pytest.raises(CoaloraError):
            AdaptiveModel.from_checkpoint(paths[name])
        with pytest.raises(CoaloraError):
            read_checkpoint(paths[name])
    assert not marker.exists()


def test_artifacts_load_without_pickle(paths, tmp_path, monkeypatch):
    """An exported artifact is safetensors + JSON + tokenizer text, and loading it unpickles nothing."""
    import coalora

    out = tmp_path / "artifact"
    assert main(["adapt", "--ckpt", paths["ckpt"], "--budget", "3.0", "--out", str(out)]) == 0
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".txt", ".model"}, suffixes

    def refuse(*args, **kwargs):
        raise AssertionError("artifact loading must not unpickle anything")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model = coalora.load(out)
    assert model.predict(["a gripping film"])[0]["label"] in model.label_names
    for bad, message in [(None, "NoneType"), ([1, 2], "item 0 is a int"), ([], "empty list")]:
        assert message in _api_error(lambda bad=bad: model.predict(bad))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_a_read_only_output_folder_is_refused_before_work(run_case, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "read-only" in run_case([*EVALUATE, "--out", str(locked / "eval")])
        assert "read-only" in run_case(["allocate", "--budget", "3", "--out-dir", str(locked / "q")])
    finally:
        locked.chmod(0o700)
