"""Cost of the allocator: the full MiniLM error table, MiniLM allocations, RoBERTa-Large-sized allocations.

Targets (SPEC §2.5 brief): table (36 x 432) <= 60 s, MiniLM allocation <= 2 s, 144 x 432 allocation <= 10 s.
The table is timed uncached; a fake_quantize-based reference on a few options, extrapolated to 432,
shows what the shared-scale path saves. The synthetic instance has RoBERTa-Large's matrix sizes and
errors that fall with bits, with noise, so that most options stay non-dominated.

    python benchmarks/bench_allocator.py
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result

from coalora.pretrained import DEFAULT_MODEL, load_classifier
from coalora.quant.allocate import EVAL_BUDGETS, allocate
from coalora.quant.error_table import error_table
from coalora.quant.options import OPTION_SPACE
from coalora.quant.qconfig import ConfigSpace
from coalora.quant.quantizer import fake_quantize
from coalora.quant.targets import TargetMatrix, discover_targets, target_weights
from coalora.utils import quiet_transformers

ROBERTA_LARGE_SHAPES = [
    ("attention.self.query", 1024, 1024),
    ("attention.self.key", 1024, 1024),
    ("attention.self.value", 1024, 1024),
    ("attention.output.dense", 1024, 1024),
    ("intermediate.dense", 4096, 1024),
    ("output.dense", 1024, 4096),
]


def roberta_large_space() -> ConfigSpace:
    targets = [
        TargetMatrix(f"roberta.encoder.layer.{block}.{kind}", kind, block, out_features, in_features)
        for block in range(24)
        for kind, out_features, in_features in ROBERTA_LARGE_SHAPES
    ]
    return ConfigSpace(targets, model="roberta-large-shaped")


def synthetic_errors(space: ConfigSpace, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = np.array([o.storage_bits for o in OPTION_SPACE])
    sizes = space.numel.numpy()[:, None] * rng.uniform(0.5, 2.0, size=(len(space), 1))
    return sizes * np.exp(-1.4 * bits)[None, :] * (1 + 0.3 * rng.random((len(space), len(OPTION_SPACE))))


def timed(fn: Callable, *args: object) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    with quiet_transformers():
        model = load_classifier(DEFAULT_MODEL, num_labels=2)
    targets = discover_targets(model)
    weights = target_weights(model, targets)
    space = ConfigSpace(targets, model=DEFAULT_MODEL)

    sample = OPTION_SPACE[::108]  # 4 options, one per bit width
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as error_table runs
    _, reference_s = timed(
        lambda: [float((fake_quantize(w, o) - w).square().sum()) for o in sample for w in weights.values()]
    )
    torch.set_num_threads(threads)
    table, table_s = timed(error_table, weights)
    minilm_s = {b: timed(allocate, space, table, b)[1] for b in EVAL_BUDGETS}

    large = roberta_large_space()
    errors = synthetic_errors(large)
    large_s = {b: timed(allocate, large, errors, b)[1] for b in EVAL_BUDGETS}

    result = {
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "minilm_error_table": {
            "shape": list(table.shape),
            "seconds": round(table_s, 2),
            "target_seconds": 60,
            "fake_quantize_reference_seconds_extrapolated": round(
                reference_s / len(sample) * len(OPTION_SPACE), 1
            ),
        },
        "minilm_allocation_seconds": {str(b): round(s, 3) for b, s in minilm_s.items()},
        "minilm_allocation_target_seconds": 2,
        "roberta_large_144x432_allocation_seconds": {str(b): round(s, 3) for b, s in large_s.items()},
        "roberta_large_target_seconds": 10,
    }
    write_result("allocator", result)


if __name__ == "__main__":
    main()
