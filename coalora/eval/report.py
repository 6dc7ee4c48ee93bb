"""Reports of a multi-configuration evaluation: per-run summary, the text table, JSON/CSV and the plot."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from coalora.data.glue import main_metric
from coalora.eval.hypervolume import hypervolume
from coalora.eval.results import EvalResult
from coalora.utils import atomic_path, write_text_atomic

#: which kinds of point each hypervolume covers; never mixed, so two runs' values are over the same
#: configurations (budgets are allocated identically for every method; random ones come from one seed)
HYPERVOLUME_KINDS: dict[str, tuple[str, ...]] = {
    "hypervolume": ("budget", "own"),
    "hypervolume_random": ("random",),
}


#: the evaluation name of causal-LM runs: their metric is perplexity, lower is better
LANGUAGE_MODELLING = "lm"


def reported_metric(task: str) -> str:
    """The metric runs are compared by: the GLUE task's main metric, or ``ppl`` for language modelling."""
    return "ppl" if task == LANGUAGE_MODELLING else main_metric(task)


def hypervolume_score(task: str, value: float) -> float:
    """The maximised quantity a hypervolume is over: the metric itself, or 1 / perplexity for LMs.

    1 / ppl is the geometric mean of the probabilities the model gives the true next tokens, in (0, 1]
    like accuracy, so the hypervolume's reference point (score 0, the most bits) serves both.
    """
    return 1.0 / value if task == LANGUAGE_MODELLING else value


def summarise(results: list[EvalResult], task: str) -> dict[str, dict]:
    """Per run: the mean main metric at the budget configurations and a hypervolume per kind of point.

    ``hypervolume`` is over the budget points only (a QLoRA run's own budget counts as one) and
    ``hypervolume_random`` over the random ones; seen and qconfig points, which differ per run, are in
    neither. For language modelling the hypervolume is over (1 / ppl, bits): see :func:`hypervolume_score`.
    """
    key = reported_metric(task)
    summary: dict[str, dict] = {}
    for run in dict.fromkeys(r.run for r in results):
        mine = [r for r in results if r.run == run]
        at_budgets = [r.metrics[key] for r in mine if r.kind in ("budget", "own", "fp")]
        summary[run] = {
            "method": mine[0].method,
            f"mean_{key}": round(sum(at_budgets) / len(at_budgets), 4) if at_budgets else None,
            "points": len(mine),
        }
        for name, kinds in HYPERVOLUME_KINDS.items():
            points = [
                (hypervolume_score(task, r.metrics[key]), r.avg_bits)
                for r in mine
                if r.kind in kinds and r.avg_bits is not None
            ]
            family = mine[0].code_family
            summary[run][name] = round(hypervolume(points, family), 4) if points else None
    return summary


def format_table(results: list[EvalResult], task: str) -> str:
    keys = list(results[0].metrics) if results else []
    header = ["run", "method", "config", "kind", "avg_bits", "seen", *keys]
    rows = [
        [
            r.run,
            r.method,
            r.label,
            r.kind,
            "-" if r.avg_bits is None else f"{r.avg_bits:.4f}",
            "yes" if r.seen else "no",
        ]
        + [f"{r.metrics[k]:.4f}" for k in keys]
        for r in results
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *rows]]
    return "\n".join(lines)


def write_outputs(results: list[EvalResult], task: str, out_dir: str | os.PathLike) -> dict[str, Path]:
    """eval.json, eval.csv and eval.png in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "csv": out / "eval.csv", "png": out / "eval.png"}
    payload = {"task": task, "summary": summarise(results, task), "results": [r.row() for r in results]}
    write_text_atomic(paths["json"], json.dumps(payload, indent=1) + "\n")
    rows = [r.row() for r in results]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(paths["csv"], text.getvalue())
    plot(results, task, paths["png"])
    return paths


def plot(results: list[EvalResult], task: str, path: Path) -> None:
    """Metric against avg bits, one colour per run; filled markers seen in training, hollow ones unseen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = reported_metric(task)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(dict.fromkeys(r.run for r in results)):
        colour = f"C{i % 10}"
        mine = [r for r in results if r.run == run]
        fp = [r for r in mine if r.avg_bits is None]
        for r in fp:
            ax.axhline(
                r.metrics[key], color=colour, linestyle="--", linewidth=1, label=f"{run} (full precision)"
            )
        for seen, marker in ((True, "o"), (False, "o")):
            pts = sorted(
                (r.avg_bits, r.metrics[key]) for r in mine if r.avg_bits is not None and r.seen == seen
            )
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.scatter(
                xs,
                ys,
                marker=marker,
                facecolors=colour if seen else "none",
                edgecolors=colour,
                label=f"{run} ({'seen in training' if seen else 'unseen'})",
            )
    ax.set_xlabel("average bits per weight")
    lower_better = task == LANGUAGE_MODELLING
    ax.set_ylabel(f"{key} (lower is better)" if lower_better else key)
    ax.set_title(f"{task}: {key} against storage cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right" if lower_better else "lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
