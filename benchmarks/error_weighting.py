"""What weighting the error table does to the allocation (issue 24, item 6): none vs fisher vs activation.

On MiniLM (the packaged all-MiniLM-L6-v2) with the SST-2 data arguments of ``configs/sst2_minilm.yaml``,
every table is built the way ``fit`` builds it (``error_weighting``): the Fisher from the first 256 and
the activation statistics (H = E[x xᵀ] of each matrix's input, adapter off) from the first 128 training
examples of the calibration permutation, never the search split. For each budget it reports how many of
the 36 matrices change option (and bit width) against ``none`` and between fisher and activation, the
bits per module type, and every allocation's error measured by every table (does allocating with a
weighting lower the error that weighting measures, and what does it cost in the others). Each statistic
and table is timed uncached (a fresh cache folder). No training: ``--configs-dir`` writes every allocation
as a qconfig file (``<weighting>_<budget>bits.json``), which ``weighting_accuracy.py`` evaluates.

    python benchmarks/error_weighting.py [--threads 1] [--configs-dir docs/bench/weighting_configs]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

BUDGETS = (2.1, 2.3, 2.5, 2.7, 3.0)
WEIGHTINGS = ("none", "fisher", "activation")
#: the data arguments of configs/sst2_minilm.yaml (the search split is held out of calibration)
DATA = dict(task="sst2", train_file="sst2/sentence/stsa.binary.train", max_length=64, search_size=256)
SEED = 42


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, round(time.perf_counter() - start, 2)


def build_tables(task: Any, data: Any) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Each weighting's table, built as the task builds it, with the seconds of its statistics and table."""
    from coalora.quant.error_table import cached_error_table
    from coalora.quant.targets import target_weights

    weights = target_weights(task.model.backbone, task.model.space.targets)
    family = task.hparams.code_family
    tables, seconds = {}, {}
    tables["none"], table_s = timed(lambda: cached_error_table(weights, family=family))
    seconds["none"] = {"statistics_s": 0.0, "table_s": table_s}
    fisher, stats_s = timed(lambda: task.fisher_statistics(data, weights))
    tables["fisher"], table_s = timed(lambda: cached_error_table(weights, family=family, fisher=fisher))
    seconds["fisher"] = {"statistics_s": stats_s, "table_s": table_s}
    hessians, stats_s = timed(lambda: task.input_statistics(data, adapter=False))
    tables["activation"], table_s = timed(
        lambda: cached_error_table(weights, family=family, hessians=hessians)
    )
    seconds["activation"] = {"statistics_s": stats_s, "table_s": table_s}
    return tables, seconds


def changed(space: Any, first: Any, second: Any, bits_only: bool = False) -> int:
    """How many matrices two configurations quantize differently (or at different bit widths)."""
    if bits_only:
        return sum(first.matrices[n].bits != second.matrices[n].bits for n in space.names)
    return sum(first.matrices[n] != second.matrices[n] for n in space.names)


def compare(space: Any, tables: dict[str, torch.Tensor], configs_dir: Path | None = None) -> dict[str, dict]:
    """Per budget: the allocations under each weighting, how they differ and what each table says of them
    (each allocation also written to ``configs_dir`` as a qconfig file when one is given)."""
    from coalora.quant.allocate import allocate, total_error

    types = list(dict.fromkeys(t.module_type for t in space.targets))
    result = {}
    for budget in BUDGETS:
        configs = {w: allocate(space, tables[w], budget) for w in WEIGHTINGS}
        if configs_dir is not None:
            configs_dir.mkdir(parents=True, exist_ok=True)
            for weighting, config in configs.items():
                space.save(config, configs_dir / f"{weighting}_{budget:g}bits.json")

        pairs = (("fisher", "none"), ("activation", "none"), ("fisher", "activation"))
        result[f"{budget:g}"] = {
            "avg_bits": {w: round(space.avg_bits(c), 4) for w, c in configs.items()},
            "options_changed": {f"{a}_vs_{b}": changed(space, configs[a], configs[b]) for a, b in pairs},
            "bit_widths_changed": {
                f"{a}_vs_{b}": changed(space, configs[a], configs[b], bits_only=True) for a, b in pairs
            },
            "bit_histogram": {
                w: {f"{b}b": n for b, n in sorted(Counter(o.bits for o in c.matrices.values()).items())}
                for w, c in configs.items()
            },
            "mean_bits_per_module_type": {
                w: {
                    kind: round(
                        sum(c.matrices[t.name].bits for t in space.targets if t.module_type == kind)
                        / sum(t.module_type == kind for t in space.targets),
                        2,
                    )
                    for kind in types
                }
                for w, c in configs.items()
            },
            # rows: the weighting allocated with; columns: the table the error is measured by, relative
            # to the allocation made with that table (1.0 on the diagonal; > 1: worse by that measure)
            "error_ratio_vs_own_allocation": {
                w: {
                    m: round(total_error(space, tables[m], c) / total_error(space, tables[m], configs[m]), 4)
                    for m in WEIGHTINGS
                }
                for w, c in configs.items()
            },
            "weighted_errors": {
                w: {m: total_error(space, tables[m], c) for m in WEIGHTINGS} for w, c in configs.items()
            },
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpus = os.cpu_count() or 1
    loaded = os.getloadavg()[0] > cpus / 2
    parser.add_argument(
        "--threads", type=int, default=1 if loaded else cpus, help="torch threads (default 1 when loaded)"
    )
    parser.add_argument(
        "--glue-dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--configs-dir", type=Path, default=None, help="write each allocation as a qconfig")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["COALORA_CACHE"] = tempfile.mkdtemp(prefix="coalora-weighting-")  # every table uncached

    from common import write_result

    from coalora.data.glue_datamodule import GLUEDataModule
    from coalora.pretrained import DEFAULT_MODEL
    from coalora.quant.error_weighting import FISHER_EXAMPLES
    from coalora.tasks.classification import ClassificationTask
    from coalora.utils import quiet_transformers

    with quiet_transformers():
        task = ClassificationTask(
            model_name=DEFAULT_MODEL, task="sst2", train_budgets=[], eval_budgets=[], seed=SEED
        )
    data = GLUEDataModule(model_name=DEFAULT_MODEL, glue_dir=args.glue_dir, seed=SEED, **DATA)
    data.setup("fit")
    tables, seconds = build_tables(task, data)
    write_result(
        "error_weighting",
        {
            "model": DEFAULT_MODEL,
            "data": {**DATA, "seed": SEED, "training_rows": len(data.train_set)},
            "examples": {"fisher": FISHER_EXAMPLES, "activation": task.hparams.calibration_examples},
            "machine": {"cpus": cpus, "threads": args.threads, "load_avg": os.getloadavg()},
            "notes": "the MiniLM checkpoint has no MLM head: its Fisher uses a freshly initialised one",
            "seconds": seconds,
            "budgets": compare(task.model.space, tables, args.configs_dir),
        },
    )


if __name__ == "__main__":
    main()
