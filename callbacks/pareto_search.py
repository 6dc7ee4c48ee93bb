"""The between-epoch configuration search (SPEC §5) as a Lightning callback; the search itself is in
:mod:`coalora.search`.

Each round (after every ``every_n_epochs`` training epochs) scores f1 = the current model's mean task loss on
fixed batches of the held-out search split for the archive and the new candidates, and replaces the
module's training configurations by the segment-wise Pareto filter of the archive. Scoring is split across
DDP ranks and summed; the GP step runs on rank 0 and its result is broadcast, so every rank trains on the
same set. Everything the next round depends on (archive, candidates, set, RNG) lives in the checkpoint.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from coalora.errors import CoaloraError
from coalora.quant.allocate import budget_grid
from coalora.quant.qconfig import ConfigSpace
from coalora.search.archive import Archive
from coalora.search.candidates import CANDIDATE_METHODS, SearchSettings, propose, random_encodings
from coalora.search.pareto import hypervolume, pareto_mask, reference_point, segment_filter
from coalora.search.rescoring import RESCORE_POLICIES, carry_drift, rows_to_score
from coalora.search.scoring import eval_mode, mean_loss
from coalora.tasks.base import CoALoRATask
from coalora.utils import write_text_atomic

MODES = ("search", "frozen", "random")
STATE_VERSION = 1


class ParetoConfigSearch(L.Callback):
    """Pareto-based GP search of the training configuration set, with the paper's ablations as modes.

    ``mode``: ``search`` (GP + qLogEHVI candidates + segment-wise Pareto filter), ``frozen`` (the set never
    changes) or ``random`` (``random_per_round`` uniform random configurations are added each round). All
    modes score the archive, so logged fronts and hypervolumes compare across modes. ``candidate_method``
    ``coordinate`` is the paper's finite-difference ascent (``num_starts`` starts, ``max_steps`` moves);
    ``botorch`` runs botorch's discrete local search to a local optimum instead (slower, no step limit).
    ``rescore`` says which archive entries a round scores again (:mod:`coalora.search.rescoring`):
    ``relevant`` (the default: the training set, the front and the new candidates; the others' scores
    move by the shift measured on those), ``all`` or ``new``; the older ``refresh_archive`` (True: ``all``,
    False: ``new``) is still read. f1 is the mean loss
    over ``score_batches`` batches of the search split; None (the default) scores on all of it, since the
    differences the search acts on are small next to the noise of a few batches. No round follows the last
    training epoch unless ``final_round`` asks for one (to inspect the scored front): its new set would
    never be trained on. Evaluation labels a configuration "seen" only if a training step used it.
    """

    def __init__(
        self,
        mode: str = "search",
        every_n_epochs: int = 1,
        every_n_train_steps: int | None = None,
        score_batches: int | None = None,
        score_batch_size: int = 32,
        num_starts: int = 5,
        max_steps: int = 20,
        candidate_method: str = "coordinate",
        num_segments: int = 40,
        bits_range: tuple[float, float] | None = None,
        rescore: str | None = None,
        refresh_archive: bool | None = None,
        random_per_round: int = 10,
        mc_samples: int = 32,
        gp_maxiter: int = 100,
        max_fit_points: int = 512,
        seed: int = 0,
        archive_file: str = "search_archive.json",
        final_round: bool = False,
    ) -> None:
        """``bits_range`` defaults to the training budget grid's [2.25, 7.15]; ``archive_file`` is written
        into the run folder (``trainer.log_dir``)."""
        super().__init__()
        if mode not in MODES:
            raise CoaloraError(f"unknown search mode '{mode}'; use one of: {', '.join(MODES)}")
        if candidate_method not in CANDIDATE_METHODS:
            raise CoaloraError(
                f"unknown candidate_method '{candidate_method}'; use one of: {', '.join(CANDIDATE_METHODS)}"
            )
        for name, value, least in (
            ("every_n_epochs", every_n_epochs, 1),
            ("every_n_train_steps", 1 if every_n_train_steps is None else every_n_train_steps, 1),
            ("score_batches", 1 if score_batches is None else score_batches, 1),
            ("score_batch_size", score_batch_size, 1),
            ("num_segments", num_segments, 1),
            ("mc_samples", mc_samples, 1),
            ("gp_maxiter", gp_maxiter, 1),
            ("max_fit_points", max_fit_points, 1),
            ("num_starts", num_starts, 0),
            ("max_steps", max_steps, 0),
            ("random_per_round", random_per_round, 0),
        ):
            if value < least:
                raise CoaloraError(f"{name} must be >= {least}, got {value}")
        if rescore is not None and refresh_archive is not None:
            raise CoaloraError("give rescore or refresh_archive (its older name), not both")
        if rescore is None:
            rescore = "relevant" if refresh_archive is None else ("all" if refresh_archive else "new")
        if rescore not in RESCORE_POLICIES:
            raise CoaloraError(f"unknown rescore '{rescore}'; use one of: {', '.join(RESCORE_POLICIES)}")
        grid = budget_grid()
        low, high = (grid[0], grid[-1]) if bits_range is None else bits_range
        self.bits_range = (float(low), float(high))
        if not self.bits_range[1] > self.bits_range[0]:
            raise CoaloraError(f"bits_range must rise, got {list(self.bits_range)}")
        self.mode = mode
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.score_batches = score_batches
        self.score_batch_size = score_batch_size
        self.num_segments = num_segments
        self.rescore = rescore
        self.random_per_round = random_per_round
        self.seed = seed
        self.archive_file = archive_file
        self.final_round = final_round
        self.settings = SearchSettings(
            num_starts=num_starts,
            max_steps=max_steps,
            candidate_method=candidate_method,
            mc_samples=mc_samples,
            gp_maxiter=gp_maxiter,
            max_fit_points=max_fit_points,
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.archive = Archive()
        self.candidates = torch.empty(0, 0, 5, dtype=torch.long)
        self.train_set = torch.empty(0, 0, 5, dtype=torch.long)
        self.last_round = -1  # epoch whose round finished last
        self.last_round_step = -1  # global step whose round finished last (every_n_train_steps)
        self._warned = False
        #: archive rows scored in the last round (the others' f1, if any, is an older score, shifted)
        self._scored_rows: set[int] = set()

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_round(trainer, _task(pl_module), trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Catch up on a round a checkpoint was written before (e.g. one saved at validation end)."""
        if trainer.current_epoch > 0:
            self._maybe_round(trainer, _task(pl_module), trainer.current_epoch - 1)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Tensor | Mapping[str, Any] | None,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """With ``every_n_train_steps``: a round after every n optimizer steps (a short run gets several)."""
        n, step = self.every_n_train_steps, trainer.global_step
        if n is None or step == 0 or step % n or step <= self.last_round_step:
            return
        if not self.final_round and _no_training_follows(trainer):
            return
        if self._run_round(trainer, _task(pl_module), trainer.current_epoch):
            self.last_round_step = step

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "archive": self.archive.state_dict(),
            "candidates": self.candidates.to(torch.int8),
            "train_set": self.train_set.to(torch.int8),
            "generator": self.generator.get_state(),
            "last_round": self.last_round,
            "last_round_step": self.last_round_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise CoaloraError(
                f"checkpoint holds search state version {state_dict.get('version')}, expected {STATE_VERSION}"
            )
        self.archive = Archive.from_state(state_dict["archive"])
        self.candidates = state_dict["candidates"].long()
        self.train_set = state_dict["train_set"].long()
        self.generator.set_state(state_dict["generator"])
        self.last_round = int(state_dict["last_round"])
        self.last_round_step = int(state_dict.get("last_round_step", -1))

    # -- one round ---------------------------------------------------------------------------------------
    def _maybe_round(self, trainer: L.Trainer, pl_module: CoALoRATask, epoch: int) -> None:
        if self.every_n_train_steps is not None:  # rounds follow steps instead
            return
        if (epoch + 1) % self.every_n_epochs or epoch <= self.last_round:
            return
        if not self.final_round and _last_epoch(trainer, epoch):  # no training follows (a resume with
            return  # more epochs catches up at its first epoch's start)
        if self._run_round(trainer, pl_module, epoch):
            self.last_round = epoch

    def _run_round(self, trainer: L.Trainer, pl_module: CoALoRATask, epoch: int) -> bool:
        """One round, if the module is a searchable (coalora) task; True when it ran."""
        if not (isinstance(pl_module, CoALoRATask) and pl_module.method.searchable):
            if not self._warned:
                rank_zero_warn("ParetoConfigSearch only acts on method 'coalora'; it does nothing here")
                self._warned = True
            return False
        # The GP fit and acquisition optimisation draw from torch's global RNG; fork it so that training
        # (dropout, anything seeded globally) sees the same random stream with and without the search, and
        # the search/frozen/random ablations differ only in the configuration set.
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self._round(trainer, pl_module, epoch)
        return True

    def _round(self, trainer: L.Trainer, module: CoALoRATask, epoch: int) -> None:
        started = time.perf_counter()
        space: ConfigSpace = module.model.space
        self._check_space(space)
        batches = self._search_batches(trainer, module)
        current = torch.stack([space.encode(c) for c in module.train_configs])
        current_rows = self.archive.add(current, space.avg_bits_encoded(current))
        due = rows_to_score(self.archive, current_rows, self.rescore)
        before = self.archive.f1[due].clone()
        self._score(trainer, module, due, batches, epoch)
        if self.rescore == "relevant":  # the same on every rank: scores are summed over ranks first
            module.log("search/stale_shift", carry_drift(self.archive, due, before), sync_dist=True)

        fresh = self._share(trainer, lambda: self._fresh(space, current_rows))
        known = len(self.archive)
        fresh_rows = self.archive.add(fresh, space.avg_bits_encoded(fresh))
        new_rows = torch.arange(known, len(self.archive))
        self._score(trainer, module, new_rows, batches, epoch)
        scored = len(due) + len(new_rows)
        self._scored_rows = set(due.tolist()) | set(new_rows.tolist())
        self.candidates = self.archive.encoded[new_rows]

        rows = self._share(trainer, lambda: self._next_set(current_rows, fresh_rows))
        self.train_set = self.archive.encoded[rows]
        module.set_training_configs([space.decode(e) for e in self.train_set])
        module.log("search/round_seconds", time.perf_counter() - started, sync_dist=True)
        self._report(trainer, module, space, rows, len(new_rows), epoch, scored)

    def _fresh(self, space: ConfigSpace, current_rows: Tensor) -> Tensor:
        """This round's new encodings (rank 0 only): GP candidates, random ones, or none."""
        if self.mode == "search":
            return propose(space, self.archive, self.generator, self.settings, keep=current_rows)
        if self.mode == "random":
            return random_encodings(space, self.random_per_round, self.generator, self.bits_range)
        return self.archive.encoded[:0]

    def _next_set(self, current_rows: Tensor, fresh_rows: Tensor) -> Tensor:
        """Archive rows of the next training set (rank 0 only)."""
        if self.mode == "frozen":
            return current_rows
        if self.mode == "random":
            return torch.tensor(list(dict.fromkeys(torch.cat([current_rows, fresh_rows]).tolist())))
        scored = self.archive.f1.isfinite().nonzero().squeeze(1)
        if len(scored) == 0:
            return current_rows
        return scored[segment_filter(self.archive.objectives(scored), self.num_segments, self.bits_range)]

    def _share(self, trainer: L.Trainer, compute):
        """Run ``compute`` on rank 0 and give its result (and the advanced RNG) to every rank."""
        result = compute() if trainer.is_global_zero else None
        if trainer.world_size > 1:
            result, generator = trainer.strategy.broadcast((result, self.generator.get_state()), src=0)
            self.generator.set_state(generator)
        return result

    # -- scoring -----------------------------------------------------------------------------------------
    def _search_batches(self, trainer: L.Trainer, module: CoALoRATask) -> list[dict]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "search_dataloader"):
            raise CoaloraError(
                "ParetoConfigSearch scores configurations on the search split: train with GLUEDataModule "
                "(search_size > 0) passed to the Trainer as the datamodule"
            )
        # the whole split is scored shortest sentences first (less padding, the same mean); a few batches
        # keep the split's fixed order, which is a random sample of it
        whole = self.score_batches is None
        loader = datamodule.search_dataloader(batch_size=self.score_batch_size, by_length=whole)
        return [
            {k: v.to(module.device) for k, v in b.items()}
            for b in itertools.islice(loader, self.score_batches)
        ]

    def _score(
        self, trainer: L.Trainer, module: CoALoRATask, rows: Tensor, batches: list[dict], epoch: int
    ) -> None:
        """f1 for the archive ``rows``: each rank scores a strided share, a sum gives everyone all scores."""
        if len(rows) == 0:
            return
        space = module.model.space
        values = torch.zeros(len(rows), dtype=torch.float64)
        with eval_mode(module), trainer.precision_plugin.val_step_context():
            for i in range(trainer.global_rank, len(rows), trainer.world_size):
                values[i] = mean_loss(module, space.decode(self.archive.encoded[rows[i]]), batches)
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values.to(module.device), reduce_op="sum").cpu().double()
        self.archive.f1[rows] = values
        self.archive.epoch[rows] = epoch

    # -- reporting ---------------------------------------------------------------------------------------
    def _report(
        self,
        trainer: L.Trainer,
        module: CoALoRATask,
        space: ConfigSpace,
        rows: Tensor,
        new: int,
        epoch: int,
        scored_now: int,
    ) -> None:
        scored = self.archive.f1.isfinite()
        y = self.archive.objectives()[scored]
        ref = reference_point(y) if len(y) else None
        volume = hypervolume(y, ref) if ref is not None else 0.0
        front = pareto_mask(y) if len(y) else torch.zeros(0, dtype=torch.bool)
        module.log_dict(
            {
                "search/archive_size": float(len(self.archive)),
                "search/front_size": float(front.sum()),
                "search/hypervolume": volume,
                "search/new_configs": float(new),
                "search/scored_configs": float(scored_now),
                "search/train_configs": float(len(rows)),
            },
            sync_dist=True,  # equal on every rank; syncing keeps Lightning's DDP logging consistent
        )
        folder = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: call it on every rank
        if trainer.is_global_zero:
            on_front = torch.zeros(len(self.archive), dtype=torch.bool)
            on_front[scored.nonzero().squeeze(1)[front]] = True
            header = {
                "epoch": epoch,
                "mode": self.mode,
                "reference_point": None if ref is None else ref.tolist(),
                "hypervolume": volume,
            }
            data = self.archive.to_json(space, set(rows.tolist()), on_front, self._scored_rows, header)
            write_text_atomic(Path(folder) / self.archive_file, json.dumps(data) + "\n")  # atomic

    def _check_space(self, space: ConfigSpace) -> None:
        if len(self.archive) and self.archive.encoded.shape[1] != len(space):
            raise CoaloraError(
                f"the search state holds configurations of {self.archive.encoded.shape[1]} matrices, the "
                f"model has {len(space)}; resume with the backbone the checkpoint was trained on"
            )


def _last_epoch(trainer: L.Trainer, epoch: int) -> bool:
    """True when ``epoch`` is the run's last training epoch (by max_epochs, or max_steps already reached)."""
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs:
        return True
    return 0 < trainer.max_steps <= trainer.global_step


def _no_training_follows(trainer: L.Trainer) -> bool:
    """True at the run's last optimizer step (max_steps reached, or the last batch of the last epoch)."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    return bool(trainer.is_last_batch) and _last_epoch(trainer, trainer.current_epoch)


def _task(module: L.LightningModule) -> CoALoRATask:
    """The coalora task the callback searches for; another LightningModule is refused in one line."""
    if not isinstance(module, CoALoRATask):
        raise CoaloraError(
            f"ParetoConfigSearch searches a coalora task's configurations, got a {type(module).__name__}; "
            "use it with coalora's tasks (coalora fit --config ...)"
        )
    return module
