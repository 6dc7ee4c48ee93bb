"""The Pareto-based configuration search's Lightning callback (its pure core: test_search_core.py; under
DDP: test_search_ddp.py)."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from callbacks import ParetoConfigSearch
from callbacks.pareto_search import eval_mode
from coalora.errors import CoaloraError
from coalora.quant.qconfig import QConfig
from coalora.search import candidates
from tests.search_setup import (  # noqa: F401  (fixtures are found by name)
    fresh,
    one_thread,
    pristine,
    set_hash,
    tiny_bert,
    tiny_callback,
    tiny_data,
    tiny_module,
    trainer,
)
from tests.test_search_core import synthetic_space

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
