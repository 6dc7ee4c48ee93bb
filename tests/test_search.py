"""The Pareto-based configuration search: its pure core on a synthetic problem and the Lightning callback.

The synthetic problem shares the real ConfigSpace encoding: f1 is the log of a numel-weighted quantization-
error proxy that falls with every field's precision, f2 the exact avg_bits, so they conflict and the front
is known to run from ~2 to ~8.6 bits. Run as a script (``python tests/test_search.py ddp ...``) this file is
also the 2-process DDP job the DDP test launches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as the DDP script
    sys.path.insert(0, str(REPO))

from callbacks import ParetoConfigSearch
from callbacks.pareto_search import eval_mode
from coalora.errors import CoaloraError
from coalora.quant.options import FIELD_SIZES, OPTION_SPACE, QuantOption
from coalora.quant.qconfig import ConfigSpace, QConfig
from coalora.quant.targets import TargetMatrix
from coalora.search import (
    candidates,
    pareto,
    surrogate,
)
from coalora.search.archive import Archive, encoding_key

# --------------------------------------------------------------------------------------- synthetic problem


def synthetic_space(blocks: int = 3) -> ConfigSpace:
    shapes = [(64, 64), (64, 64), (128, 64), (64, 128)]
    targets = [
        TargetMatrix(f"layer.{b}.m{j}", f"m{j}", b, out, inp)
        for b in range(blocks)
        for j, (out, inp) in enumerate(shapes)
    ]
    return ConfigSpace(targets, model="synthetic")


def synthetic_f1(space: ConfigSpace, seed: int = 1):
    """f1(encoded (..., N, 5)) = log of a numel-weighted error proxy; falls as any field gets finer."""
    weight = torch.rand(len(space), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    table = torch.zeros(*FIELD_SIZES, dtype=torch.float64)
    for o in OPTION_SPACE:
        table[o.indices] = (
            2.0 ** (-2 * o.bits)
            * (1 + 2.0 ** (1 - o.scale_bits))
            * (o.block / 64) ** 0.5
            * (1 + 0.1 * math.log2(o.block2 / 16))
            * (1.0 if o.scale2_dtype == "fp32" else 1.3)
        )

    def f1(encoded: torch.Tensor) -> torch.Tensor:
        errors = table[tuple(encoded[..., i] for i in range(len(FIELD_SIZES)))]
        return torch.log((errors * weight * space.numel).sum(-1) / space.total_numel)

    return f1


def initial_archive(space: ConfigSpace, f1) -> Archive:
    """Four uniform configurations (2, 3, 4, 8 bits) and six random ones, all scored."""
    uniform = [space.encode(space.uniform(QuantOption(b, 8, "fp32", 64, 256))) for b in (2, 3, 4, 8)]
    encoded = torch.cat(
        [torch.stack(uniform), candidates.random_encodings(space, 6, torch.Generator().manual_seed(100))]
    )
    archive = Archive()
    archive.add(encoded, space.avg_bits_encoded(encoded))
    archive.f1 = f1(archive.encoded)
    return archive


def score_new(archive: Archive, space: ConfigSpace, encoded: torch.Tensor, f1) -> None:
    rows = archive.add(encoded, space.avg_bits_encoded(encoded))
    archive.f1[rows] = f1(archive.encoded[rows])


FAST = candidates.SearchSettings(num_starts=5, max_steps=10, gp_maxiter=50)

# ------------------------------------------------------------------------------------------ pure core


def test_search_beats_random_sampling_in_hypervolume() -> None:
    space = synthetic_space()
    f1 = synthetic_f1(space)
    found = initial_archive(space, f1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        score_new(found, space, candidates.propose(space, found, generator, FAST), f1)
    sampled = initial_archive(space, f1)
    extra = len(found) - len(sampled)
    assert extra >= 15  # the search really proposed new configurations each round
    score_new(sampled, space, candidates.random_encodings(space, extra, torch.Generator().manual_seed(0)), f1)
    assert len(sampled) == len(found)

    ref = pareto.reference_point(torch.cat([found.objectives(), sampled.objectives()]))
    start = pareto.hypervolume(initial_archive(space, f1).objectives(), ref)
    gain_search = pareto.hypervolume(found.objectives(), ref) - start
    gain_random = pareto.hypervolume(sampled.objectives(), ref) - start
    assert gain_search > 0
    assert gain_search > gain_random + 0.25 * gain_search


@pytest.mark.parametrize(
    "y",
    [
        torch.tensor([[0.7, 3.0]]),  # a single point
        torch.tensor([[0.7, 3.0], [0.7, 3.0], [0.7, 3.0]]),  # constant columns
        torch.tensor([[-5.0, 2.1], [-4.0, 2.0], [-6.0, 8.6]]),  # negative losses
        torch.tensor([[0.0, 0.0], [0.0, 4.0]]),  # zeros: the authors' (0, 0) would sit on a point
        torch.tensor([[1e9, 3.0], [1e9 + 1e-6, 3.0]], dtype=torch.float64),  # a spread lost in rounding
    ],
)
def test_reference_point_is_dominated_by_every_observation(y: torch.Tensor) -> None:
    ref = pareto.reference_point(y)
    assert (y < ref).all()


def test_reference_point_on_random_archives() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        y = torch.randn(int(torch.randint(1, 30, (1,), generator=generator)), 2, generator=generator) * 3
        assert (y < pareto.reference_point(y)).all()
    with pytest.raises(CoaloraError, match="at least one"):
        pareto.reference_point(torch.empty(0, 2))


def test_segment_filter_keeps_every_covered_segment_and_only_its_front() -> None:
    generator = torch.Generator().manual_seed(0)
    low, high, segments = 2.25, 7.15, 40
    f2 = torch.linspace(low, high - 1e-6, 400, dtype=torch.float64)
    f1 = -0.1 * f2 + 0.3 * torch.rand(400, generator=generator, dtype=torch.float64)  # noisy trade-off
    y = torch.stack([f1, f2], dim=-1)
    kept = pareto.segment_filter(y, segments, (low, high))

    segment_of = ((y[:, 1] - low) / ((high - low) / segments)).floor().long()
    assert set(segment_of[kept].tolist()) == set(range(segments))  # every segment stays populated
    assert torch.equal(kept, kept[torch.argsort(y[kept, 1], stable=True)])  # by rising bits
    for s in range(segments):
        rows = (segment_of == s).nonzero().squeeze(1)
        mine = kept[segment_of[kept] == s]
        for r in rows.tolist():
            dominated = ((y[mine] <= y[r]).all(-1) & (y[mine] < y[r]).any(-1)).any()
            assert bool(dominated) != (r in mine.tolist())  # kept iff non-dominated in its segment
    # a global front loses coverage: the segments are what keeps low and high budgets
    assert int(pareto.pareto_mask(y).sum()) < len(kept)


def test_segment_filter_puts_outliers_into_the_end_segments() -> None:
    y = torch.tensor([[0.5, 2.0], [0.4, 2.3], [0.3, 9.0], [0.2, 7.0]], dtype=torch.float64)
    kept = pareto.segment_filter(y, 4, (2.25, 7.15))
    assert kept.tolist() == [0, 1, 3]  # 2.0 shares 2.3's segment, neither dominates; 7.0 dominates 9.0
    with pytest.raises(CoaloraError):
        pareto.segment_filter(y, 0, (2.25, 7.15))
    with pytest.raises(CoaloraError):
        pareto.segment_filter(y, 4, (3.0, 3.0))


def test_coordinate_ascent_climbs_from_bounds_by_differences_not_raw_values() -> None:
    tops = torch.tensor([3, 3, 2, 2, 2])
    target = torch.tensor([2, 0, 1, 2, 0])
    calls = []

    def value(x: torch.Tensor) -> torch.Tensor:  # negative everywhere: raw values would never "improve"
        calls.append(len(x))
        return -100.0 - ((x * tops - target) ** 2).sum(-1)

    starts = torch.tensor([[0, 3, 2, 0, 2], [3, 0, 0, 2, 1]])
    found = candidates.coordinate_ascent(value, starts, tops, max_steps=20)
    assert torch.equal(found, target.expand(2, -1))
    assert all(n <= 2 * 2 * len(tops) for n in calls[1:])  # one batched call per step for all starts
    assert len(calls) <= 1 + 20


def test_coordinate_ascent_respects_max_steps_and_range() -> None:
    tops = torch.tensor([3, 2])

    def value(x: torch.Tensor) -> torch.Tensor:
        return (x * tops).sum(-1)  # grows without bound inside the box: the ascent must stop at the edge

    start = torch.tensor([[0, 0]])
    assert (candidates.coordinate_ascent(value, start, tops, max_steps=1) - start).abs().sum() == 1
    assert torch.equal(candidates.coordinate_ascent(value, start, tops, max_steps=50), tops.unsqueeze(0))
    flat = candidates.coordinate_ascent(lambda x: torch.zeros(len(x), dtype=torch.float64), start, tops)
    assert torch.equal(flat, start)  # nothing improves: stay


def test_marginal_gp_matches_the_exact_posterior() -> None:
    space = synthetic_space(1)
    archive = initial_archive(space, synthetic_f1(space))
    x = space.normalise(archive.encoded)
    gp = surrogate.fit_gp(x, archive.f1, maxiter=30)
    test = space.normalise(candidates.random_encodings(space, 7, torch.Generator().manual_seed(1)))
    test = torch.cat([test, x[:3]])
    with torch.no_grad():
        fast = surrogate.MarginalGP(gp).posterior(test.unsqueeze(1))
        exact = gp.posterior(test)
    assert torch.allclose(fast.mean.reshape(-1), exact.mean.reshape(-1), atol=1e-9)
    assert torch.allclose(fast.variance.reshape(-1), exact.variance.reshape(-1), atol=1e-9)


def test_encoding_bits_is_exact_avg_bits() -> None:
    space = synthetic_space(1)
    encoded = candidates.random_encodings(space, 5, torch.Generator().manual_seed(2))
    bits = surrogate.EncodingBits(space)(space.normalise(encoded))
    expected = torch.tensor([space.avg_bits(space.decode(e)) for e in encoded], dtype=torch.float64)
    assert torch.allclose(bits, expected, atol=1e-12)


def test_degenerate_archives_do_not_crash() -> None:
    space = synthetic_space(1)
    generator = torch.Generator().manual_seed(0)
    one = Archive()
    encoded = space.encode(space.uniform(QuantOption())).unsqueeze(0)
    one.add(encoded, space.avg_bits_encoded(encoded))
    one.f1[:] = 0.7
    found = candidates.propose(space, one, generator, FAST)  # a single scored point
    assert 0 < len(found) <= FAST.num_starts

    flat = Archive()
    encoded = torch.zeros(6, len(space), 5, dtype=torch.long)  # constant columns everywhere but one
    encoded[:, 0, 0] = torch.tensor([0, 1, 2, 3, 0, 1])
    flat.add(encoded, space.avg_bits_encoded(encoded))
    flat.f1[:] = 1.0  # constant outcome too
    assert len(candidates.propose(space, flat, generator, FAST)) > 0

    assert len(candidates.propose(space, Archive(), generator, FAST)) == 0  # nothing scored yet
    with pytest.raises(CoaloraError, match="candidate_method"):
        candidates.propose(space, one, generator, candidates.SearchSettings(candidate_method="grid"))


def test_no_candidates_when_the_archive_holds_the_whole_space() -> None:
    space = ConfigSpace([TargetMatrix("layer.0.q", "q", 0, 64, 64)], model="one-matrix")
    encoded = torch.tensor([o.indices for o in OPTION_SPACE]).unsqueeze(1)  # all 432 configurations
    archive = Archive()
    archive.add(encoded, space.avg_bits_encoded(encoded))
    archive.f1 = synthetic_f1(space)(archive.encoded)
    settings = candidates.SearchSettings(num_starts=3, max_steps=3, gp_maxiter=10)
    found = candidates.propose(space, archive, torch.Generator().manual_seed(0), settings)
    assert found.shape == (0, 1, 5)


def test_botorch_local_search_switch() -> None:
    space = synthetic_space(1)
    f1 = synthetic_f1(space)
    archive = initial_archive(space, f1)
    settings = candidates.SearchSettings(num_starts=2, candidate_method="botorch", gp_maxiter=30)
    state = torch.random.get_rng_state()
    found = candidates.propose(space, archive, torch.Generator().manual_seed(0), settings)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert 0 < len(found) <= 2
    assert (found >= 0).all() and (found <= surrogate.field_tops(1).reshape(1, 5)).all()
    assert not set(archive.keys()) & {encoding_key(e) for e in found}


def test_proposals_are_reproducible_from_the_generator() -> None:
    space = synthetic_space(1)
    archive = initial_archive(space, synthetic_f1(space))
    first = candidates.propose(space, archive, torch.Generator().manual_seed(5), FAST)
    again = candidates.propose(space, archive, torch.Generator().manual_seed(5), FAST)
    assert torch.equal(first, again)


def test_archive_add_deduplicates_and_round_trips() -> None:
    space = synthetic_space(1)
    encoded = candidates.random_encodings(space, 3, torch.Generator().manual_seed(0))
    archive = Archive()
    rows = archive.add(
        torch.cat([encoded, encoded[:1]]), space.avg_bits_encoded(torch.cat([encoded, encoded[:1]]))
    )
    assert rows.tolist() == [0, 1, 2, 0]
    assert archive.f1.isnan().all() and (archive.epoch == -1).all()
    assert archive.add(encoded[1:2], space.avg_bits_encoded(encoded[1:2])).tolist() == [1]
    back = Archive.from_state(archive.state_dict())
    assert torch.equal(back.encoded, archive.encoded) and torch.equal(back.f2, archive.f2)


def test_fit_rows_cap_keeps_the_training_set_and_the_newest() -> None:
    scored = torch.arange(10)
    assert torch.equal(candidates._fit_rows(scored, torch.tensor([1, 2]), 20), scored)
    assert candidates._fit_rows(scored, torch.tensor([1, 2]), 5).tolist() == [1, 2, 7, 8, 9]
    assert candidates._fit_rows(scored, None, 3).tolist() == [7, 8, 9]


def test_random_encodings_respect_the_bits_range() -> None:
    space = synthetic_space(1)
    encoded = candidates.random_encodings(space, 20, torch.Generator().manual_seed(0), (4.0, 5.0))
    bits = space.avg_bits_encoded(encoded)
    assert len(encoded) == 20 and ((bits >= 4.0) & (bits <= 5.0)).all()


# ------------------------------------------------------------------------------------------- the callback


def test_callback_validates_its_arguments() -> None:
    with pytest.raises(CoaloraError, match="mode"):
        ParetoConfigSearch(mode="greedy")
    with pytest.raises(CoaloraError, match="score_batches"):
        ParetoConfigSearch(score_batches=0)
    with pytest.raises(CoaloraError, match="candidate_method"):
        ParetoConfigSearch(candidate_method="grid")
    with pytest.raises(CoaloraError, match="max_steps"):
        ParetoConfigSearch(max_steps=-1)
    with pytest.raises(CoaloraError, match="bits_range"):
        ParetoConfigSearch(bits_range=(5.0, 3.0))
    assert ParetoConfigSearch().bits_range == (2.25, 7.15)


def test_eval_mode_restores_every_submodule() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a part kept in eval mode on purpose
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[0].training and not net[1].training


@pytest.fixture(scope="module")
def tiny_bert(tiny_models_dir, tmp_path_factory) -> str:
    os.environ["COALORA_CACHE"] = str(tmp_path_factory.mktemp("coalora_cache"))
    return str(tiny_models_dir / "tiny-bert")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and far faster when other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_module(model: str, **overrides):
    from coalora.tasks.classification import ClassificationTask

    args = {"model_name": model, "rank": 4, "train_budgets": [2.5, 3.5, 5.0], "eval_budgets": [3.0]}
    return ClassificationTask(**{**args, **overrides})


@pytest.fixture(scope="module")
def pristine(tiny_bert):
    """One CoA-LoRA module built once (allocation takes seconds); tests train deep copies of it."""
    return tiny_module(tiny_bert)


def fresh(module, lr: float | None = None):
    copy = deepcopy(module)
    if lr is not None:
        copy.hparams.lr = lr
    return copy


def tiny_data(model: str, glue_dir: Path):
    from coalora.data.glue_datamodule import GLUEDataModule

    return GLUEDataModule(
        task="sst2",
        model_name=model,
        glue_dir=str(glue_dir),
        train_file=str(Path(glue_dir) / "sst2" / "sentence" / "stsa.binary.train"),
        train_limit=64,
        eval_limit=32,
        batch_size=16,
        search_size=32,
    )


def tiny_callback(**overrides) -> ParetoConfigSearch:
    args = {"score_batches": 2, "score_batch_size": 16, "num_starts": 3, "max_steps": 5, "gp_maxiter": 30}
    # one-epoch runs below exercise a round; the default skips the round after the last epoch
    return ParetoConfigSearch(**{**args, "final_round": True, **overrides})


def trainer(root: Path, callbacks: list, epochs: int, **overrides):
    import lightning as L

    args = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
        "callbacks": callbacks,
    }
    return L.Trainer(**{**args, **overrides})


def set_hash(configs: list[QConfig]) -> str:
    text = json.dumps([c.to_json() for c in configs], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def test_one_round_updates_the_set_logs_and_writes_the_archive(pristine, tiny_bert, glue_dir, tmp_path):
    module = fresh(pristine)
    before = list(module.train_configs)
    callback = tiny_callback()
    run = trainer(tmp_path, [callback], epochs=1)
    run.fit(module, tiny_data(tiny_bert, glue_dir))

    space = module.model.space
    metrics = run.callback_metrics
    assert (
        metrics["search/archive_size"] == len(callback.archive) == len(before) + metrics["search/new_configs"]
    )
    assert 0 < metrics["search/new_configs"] <= 3
    assert metrics["search/train_configs"] == len(module.train_configs)
    assert metrics["search/hypervolume"] > 0 and metrics["search/front_size"] >= 1
    assert module.train_configs != before
    assert torch.equal(torch.stack([space.encode(c) for c in module.train_configs]), callback.train_set)

    data = json.loads((tmp_path / "search_archive.json").read_text())
    assert data["format"] == "coalora.search_archive/1" and data["epoch"] == 0
    assert not list(tmp_path.glob("*.tmp"))
    assert len(data["entries"]) == len(callback.archive)
    training = {set_hash([c]) for c in module.train_configs}
    for entry in data["entries"]:
        config = space.validate(QConfig.from_json(entry["qconfig"]))
        assert entry["f2"] == pytest.approx(space.avg_bits(config), abs=1e-9)
        assert math.isfinite(entry["f1"]) and entry["epoch"] == 0
        assert entry["training"] == (set_hash([config]) in training)
    y = torch.tensor([[e["f1"], e["f2"]] for e in data["entries"]], dtype=torch.float64)
    assert (y < torch.tensor(data["reference_point"])).all()


def test_a_round_leaves_the_global_rng_untouched(
    pristine, tiny_bert, glue_dir, tmp_path, monkeypatch
) -> None:
    """Training's random stream (dropout) must not depend on whether the search ran, even where the search
    draws from the global RNG (botorch does when a GP fit is retried from sampled priors)."""
    import callbacks.pareto_search as pareto

    real = pareto.propose
    monkeypatch.setattr(pareto, "propose", lambda *a, **k: (torch.rand(3), real(*a, **k))[1])

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            self.before = torch.get_rng_state()

        def on_train_end(self, trainer, module) -> None:
            self.after = torch.get_rng_state()

    probe, callback = Probe(), tiny_callback()
    trainer(tmp_path, [probe, callback], epochs=1).fit(fresh(pristine), tiny_data(tiny_bert, glue_dir))
    assert callback.last_round == 0 and len(callback.archive) > 3  # the round ran and proposed
    assert torch.equal(probe.before, probe.after)


def test_frozen_and_random_modes(pristine, tiny_bert, glue_dir, tmp_path) -> None:
    module = fresh(pristine)
    before = list(module.train_configs)
    trainer(tmp_path / "frozen", [tiny_callback(mode="frozen")], epochs=1).fit(
        module, tiny_data(tiny_bert, glue_dir)
    )
    assert module.train_configs == before

    module = fresh(pristine)
    callback = tiny_callback(mode="random", random_per_round=4)
    trainer(tmp_path / "random", [callback], epochs=1).fit(module, tiny_data(tiny_bert, glue_dir))
    assert module.train_configs[:3] == before and len(module.train_configs) == 7
    assert callback.archive.f1.isfinite().all()


def test_other_methods_are_left_alone_with_one_warning(tiny_bert, glue_dir, tmp_path) -> None:
    module = tiny_module(tiny_bert, method="shared")
    before = list(module.train_configs)
    callback = tiny_callback()
    with pytest.warns(UserWarning, match="only acts on method 'coalora'") as caught:
        trainer(tmp_path, [callback], epochs=2).fit(module, tiny_data(tiny_bert, glue_dir))
    assert sum("only acts on method" in str(w.message) for w in caught) == 1
    assert module.train_configs == before and len(callback.archive) == 0


def test_callback_state_round_trips() -> None:
    callback = ParetoConfigSearch(seed=4)
    space = synthetic_space(1)
    encoded = candidates.random_encodings(space, 3, callback.generator)
    callback.archive.add(encoded, space.avg_bits_encoded(encoded))
    callback.archive.f1[:] = torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64)
    callback.train_set, callback.candidates, callback.last_round = encoded[:2], encoded[2:], 6
    state = callback.state_dict()
    other = ParetoConfigSearch(seed=4)
    other.load_state_dict(state)
    assert torch.equal(other.archive.encoded, encoded) and torch.equal(other.archive.f1, callback.archive.f1)
    assert torch.equal(other.train_set, encoded[:2]) and torch.equal(other.candidates, encoded[2:])
    assert other.last_round == 6
    assert torch.equal(torch.rand(3, generator=other.generator), torch.rand(3, generator=callback.generator))
    with pytest.raises(CoaloraError, match="version"):
        other.load_state_dict({**state, "version": 99})


def test_resumed_run_proposes_the_same_set(pristine, tiny_bert, glue_dir, tmp_path) -> None:
    """lr = 0 keeps the weights fixed, isolating the search state from training nondeterminism (the data
    order is restored, see test_datamodule, but the global dropout RNG is not in a Lightning checkpoint)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    whole = fresh(pristine, lr=0.0)
    straight = tiny_callback(seed=3)
    trainer(tmp_path / "a", [straight], epochs=2).fit(whole, tiny_data(tiny_bert, glue_dir))

    first = fresh(pristine, lr=0.0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    half = tiny_callback(seed=3)
    trainer(tmp_path / "b", [half, saver], epochs=1, enable_checkpointing=True).fit(
        first, tiny_data(tiny_bert, glue_dir)
    )
    assert len(half.archive) < len(straight.archive)  # the second round did add configurations

    resumed = fresh(pristine, lr=0.0)
    again = tiny_callback(seed=3)
    trainer(tmp_path / "c", [again], epochs=2).fit(
        resumed, tiny_data(tiny_bert, glue_dir), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert set_hash(resumed.train_configs) == set_hash(whole.train_configs)
    assert torch.equal(again.archive.encoded, straight.archive.encoded)
    assert torch.equal(again.archive.f1, straight.archive.f1)
    assert torch.equal(again.generator.get_state(), straight.generator.get_state())
    assert again.last_round == straight.last_round == 1


def test_a_round_missing_from_the_checkpoint_runs_once_at_the_next_epoch_start(
    pristine, tiny_bert, glue_dir, tmp_path
) -> None:
    """A checkpoint written before the round (here: by a run without the callback) is caught up on."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "a", [saver], epochs=1, enable_checkpointing=True).fit(
        fresh(pristine, lr=0.0), tiny_data(tiny_bert, glue_dir)
    )
    rounds = []
    callback = tiny_callback()
    original = callback._round
    callback._round = lambda run, module, epoch: (rounds.append(epoch), original(run, module, epoch))
    last = str(tmp_path / "ckpt" / "last.ckpt")
    run = trainer(tmp_path / "b", [callback], epochs=2)
    run.fit(fresh(pristine, lr=0.0), tiny_data(tiny_bert, glue_dir), ckpt_path=last)
    assert rounds == [0, 1] and callback.last_round == 1


@pytest.mark.slow
def test_ddp_ranks_train_on_the_same_set(tiny_models_dir, glue_dir, tmp_path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "COALORA_CACHE": str(tmp_path / "cache"),
    }
    command = [
        sys.executable,
        __file__,
        "ddp",
        str(tiny_models_dir / "tiny-bert"),
        str(glue_dir),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["set"] == ranks[1]["set"]
    assert ranks[0]["archive_f1"] == ranks[1]["archive_f1"]
    assert ranks[0]["generator"] == ranks[1]["generator"]
    assert ranks[0]["size"] > 3  # the search did grow the set beyond the three initial configurations
    # each configuration was scored once, by one rank: the work was split, not repeated
    assert ranks[0]["scored_here"] > 0 and ranks[1]["scored_here"] > 0
    assert ranks[0]["scored_here"] + ranks[1]["scored_here"] == ranks[0]["archive_size"]


def _ddp_job(model: str, glue_dir: str, out: str) -> None:
    """One 2-process CPU DDP epoch; every rank writes what it will train on next."""
    import lightning as L

    import callbacks.pareto_search as pareto_search

    scored: list[int] = []
    score = pareto_search.mean_loss

    def counting(*args):
        scored.append(1)
        return score(*args)

    pareto_search.mean_loss = counting
    module = tiny_module(model)
    callback = ParetoConfigSearch(
        score_batches=2, score_batch_size=16, num_starts=3, max_steps=5, gp_maxiter=30, final_round=True
    )
    run = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out,
        callbacks=[callback],
    )
    run.fit(module, tiny_data(model, Path(glue_dir)))
    result = {
        "set": set_hash(module.train_configs),
        "size": len(module.train_configs),
        "archive_f1": callback.archive.f1.tolist(),
        "generator": hashlib.sha256(callback.generator.get_state().numpy().tobytes()).hexdigest(),
        "scored_here": len(scored),
        "archive_size": len(callback.archive),
    }
    (Path(out) / f"rank{run.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "ddp":
    torch.set_num_threads(1)
    _ddp_job(*sys.argv[2:])


def test_no_round_follows_the_last_epoch_and_seen_means_trained_on(pristine, tiny_bert, glue_dir, tmp_path):
    """A round after the final epoch would add configurations no step trained on (and evaluation once
    called them seen); by default there is none, and ``trained_on`` holds exactly the configurations drawn."""
    module = fresh(pristine)
    before = list(module.train_configs)
    drawn: list = []
    real = module.sample_configs

    def recording():
        configs = real()
        drawn.extend(configs)
        return configs

    module.sample_configs = recording
    callback = tiny_callback(final_round=False)
    trainer(tmp_path, [callback], epochs=1).fit(module, tiny_data(tiny_bert, glue_dir))
    assert len(callback.archive) == 0 and not (tmp_path / "search_archive.json").exists()
    assert module.train_configs == before
    assert module.trained_on == list(dict.fromkeys(drawn))


def test_f1_is_scored_on_the_whole_search_split_by_default(pristine, tiny_bert, glue_dir):
    module = fresh(pristine)
    data = tiny_data(tiny_bert, glue_dir)
    data.setup("fit")

    class Run:  # what _search_batches reads of the trainer
        datamodule = data

    whole = ParetoConfigSearch(score_batch_size=8)._search_batches(Run(), module)
    assert sum(len(b["labels"]) for b in whole) == len(data.search_set) == 32
    assert len(ParetoConfigSearch(score_batch_size=8, score_batches=2)._search_batches(Run(), module)) == 2


def test_rounds_every_n_train_steps_give_a_short_run_several_rounds(pristine, tiny_bert, glue_dir, tmp_path):
    module = fresh(pristine)
    rounds: list[int] = []
    callback = tiny_callback(every_n_train_steps=1, final_round=False)
    real = callback._round

    def recording(trainer, module, epoch):
        rounds.append(trainer.global_step)
        return real(trainer, module, epoch)

    callback._round = recording
    run = trainer(tmp_path, [callback], epochs=1)  # 64 rows in batches of 16: four steps
    run.fit(module, tiny_data(tiny_bert, glue_dir))
    assert rounds == [1, 2, 3]  # none after step 4, the last: no training would follow it
    assert callback.last_round_step == 3 and callback.state_dict()["last_round_step"] == 3
    assert len(callback.archive) > 0


def test_the_mapper_off_ablation_trains_coalora_without_a_mapper(tiny_bert):
    module = tiny_module(tiny_bert, use_mapper=False)
    assert module.method.name == "coalora" and module.model.mapper is None
    assert not any("mapper" in name for name, _ in module.named_parameters())


@pytest.mark.parametrize("policy", ["relevant", "all"])
def test_later_rounds_score_only_the_set_the_front_and_new(policy, pristine, tiny_bert, glue_dir, tmp_path):
    """Issue #25: with ``rescore: relevant`` a later round scores the training set, the front and the new
    candidates, not the whole archive; the archive file says which scores are this round's."""
    counts: list[tuple[int, int, int]] = []  # (archive size before the round, scored, new)
    callback = tiny_callback(every_n_train_steps=2, rescore=policy, num_starts=4)
    real = callback._round

    def recording(trainer, module, epoch):
        size = len(callback.archive)
        real(trainer, module, epoch)
        metrics = trainer.callback_metrics
        counts.append((size, int(metrics["search/scored_configs"]), int(metrics["search/new_configs"])))

    callback._round = recording
    trainer(tmp_path, [callback], epochs=1).fit(fresh(pristine), tiny_data(tiny_bert, glue_dir))
    assert len(counts) == 2  # after steps 2 and 4 (final_round)
    (size0, scored0, new0), (size1, scored1, new1) = counts
    assert size0 == 0 and scored0 == 3 + new0  # the first round scores the initial set and its candidates
    assert size1 == 3 + new0 and new1 > 0
    entries = json.loads((tmp_path / "search_archive.json").read_text())["entries"]
    rescored = [e for e in entries if e["rescored"]]
    assert len(rescored) == scored1 and all(math.isfinite(e["f1"]) for e in entries)
    if policy == "all":
        assert scored1 == size1 + new1
    else:
        assert scored1 < size1 + new1  # something on the archive was left out
        stale = [e for e in entries if not e["rescored"]]
        assert stale and not any(e["pareto"] for e in stale)  # dominated before, and after the shift


def test_the_whole_split_is_scored_shortest_first_to_the_same_mean(pristine, tiny_bert, glue_dir):
    """Issue #25: whole-split scoring batches sentences by length (less padding), which leaves f1 as it was;
    a few batches keep the split's fixed order (a random sample of it)."""
    from callbacks.pareto_search import mean_loss

    module = fresh(pristine)
    data = tiny_data(tiny_bert, glue_dir)
    data.setup("fit")

    class Run:
        datamodule = data

    sorted_batches = ParetoConfigSearch(score_batch_size=8)._search_batches(Run(), module)
    fixed = [dict(b) for b in data.search_dataloader(batch_size=8)]
    assert sum(b["input_ids"].numel() for b in sorted_batches) < sum(b["input_ids"].numel() for b in fixed)
    lengths = [int(b["attention_mask"].sum(1).max()) for b in sorted_batches]
    assert lengths == sorted(lengths)
    assert sorted(torch.cat([b["labels"] for b in sorted_batches]).tolist()) == sorted(
        torch.cat([b["labels"] for b in fixed]).tolist()
    )
    config = module.train_configs[0]
    with torch.no_grad():
        module.eval()
        assert mean_loss(module, config, sorted_batches) == pytest.approx(
            mean_loss(module, config, fixed), abs=1e-5
        )
    few = ParetoConfigSearch(score_batch_size=8, score_batches=2)._search_batches(Run(), module)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(few, fixed[:2], strict=True))
