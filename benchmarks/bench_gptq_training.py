"""What training under ``rounding: gptq`` costs against ``nearest`` on the same steps (issue #24, item 4).

Side by side in one process, fp32, one torch thread by default (see bench_training_cost.py for why), for
QLoRA at one budget (its one configuration) and CoA-LoRA on its training grid (K = 2):

- one-time costs, cold (an empty COALORA_CACHE): the calibration pass over 128 training sentences (gptq
  only) and the first quantization of every training configuration (the weight cache rounds each
  (matrix, option) once, by RTN or by GPTQ);
- step times: a ``nearest`` and a ``gptq`` step alternated on one SST-2 batch (32 x 64 tokens); the
  cache holds dense weights either way, so a step costs the same whichever rounding chose the codes.

The totals put a run of the low-bit regime's 100 steps (one-time costs + 100 x median step) under each
rounding; the bar is gptq ≤ 1.2 x nearest. Search rounds and evaluation are left out (they quantize the
same cached entries); the fp32 runs of ``rounding_regime.py`` record whole-run wall times beside this.

    python benchmarks/bench_gptq_training.py [--steps 6] [--threads 1] [--only qlora@2.5]  # keeps other rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_step import step_configs, train_step
from bench_training_cost import build, cold_switches, lowbit_steps, progress, timed
from common import sst2_batch, write_result

from coalora.data.glue_datamodule import GLUEDataModule
from coalora.pretrained import DEFAULT_MODEL, load_tokenizer

ROUNDINGS = ("nearest", "gptq")
#: method -> (its task arguments, configurations per step)
METHODS = {"qlora@2.5": ({"method": "qlora", "train_budget": 2.5}, 1), "coalora": ({"method": "coalora"}, 2)}


def datamodule() -> GLUEDataModule:
    """The low-bit regime's SST-2 data (its 3,200 training sentences are where calibration reads)."""
    data = GLUEDataModule(
        task="sst2",
        model_name=DEFAULT_MODEL,
        glue_dir=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data")),
        train_file="sst2/sentence/stsa.binary.train",
        max_length=64,
        batch_size=32,
        search_size=256,
        train_limit=3200,
    )
    data.setup("fit")
    return data


def one_time(method: str, rounding: str, data: GLUEDataModule) -> tuple[object, dict]:
    """Build the task, calibrate (gptq) and quantize every training configuration, each timed cold."""
    arguments, _ = METHODS[method]
    module = build(**arguments, rounding=rounding)
    costs = {"calibration_s": 0.0}
    if rounding == "gptq":
        costs["calibration_s"], _ = timed(lambda: module.serve_with("gptq", data))
    switches = cold_switches(module)
    costs["first_quantization_s"] = sum(switches)
    costs["configurations"] = len(switches)
    return module, {k: round(v, 3) if isinstance(v, float) else v for k, v in costs.items()}


def step_pair_times(modules: dict, k: int, batch: dict, steps: int) -> dict[str, list[float]]:
    """``nearest`` and ``gptq`` steps alternated (step 0 an untimed warm-up); seconds per step."""
    optimizers = {r: torch.optim.AdamW(m.model.trainable_parameters(), lr=1e-4) for r, m in modules.items()}
    generator = {r: torch.Generator().manual_seed(0) for r in modules}  # the same draws under each
    times: dict[str, list[float]] = {r: [] for r in modules}
    for step in range(steps + 1):
        for rounding, module in modules.items():
            configs = step_configs(module, k, generator[rounding])
            seconds = train_step(module, optimizers[rounding], batch, configs)
            if step:
                times[rounding].append(seconds)
    return times


def measure(method: str, batch: dict, data: GLUEDataModule, steps: int) -> dict:
    modules, costs = {}, {}
    for rounding in ROUNDINGS:
        with tempfile.TemporaryDirectory() as cache:  # cold: nothing calibrated or allocated before
            os.environ["COALORA_CACHE"] = cache
            progress(f"{method}: one-time costs under {rounding}")
            modules[rounding], costs[rounding] = one_time(method, rounding, data)
    progress(f"{method}: {steps} step pairs")
    times = step_pair_times(modules, METHODS[method][1], batch, steps)
    run_steps = lowbit_steps()
    median = {r: statistics.median(v) for r, v in times.items()}
    totals = {
        r: costs[r]["calibration_s"] + costs[r]["first_quantization_s"] + run_steps * median[r]
        for r in ROUNDINGS
    }
    ratios = [g / n for n, g in zip(times["nearest"], times["gptq"], strict=True)]
    return {
        "one_time": costs,
        "step_median_s": {r: round(v, 4) for r, v in median.items()},
        "step_gptq_over_nearest": round(statistics.median(ratios), 3),
        "run_steps": run_steps,
        "run_total_s": {r: round(v, 1) for r, v in totals.items()},
        "run_gptq_over_nearest": round(totals["gptq"] / totals["nearest"], 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = sst2_batch(load_tokenizer(DEFAULT_MODEL), 32, 64)
    data = datamodule()
    command = "python benchmarks/bench_gptq_training.py " + " ".join(argv or sys.argv[1:])
    methods = {}
    for method in args.only:
        methods[method] = measure(method, batch, data, args.steps)
        machine = {"cpus": os.cpu_count(), "threads": args.threads, "load_avg": os.getloadavg()}
        methods[method].update(command=command, machine=machine)
    out = REPO / "docs" / "bench" / "gptq_training.json"
    earlier = json.loads(out.read_text())["methods"] if out.is_file() else {}  # --only keeps the others
    write_result("gptq_training", {"precision": "fp32", "methods": {**earlier, **methods}})


if __name__ == "__main__":
    main()
