"""Allocation time per budget of the clock-free solver, against HiGHS alone, and whether the choices agree.

    python benchmarks/bench_solver_limit.py    # MiniLM's plain error table -> docs/bench/solver_limit.json

Why no solve has a time limit (issue #11 for the evaluation budgets, #23 item 7 for the training grid): a
budget whose solve takes close to the limit on a quiet machine stops early, with another configuration, on
a loaded one. The exact dynamic program (``seconds``) and HiGHS to its relative gap (``seconds_highs``, the
path a model too large for the program takes) are both timed; neither depends on the machine's load.
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
from coalora.quant import knapsack
from coalora.quant.allocate import allocate, model_error_table, total_error

BUDGETS = (2.1, 2.3, 2.5, 2.7, 3.0, 3.5, 4.0)


def main() -> None:
    space, table = model_error_table(DEFAULT_MODEL)
    rows = []
    dp_max_work = knapsack.DP_MAX_WORK
    for budget in BUDGETS:
        timed = {}
        for name, work in (("exact", dp_max_work), ("highs", 0.0)):
            knapsack.DP_MAX_WORK = work  # 0: every problem goes to HiGHS
            start = time.perf_counter()
            config = allocate(space, table, budget)
            timed[name] = (round(time.perf_counter() - start, 3), config)
        knapsack.DP_MAX_WORK = dp_max_work
        exact, highs = (total_error(space, table, timed[n][1]) for n in ("exact", "highs"))
        rows.append(
            {
                "budget": budget,
                "seconds": timed["exact"][0],
                "seconds_highs": timed["highs"][0],
                "same_configuration": timed["exact"][1] == timed["highs"][1],
                "highs_excess_error": highs / exact - 1,
            }
        )
    write_result("solver_limit", {"solver": knapsack.SOLVER_ID, "rows": rows})


if __name__ == "__main__":
    main()
