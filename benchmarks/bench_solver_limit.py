"""Allocation time per budget with and without HiGHS's time limit, and whether the configurations agree.

    python benchmarks/bench_solver_limit.py    # MiniLM's plain error table -> docs/bench/solver_limit.json

Why evaluation budgets are solved without a limit (issue #11): a budget whose solve takes close to the limit
on a quiet machine can stop early, with another configuration, on a loaded one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result

from coalora.pretrained import DEFAULT_MODEL
from coalora.quant.allocate import allocate, model_error_table
from coalora.quant.knapsack import MIP_TIME_LIMIT_S

BUDGETS = (2.1, 2.3, 2.5, 2.7, 3.0, 3.5, 4.0)


def main() -> None:
    space, table = model_error_table(DEFAULT_MODEL)
    rows = []
    for budget in BUDGETS:
        timed = {}
        for name, limit in (("limited", MIP_TIME_LIMIT_S), ("unlimited", None)):
            start = time.perf_counter()
            config = allocate(space, table, budget, time_limit_s=limit)
            timed[name] = (round(time.perf_counter() - start, 3), config)
        rows.append(
            {
                "budget": budget,
                "seconds_limited": timed["limited"][0],
                "seconds_unlimited": timed["unlimited"][0],
                "same_configuration": timed["limited"][1] == timed["unlimited"][1],
            }
        )
    write_result("solver_limit", {"time_limit_s": MIP_TIME_LIMIT_S, "rows": rows})


if __name__ == "__main__":
    main()
