"""CoA-LoRA's training cost against QLoRA's runs, measured side by side in one process (issue #23).

docs/results.md once compared the wall times of training subprocesses run one after another on a shared
machine; those include process start, model loading, disk caches warmed by earlier runs and the load of
whatever else ran. Here everything is measured in one process, on one machine, at fp32:

- step time: QLoRA steps (K = 1, its one configuration) and CoA-LoRA steps (K = 2, one backward per
  configuration, as the task trains) alternated on one SST-2 batch of 32 x 64 tokens; the medians, and the
  median of the per-pair ratios (a pair's two steps ran seconds apart, so a load change hits both);
- one-time costs, each cold (an empty COALORA_CACHE folder): building the task (backbone load), the
  allocator's error table, QLoRA's allocation at each budget, CoA-LoRA's training-grid allocation, the
  first quantization of every training configuration (QLoRA: its one), and one search round with the
  low-bit regime's settings (``benchmarks/lowbit/search.yaml``) scoring the real 256-sentence search split;
- process start and imports, timed once in a subprocess: every run pays it.

Everything runs on one torch thread by default: beside other jobs, two OpenMP threads on busy cores make
a forward pass several times slower at random (``docs/bench/search.json``: scoring 9.4 s on 2 threads
against 1.5 s on 1), and that noise, not the methods, would set the ratios. One thread gives every item
its single-core cost; ``--threads 2`` measures what training uses on a quiet machine.

The totals then put CoA-LoRA (steps x step + its one-time costs) against R QLoRA runs (R x (steps x step +
per-run costs) + the error table once, since its disk cache serves the later runs), for the low-bit regime
(100 steps a run, 3 search rounds, 5 budgets; also 4 as in the paper's table) and the paper comparison
(2 epochs = 418 steps, 1 round, 4 budgets). Validation and evaluation are left out (every method evaluates).

    python benchmarks/bench_training_cost.py [--steps 12] [--threads 1] [--skip-round]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_step import step_configs, train_step
from common import sst2_batch, step_settings, write_result
from lowbit_regime import BUDGETS as LOWBIT_BUDGETS
from lowbit_regime import HERE as LOWBIT_CONFIGS
from lowbit_regime import SETTINGS as LOWBIT_SETTINGS

from coalora.pretrained import DEFAULT_MODEL, load_tokenizer
from coalora.tasks.classification import ClassificationTask

PAPER_BUDGETS = (2.5, 3.0, 3.5, 4.0)
PAPER_STEPS = 2 * -(-(6920 - 256) // 32)  # 2 epochs of the SST-2 set less the search split, batch 32
PAPER_ROUNDS = 1  # a round after each epoch but the last
BATCH = 32


def lowbit_steps() -> int:
    """Optimizer steps of one low-bit run: one epoch of ``train_limit`` sentences in batches of 32."""
    return LOWBIT_SETTINGS["epochs"] * -(-LOWBIT_SETTINGS["train_limit"] // BATCH)


def lowbit_rounds() -> int:
    """Search rounds in one low-bit run: every n steps, none after the last (no training follows)."""
    every = search_settings()["every_n_train_steps"]
    return (lowbit_steps() - 1) // every


def search_settings() -> dict:
    """The low-bit regime's ParetoConfigSearch arguments, read from its YAML so the two cannot drift."""
    import yaml

    config = yaml.safe_load((LOWBIT_CONFIGS / "search.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ParetoConfigSearch"):
            return dict(callback["init_args"])
    raise SystemExit("benchmarks/lowbit/search.yaml has no ParetoConfigSearch callback")


def timed(job: Callable[[], object]) -> tuple[float, object]:
    """Wall seconds of ``job()`` and what it returned."""
    start = time.perf_counter()
    value = job()
    return time.perf_counter() - start, value


def progress(message: str) -> None:
    """One line on stderr: the run takes minutes on a loaded machine."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(method: str, **extra: object) -> ClassificationTask:
    """A task as configs/sst2_minilm.yaml trains it (rank 16, alpha 32, no dropout), in train mode."""
    module = ClassificationTask(method=method, rank=16, alpha=32.0, lora_dropout=0.0, **extra)
    return module.train()


def process_start_s() -> float:
    """A fresh interpreter importing what ``coalora fit`` imports before it builds anything."""
    command = [sys.executable, "-c", "import lightning, coalora.cli, coalora.tasks.classification"]
    seconds, _ = timed(lambda: subprocess.run(command, check=True, cwd=REPO))
    return seconds


def cold_switches(module: ClassificationTask) -> list[float]:
    """Seconds of each training configuration's first use (quantizing the matrix options it adds)."""
    times = []
    for config in module.train_configs:
        seconds, _ = timed(lambda c=config: module.model.set_config(c))
        times.append(seconds)
    return times


def step_times(qlora: ClassificationTask, coalora: ClassificationTask, batch: dict, steps: int) -> dict:
    """QLoRA (K = 1) and CoA-LoRA (K = 2) steps alternated; medians and the median per-pair ratio."""
    optimizers = {
        name: torch.optim.AdamW(m.model.trainable_parameters(), lr=1e-4)
        for name, m in (("qlora", qlora), ("coalora", coalora))
    }
    runs = {"qlora_k1": (qlora, 1, "qlora"), "coalora_k2": (coalora, 2, "coalora")}
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(steps + 1):  # step 0 is an untimed warm-up (optimizer state, allocator pools)
        for name, (module, k, opt) in runs.items():
            seconds = train_step(module, optimizers[opt], batch, step_configs(module, k, generator))
            if step:
                times[name].append(seconds)
    ratios = [c / q for q, c in zip(times["qlora_k1"], times["coalora_k2"], strict=True)]
    return {
        "median_s": {name: round(statistics.median(v), 4) for name, v in times.items()},
        "all_s": {name: [round(t, 3) for t in v] for name, v in times.items()},
        "coalora_k2_over_qlora_k1": round(statistics.median(ratios), 3),
        "coalora_k2_over_qlora_k1_range": [round(min(ratios), 3), round(max(ratios), 3)],
    }


@contextlib.contextmanager
def timing_scores(search: object) -> Iterator[dict]:
    """Wrap the search's scoring so the round splits into scoring and proposing (GP, candidates)."""
    spent = {"score_s": 0.0, "scored": 0}
    score = search._score  # type: ignore[attr-defined]

    def wrapped(trainer, module, rows, batches, epoch) -> None:
        start = time.perf_counter()
        score(trainer, module, rows, batches, epoch)
        spent["score_s"] += time.perf_counter() - start
        spent["scored"] += len(rows)

    search._score = wrapped  # type: ignore[attr-defined]
    try:
        yield spent
    finally:
        del search._score  # type: ignore[attr-defined]


def search_round(module: ClassificationTask, folder: Path) -> dict:
    """One round of the low-bit regime's search on the real search split, outside a Trainer: a stand-in
    gives the round what it reads from one (rank 0 of 1, fp32, the data module, a folder for the archive)."""
    from callbacks.pareto_search import ParetoConfigSearch
    from coalora.data.glue_datamodule import GLUEDataModule

    glue_dir = os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data"))
    data = GLUEDataModule(
        task="sst2",
        model_name=DEFAULT_MODEL,
        glue_dir=glue_dir,
        train_file="sst2/sentence/stsa.binary.train",
        max_length=64,
        batch_size=BATCH,
        search_size=LOWBIT_SETTINGS["search_size"],
        train_limit=LOWBIT_SETTINGS["train_limit"],
    )
    settings = search_settings()
    search = ParetoConfigSearch(**settings)
    host = SimpleNamespace(
        datamodule=data,
        global_rank=0,
        world_size=1,
        is_global_zero=True,
        log_dir=str(folder),
        default_root_dir=str(folder),
        precision_plugin=SimpleNamespace(val_step_context=contextlib.nullcontext),
    )
    before = len(module.train_configs)
    with timing_scores(search) as spent, torch.random.fork_rng():
        seconds, _ = timed(lambda: search._round(host, module, 0))  # type: ignore[arg-type]
    new = len(search.archive) - before
    per_config = spent["score_s"] / max(spent["scored"], 1)
    return {
        "settings": settings,
        "round_s": round(seconds, 2),
        "score_s": round(spent["score_s"], 2),
        "propose_and_rest_s": round(seconds - spent["score_s"], 2),
        "configs_scored": spent["scored"],
        "score_s_per_config": round(per_config, 3),
        "new_configs": new,
        "train_set_after": len(module.train_configs),
    }


def rounds_cost(round_: dict, rounds: int, mode: str) -> float:
    """Seconds of ``rounds`` rounds, from the measured first one. Every round rescores the whole archive
    (refresh_archive). ``search``: the archive grows by the first round's new configurations each round,
    which are scored too, and the GP proposes; ``frozen``: the same archive each round, scored only (a
    frozen run scores it as well, so that fronts compare across modes)."""
    archive, new = round_["configs_scored"] - round_["new_configs"], round_["new_configs"]
    if mode == "frozen":
        return rounds * archive * round_["score_s_per_config"]
    scored = sum(archive + (r + 1) * new for r in range(rounds))
    return scored * round_["score_s_per_config"] + rounds * round_["propose_and_rest_s"]


def totals(measured: dict, steps: int, rounds: int, budgets: tuple[float, ...]) -> dict:
    """CoA-LoRA (search; frozen) against len(budgets) QLoRA runs of ``steps`` steps each, in minutes."""
    one = measured["one_time_s"]
    step = measured["steps"]["median_s"]
    start = measured["process_start_s"] + one["build_s"]  # every run
    table = one["error_table_s"]  # once: the disk cache serves later runs
    qlora_steps = len(budgets) * steps * step["qlora_k1"]
    qlora = table + qlora_steps
    for budget in budgets:
        qlora += start + one["qlora_allocation_s"][str(budget)] + one["qlora_first_quantize_s"]
    coalora_fixed = start + table + one["grid_allocation_s"] + one["coalora_first_quantize_s"]
    coalora_steps = steps * step["coalora_k2"]
    out: dict = {
        "steps_per_run": steps,
        "search_rounds": rounds,
        "qlora_runs": len(budgets),
        "qlora_min": round(qlora / 60, 2),
        "qlora_steps_only_min": round(qlora_steps / 60, 2),
        "coalora_steps_only_min": round(coalora_steps / 60, 2),
        "steps_only_ratio": round(coalora_steps / qlora_steps, 3),
        "coalora_one_time_without_rounds_min": round(coalora_fixed / 60, 2),
    }
    if "search_round" in measured:
        for mode in ("search", "frozen"):
            spent = rounds_cost(measured["search_round"], rounds, mode)
            total = coalora_fixed + coalora_steps + spent
            out[f"coalora_{mode}_rounds_min"] = round(spent / 60, 2)
            out[f"coalora_{mode}_min"] = round(total / 60, 2)
            out[f"coalora_{mode}_over_qlora"] = round(total / qlora, 3)
    return out


def measure(args: argparse.Namespace) -> dict:
    """Every measurement, in one process with a fresh (empty) allocator cache."""
    load = [os.getloadavg()]
    one: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["COALORA_CACHE"] = cache  # cold error table and allocations
        one["build_s"], coalora = timed(lambda: build("coalora", eval_budgets=list(LOWBIT_BUDGETS)))
        one["error_table_s"], _ = timed(coalora.error_table)
        progress(f"built in {one['build_s']:.1f} s; error table {one['error_table_s']:.1f} s")
        one["qlora_allocation_s"] = {}
        for budget in dict.fromkeys((*LOWBIT_BUDGETS, *PAPER_BUDGETS)):  # as a QLoRA run allocates its one
            one["qlora_allocation_s"][str(budget)], _ = timed(lambda b=budget: coalora.configs.allocate(b))
        one["grid_allocation_s"], train = timed(lambda: coalora.train_configs)
        one["train_configs"] = len(train)  # type: ignore[arg-type]
        progress(f"allocations done; training grid {one['grid_allocation_s']:.1f} s")
        qlora = build("qlora", train_budget=3.0)  # its allocation is cached now: only the build
        switches = cold_switches(coalora)
        one["coalora_first_quantize_s"] = sum(switches)
        one["qlora_first_quantize_s"], _ = timed(lambda: qlora.model.set_config(qlora.train_configs[0]))
        one["first_quantize_s_per_config"] = {
            "median": round(statistics.median(switches), 3),
            "max": round(max(switches), 3),
        }
        load.append(os.getloadavg())
        batch = sst2_batch(load_tokenizer(DEFAULT_MODEL), BATCH, 64)
        progress("first quantizations done; timing steps")
        steps = step_times(qlora, coalora, batch, args.steps)
        progress(f"steps: {steps['median_s']}, ratio {steps['coalora_k2_over_qlora_k1']}")
        load.append(os.getloadavg())
        measured: dict = {"one_time_s": one, "steps": steps}
        if not args.skip_round:
            with tempfile.TemporaryDirectory() as folder:
                measured["search_round"] = search_round(coalora, Path(folder))
            load.append(os.getloadavg())
    measured["process_start_s"] = round(process_start_s(), 2)
    for key, value in one.items():
        if isinstance(value, float):
            one[key] = round(value, 3)
    one["qlora_allocation_s"] = {k: round(v, 3) for k, v in one["qlora_allocation_s"].items()}
    measured["load_avg_during"] = [[round(x, 2) for x in triple] for triple in load]
    return measured


def git_state() -> dict:
    """HEAD and the files under coalora/ changed in the working tree (what the numbers ran on)."""

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {
        "head": git("rev-parse", "HEAD"),
        "modified": git("status", "--porcelain", "coalora").splitlines(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the module doc)")
    parser.add_argument("--skip-round", action="store_true", help="do not time a search round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    measured = measure(args)
    settings = step_settings(
        SimpleNamespace(batch_size=BATCH, length=64, precision="32", rank=16, steps=args.steps)
    )
    result = {
        **settings,
        "git": git_state(),
        **measured,
        "lowbit": {
            f"qlora_{len(budgets)}_runs": totals(measured, lowbit_steps(), lowbit_rounds(), budgets)
            for budgets in (LOWBIT_BUDGETS, PAPER_BUDGETS)
        },
        "paper_comparison": totals(measured, PAPER_STEPS, PAPER_ROUNDS, PAPER_BUDGETS),
        "wall_s": round(time.perf_counter() - started, 1),
        "command": "python benchmarks/bench_training_cost.py " + " ".join(sys.argv[1:]),
    }
    write_result("training_cost", result)


if __name__ == "__main__":
    main()
