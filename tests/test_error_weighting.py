"""``error_weighting: none | fisher | activation`` (issue 24, item 6): the activation-weighted table is
tr(E H Eᵀ), it is cached by its statistics, it moves the allocation where it must, ``fit`` allocates from
it (and a loaded checkpoint never does again), and bad values fail in one line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from coalora.cli import main
from coalora.commands import allocate as allocate_command
from coalora.errors import CoaloraError
from coalora.quant import error_table as error_table_module
from coalora.quant.allocate import allocate
from coalora.quant.error_table import cached_error_table, error_table, table_cache_path
from coalora.quant.error_weighting import FISHER_EXAMPLES, training_texts
from coalora.quant.fisher import cached_fisher
from coalora.quant.options import OPTION_SPACE
from coalora.quant.qconfig import ConfigSpace
from coalora.quant.quantizer import fake_quantize
from coalora.quant.targets import TargetMatrix, target_weights
from coalora.tasks import weighted_allocation
from coalora.tasks.checkpoint import load_task
from coalora.tasks.classification import ClassificationTask
from tests.tiny_models import tiny_glue_data

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "conf" / "sst2_tiny.yaml")
#: options of every block size, bit width and scale setting, a few of each
OPTIONS = OPTION_SPACE[::23]


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three small matrices; the last one's 120 weights do not fill a whole number of 64-blocks (blocks span
    rows, the tail is padding) and one of its rows is zero."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "a": torch.randn(24, 64, generator=generator),
        "b": torch.randn(40, 48, generator=generator) * 0.02,
        "c": torch.randn(5, 24, generator=generator),
    }
    weights["c"][2] = 0.0
    return weights


def _hessians(weights: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Second moments of correlated random inputs, with one strong direction (as LayerNorm outliers give)."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, w in weights.items():
        n = w.shape[1]
        x = torch.randn(256, n, generator=generator) @ torch.randn(n, n, generator=generator)
        x[:, 0] *= 10
        result[name] = x.T @ x / len(x)
    return result


def _direct(weight: torch.Tensor, hessian: torch.Tensor, option) -> float:
    e = (weight - fake_quantize(weight, option)).double()
    return float(torch.trace(e @ hessian.double() @ e.T))


# ------------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("c", [1.0, 3.5])
def test_identity_statistics_give_c_times_the_plain_table(c):
    weights = _weights()
    plain = error_table(weights, OPTIONS)
    scaled = error_table(
        weights, OPTIONS, hessians={n: c * torch.eye(w.shape[1]) for n, w in weights.items()}
    )
    assert torch.allclose(scaled, c * plain, rtol=1e-5, atol=0)


def test_activation_table_is_the_trace_of_e_h_et():
    weights, options = _weights(), OPTIONS
    hessians = _hessians(weights)
    table = error_table(weights, options, hessians=hessians)
    for i, name in enumerate(weights):
        for k in (0, 3, len(options) - 1):
            assert float(table[i, k]) == pytest.approx(
                _direct(weights[name], hessians[name], options[k]), 1e-5
            )
    plain = error_table(weights, options)
    assert not torch.allclose(table / table[:, :1], plain / plain[:, :1], rtol=1e-2)  # not just a rescale


def test_weighted_tables_refuse_mismatched_statistics():
    weights = _weights()
    with pytest.raises(CoaloraError, match="no entry for matrix 'a'"):
        error_table(weights, OPTIONS, hessians={})
    wrong = {n: torch.eye(w.shape[0]) for n, w in weights.items()}
    with pytest.raises(CoaloraError, match="input statistics of 'a': shape"):
        error_table(weights, OPTIONS, hessians=wrong)
    fisher = {n: torch.ones_like(w) for n, w in weights.items()}
    with pytest.raises(CoaloraError, match="not both"):
        error_table(weights, OPTIONS, fisher=fisher, hessians=_hessians(weights))


def test_weighting_moves_bits_to_the_matrices_whose_outputs_it_weighs():
    """Two identical matrices: unweighted, their errors tie; weighted by inputs 10⁴ times stronger for one,
    the allocator must give that one more bits at a budget between 2 and 4 bits."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    weights = {"loud": w, "quiet": w.clone()}
    targets = [TargetMatrix(name, "dense", i, 32, 64) for i, name in enumerate(weights)]
    space = ConfigSpace(targets, model="constructed")
    plain = error_table(weights)
    assert torch.equal(plain[0], plain[1])
    hessians = {"loud": 1e2 * torch.eye(64), "quiet": 1e-2 * torch.eye(64)}
    weighted = error_table(weights, hessians=hessians)
    config = allocate(space, weighted, 3.0)
    loud, quiet = config.matrices["loud"], config.matrices["quiet"]
    assert loud.storage_bits > quiet.storage_bits and loud.bits > quiet.bits
    swapped = allocate(
        space, error_table(weights, hessians={"loud": hessians["quiet"], "quiet": hessians["loud"]}), 3.0
    )
    assert swapped.matrices["quiet"] == loud and swapped.matrices["loud"] == quiet


def test_the_cache_is_keyed_by_the_statistics_and_the_weighting(tmp_path, monkeypatch):
    weights = _weights()
    hessians = _hessians(weights)
    first = cached_error_table(weights, OPTIONS, cache_dir=tmp_path, hessians=hessians)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached table")

    monkeypatch.setattr(error_table_module, "error_table", fail)
    again = cached_error_table(weights, OPTIONS, cache_dir=tmp_path, hessians=hessians)
    assert torch.equal(first, again)
    other_statistics = {n: 2 * h for n, h in hessians.items()}
    with pytest.raises(AssertionError, match="recomputed"):
        cached_error_table(weights, OPTIONS, cache_dir=tmp_path, hessians=other_statistics)
    fisher = {n: torch.ones_like(w) for n, w in weights.items()}
    paths = {
        table_cache_path(weights, OPTIONS, cache_dir=tmp_path),
        table_cache_path(weights, OPTIONS, fisher=fisher, cache_dir=tmp_path),
        table_cache_path(weights, OPTIONS, cache_dir=tmp_path, hessians=hessians),
        table_cache_path(weights, OPTIONS, cache_dir=tmp_path, hessians=other_statistics),
    }
    assert len(paths) == 4


# ------------------------------------------------------------------------------------------- the task


def _task(tiny_models_dir: Path, **kwargs) -> ClassificationTask:
    torch.manual_seed(0)
    args = dict(model_name=str(tiny_models_dir / "tiny-bert"), rank=4, train_budgets=[], eval_budgets=[3.0])
    return ClassificationTask(**{**args, **kwargs})


def test_bad_weightings_are_refused_in_one_line(tiny_models_dir):
    with pytest.raises(CoaloraError, match=r"model\.error_weighting must be one of none, fisher, activation"):
        _task(tiny_models_dir, error_weighting="hessian")
    with pytest.raises(CoaloraError, match="cannot apply to method 'qlora'") as err:
        _task(tiny_models_dir, method="qlora", train_budget=3.0, error_weighting="activation")
    assert "\n" not in str(err.value)
    task = _task(tiny_models_dir, error_weighting="activation")  # fine until it has to allocate
    with pytest.raises(CoaloraError, match="takes its statistics from the run's training data"):
        _ = task.eval_configs


def test_a_bad_weighting_on_the_command_line_is_one_line(tiny_models_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["fit", "--config", TINY, "--model.model_name", str(tiny_models_dir / "tiny-bert")]
    argv += ["--trainer.default_root_dir", out, "--model.error_weighting", "hessian"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "error_weighting" in err and len(err.splitlines()) == 1


def test_the_task_tables_read_the_training_rows(tiny_models_dir, glue_dir):
    """activation: the base model's statistics over calibration_examples training rows (those GPTQ uses);
    fisher: the Fisher of the training rows' text. Both differ from the plain table."""
    data = tiny_glue_data(tiny_models_dir / "tiny-bert", glue_dir, train_limit=24, search_size=0)
    plain = _task(tiny_models_dir).error_table()
    task = _task(tiny_models_dir, error_weighting="activation", calibration_examples=16)
    task.use_allocation_data(data)
    weights = target_weights(task.model.backbone, task.model.space.targets)
    hessians = task.calibration_hessians(data, "gptq")  # GPTQ's own statistics when it trains under gptq
    with torch.no_grad():
        for layer in task.model.layers:  # a trained adapter must not change what allocation reads
            layer.lora_B.normal_()
    activation = task.error_table()
    assert torch.equal(activation, cached_error_table(weights, hessians=hessians))
    assert not torch.allclose(activation / plain, activation[0, 0] / plain[0, 0])

    fisher_task = _task(tiny_models_dir, error_weighting="fisher")
    fisher_task.use_allocation_data(data)
    texts = training_texts(data, FISHER_EXAMPLES, 42)
    assert len(texts) == 24 and all(t.strip() for t in texts)
    targets = fisher_task.model.space.targets
    with pytest.warns(UserWarning, match="no trained"):
        weighted = fisher_task.error_table()
    fisher = cached_fisher(str(tiny_models_dir / "tiny-bert"), texts, targets, weights, num_samples=256)
    assert torch.equal(weighted, cached_error_table(weights, fisher=fisher))
    assert not torch.allclose(weighted / plain, weighted[0, 0] / plain[0, 0])


def test_fit_allocates_from_the_activation_table_and_a_checkpoint_keeps_its_sets(
    tiny_models_dir, tmp_path, monkeypatch
):
    out = str(tmp_path / "run")
    model = str(tiny_models_dir / "tiny-bert")
    budgets = "[2.5, 3.0, 3.5, 4.0]"
    argv = ["fit", "--config", TINY, "--model.model_name", model, "--model.eval_budgets", budgets]
    argv += ["--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out]
    argv += ["--model.error_weighting", "activation", "--model.calibration_examples", "16"]
    argv += ["--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1"]
    assert main(argv) == 0
    (last,) = Path(out).rglob("last.ckpt")

    def fail(*args, **kwargs):
        raise AssertionError("a loaded checkpoint computed an error table")

    with monkeypatch.context() as patch:
        patch.setattr(weighted_allocation, "cached_error_table", fail)
        loaded = load_task(last)
        stored = dict(loaded.eval_configs)
        assert loaded.train_configs
    assert loaded.hparams.error_weighting == "activation"
    weighted = loaded.error_table()  # rebuilt from the checkpoint's data arguments, adapter off
    space = loaded.model.space
    plain = cached_error_table(target_weights(loaded.model.backbone, space.targets))
    differ = 0
    for label, config in stored.items():
        assert config == allocate(space, weighted, float(label))
        differ += config != allocate(space, plain, float(label))
    assert differ > 0


# -------------------------------------------------------------------------------------- coalora allocate


def _allocate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    allocate_command.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_allocate_command_weighs_errors_as_asked(tiny_models_dir, glue_dir, tmp_path, capsys):
    common = ["--model", str(tiny_models_dir / "tiny-bert"), "--budget", "3.0", "--cache-dir", str(tmp_path)]
    text = ["--glue-task", "sst2", "--glue-dir", str(glue_dir)]
    out = tmp_path / "act.json"
    activation = ["--error-weighting", "activation", "--calibration-samples", "16", "--out", str(out)]
    assert allocate_command.run(_allocate_args(*common, *text, *activation)) == 0
    assert "activation (sst2) nf error table" in capsys.readouterr().out
    assert out.is_file()
    older = ["--fisher-glue-task", "sst2", "--glue-dir", str(glue_dir), "--fisher-samples", "8"]
    with pytest.warns(UserWarning, match="no trained"):
        assert allocate_command.run(_allocate_args(*common, *older)) == 0  # still means fisher
    assert "Fisher (sst2) nf error table" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--glue-task", "sst2"], "give the text for --error-weighting fisher or activation"),
        (["--error-weighting", "activation"], "needs training text; add --glue-task TASK or --text FILE"),
        (["--error-weighting", "none", "--text", "a.txt"], "--error-weighting none reads no text"),
    ],
)
def test_allocate_command_refuses_a_weighting_without_its_text(extra, message, tmp_path):
    args = _allocate_args("--model", "unused", "--budget", "3.0", "--cache-dir", str(tmp_path), *extra)
    with pytest.raises(CoaloraError, match=message):
        allocate_command.run(args)
