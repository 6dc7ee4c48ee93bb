"""Cost of one configuration-search round (SPEC §5), and of scoring one configuration.

A round is timed without scoring: GP fit plus candidate generation from 5 starts, on synthetic archives
for a MiniLM-shaped space (36 matrices, d = 180) and a RoBERTa-Large-shaped one (144 matrices, d = 720),
at two archive sizes (50: the initial training set; 150: after ~20 rounds). f1 is a cheap proxy that
falls as options get finer, so the acquisition surface has the real problem's shape. Scoring is timed
with the packaged MiniLM on 4 batches of 32 of the real SST-2 search split: the first pass over new
configurations quantizes their weights, the second finds them cached; it runs on one thread and on torch's
default, since OpenMP threads that share busy cores slow it down many times over.

    python benchmarks/bench_search.py [--repeats 2] [--skip-scoring] [--with-botorch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result

from callbacks.pareto_search import eval_mode, mean_loss
from coalora.pretrained import DEFAULT_MODEL
from coalora.quant.qconfig import ConfigSpace
from coalora.quant.targets import TargetMatrix
from coalora.search import (
    candidates,
    surrogate,
)
from coalora.search.archive import Archive
from coalora.utils import (
    intra_op_threads,
    quiet_transformers,
)

SHAPES = {
    "minilm_l6": (6, 384, 1536),  # blocks, hidden, intermediate
    "roberta_large": (24, 1024, 4096),
}


def shaped_space(blocks: int, hidden: int, inner: int) -> ConfigSpace:
    kinds = [
        ("attention.self.query", hidden, hidden),
        ("attention.self.key", hidden, hidden),
        ("attention.self.value", hidden, hidden),
        ("attention.output.dense", hidden, hidden),
        ("intermediate.dense", inner, hidden),
        ("output.dense", hidden, inner),
    ]
    targets = [
        TargetMatrix(f"encoder.layer.{b}.{kind}", kind, b, out, inp)
        for b in range(blocks)
        for kind, out, inp in kinds
    ]
    return ConfigSpace(targets, model="synthetic")


def proxy_f1(space: ConfigSpace, encoded: torch.Tensor) -> torch.Tensor:
    """Log of a numel-weighted error proxy: finer fields lower it (a higher block index is coarser)."""
    weights = torch.tensor([-1.4, -0.3, -0.1, 0.2, 0.05], dtype=torch.float64)
    per_matrix = torch.exp((encoded.double() * weights).sum(-1))
    return torch.log((per_matrix * space.numel).sum(-1) / space.total_numel)


def time_round(space: ConfigSpace, archive_size: int, method: str, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    archive = Archive()
    encoded = candidates.random_encodings(space, archive_size, generator)
    archive.add(encoded, space.avg_bits_encoded(encoded))
    archive.f1 = proxy_f1(space, archive.encoded)
    settings = candidates.SearchSettings(candidate_method=method)
    with intra_op_threads(settings.threads):  # as propose() runs it
        start = time.perf_counter()
        surrogate.fit_gp(space.normalise(archive.encoded), archive.f1, settings.gp_maxiter)
        fit = time.perf_counter() - start
    start = time.perf_counter()
    found = candidates.propose(space, archive, generator, settings)
    total = time.perf_counter() - start
    return {"round_s": total, "gp_fit_s": fit, "candidates": len(found)}


def bench_rounds(repeats: int, with_botorch: bool) -> dict:
    results = {}
    for name, shape in SHAPES.items():
        space = shaped_space(*shape)
        for size in (50, 150):
            methods = ["coordinate"] + (["botorch"] if with_botorch and name == "minilm_l6" else [])
            for method in methods:
                runs = [time_round(space, size, method, seed) for seed in range(repeats)]
                results[f"{name}/archive{size}/{method}"] = {
                    "matrices": len(space),
                    "d": space.dim,
                    "round_s_median": round(statistics.median(r["round_s"] for r in runs), 3),
                    "round_s_max": round(max(r["round_s"] for r in runs), 3),
                    "gp_fit_s_median": round(statistics.median(r["gp_fit_s"] for r in runs), 3),
                    "candidates": [r["candidates"] for r in runs],
                }
                print(name, size, method, results[f"{name}/archive{size}/{method}"], file=sys.stderr)
    return results


def bench_scoring(configs: int = 6, batches: int = 4, batch_size: int = 32) -> dict:
    from coalora.data.glue_datamodule import GLUEDataModule
    from coalora.tasks.classification import ClassificationTask

    glue_dir = os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data"))
    with quiet_transformers():
        module = ClassificationTask(model_name=DEFAULT_MODEL, train_budgets=[3.0], eval_budgets=[3.0])
    data = GLUEDataModule(task="sst2", model_name=DEFAULT_MODEL, glue_dir=glue_dir)
    loader = data.search_dataloader(batch_size=batch_size)
    chosen = [b for _, b in zip(range(batches), loader, strict=False)]
    space = module.model.space
    generator = torch.Generator().manual_seed(0)
    sampled = [space.decode(e) for e in candidates.random_encodings(space, configs, generator)]
    timings: dict[str, list[float]] = {"cold": [], "warm": []}
    with eval_mode(module):
        for kind in ("cold", "warm"):
            for config in sampled:
                start = time.perf_counter()
                mean_loss(module, config, chosen)
                timings[kind].append(time.perf_counter() - start)
    return {
        "model": DEFAULT_MODEL,
        "batches": batches,
        "batch_size": batch_size,
        "configs": configs,
        "per_config_s_cold_median": round(statistics.median(timings["cold"]), 3),
        "per_config_s_warm_median": round(statistics.median(timings["warm"]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--with-botorch", action="store_true", help="also time candidate_method='botorch'")
    args = parser.parse_args()
    result = {
        "torch_threads": torch.get_num_threads(),
        "search_threads": candidates.SearchSettings().threads,
        "cpu_count": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "round_budget_s": {"minilm_l6": 10, "roberta_large": 60},
        "rounds": bench_rounds(args.repeats, args.with_botorch),
    }
    if not args.skip_scoring:  # one thread, and the default: on a shared machine they differ by ~5x
        default = torch.get_num_threads()
        result["scoring"] = {}
        for threads in dict.fromkeys((1, default)):
            with intra_op_threads(threads):
                result["scoring"][f"threads_{threads}"] = bench_scoring()
    write_result("search", result)


if __name__ == "__main__":
    main()
