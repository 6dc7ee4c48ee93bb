"""Multi-configuration evaluation: metrics per configuration, hypervolume, and the metric-vs-bits plot.

Hypervolume (SPEC §7) is of the points (metric, avg_bits), metric maximised and bits minimised, with bits
scaled to [0, 1] over the option space's range [2.0322, 8.625] and the reference point (metric 0, bits
8.625). So a single configuration at 8.625 bits scores 0, and a metric of 1 at the cheapest possible bits
would score 1.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from coalora.glue import glue_metrics, main_metric, predictions_from_logits
from coalora.options import OPTION_SPACE
from coalora.qconfig import QConfig

MIN_BITS = min(o.storage_bits for o in OPTION_SPACE)
MAX_BITS = max(o.storage_bits for o in OPTION_SPACE)


@dataclass
class EvalResult:
    """One (checkpoint, configuration) evaluation."""

    run: str
    method: str
    label: str  # '3.0' for a budget, a file name for a qconfig, 'random-3', 'seen-5', 'fp'
    kind: str  # budget | qconfig | random | seen | own | fp
    avg_bits: float | None
    seen: bool
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        data = asdict(self)
        data.update(data.pop("metrics"))
        return data


@torch.no_grad()
def evaluate_config(module, loader: Iterable[dict], config: QConfig | None, task: str) -> dict[str, float]:
    """The task's GLUE metrics and mean loss of ``module`` under ``config`` on ``loader``."""
    metrics = glue_metrics(task)
    total, count = 0.0, 0
    device = next(module.parameters()).device
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = module(batch, config)
        total += float(module.loss(logits, batch["labels"])) * len(batch["labels"])
        count += len(batch["labels"])
        metrics.update(predictions_from_logits(logits, task).cpu(), batch["labels"].cpu())
    values = {name: float(value) for name, value in metrics.compute().items()}
    values["loss"] = total / max(count, 1)
    return values


def hypervolume(points: Iterable[tuple[float, float]]) -> float:
    """Dominated area of (metric, avg_bits) points; see the module docstring for the reference point."""
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    rows = [(metric, -(bits - MIN_BITS) / (MAX_BITS - MIN_BITS)) for metric, bits in points]
    if not rows:
        return 0.0
    return float(
        Hypervolume(torch.tensor([0.0, -1.0], dtype=torch.float64)).compute(torch.tensor(rows).double())
    )


def summarise(results: list[EvalResult], task: str) -> dict[str, dict]:
    """Per run: hypervolume over its points and the mean main metric at the budget configurations."""
    key = main_metric(task)
    summary: dict[str, dict] = {}
    for run in dict.fromkeys(r.run for r in results):
        mine = [r for r in results if r.run == run]
        scored = [(r.metrics[key], r.avg_bits) for r in mine if r.avg_bits is not None]
        at_budgets = [r.metrics[key] for r in mine if r.kind in ("budget", "own", "fp")]
        summary[run] = {
            "method": mine[0].method,
            "hypervolume": round(hypervolume(scored), 4) if scored else None,
            f"mean_{key}": round(sum(at_budgets) / len(at_budgets), 4) if at_budgets else None,
            "points": len(mine),
        }
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
    _atomic_text(paths["json"], json.dumps(payload, indent=1) + "\n")
    rows = [r.row() for r in results]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = paths["csv"].with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, paths["csv"])
    plot(results, task, paths["png"])
    return paths


def plot(results: list[EvalResult], task: str, path: Path) -> None:
    """Metric against avg bits, one colour per run; filled markers seen in training, hollow ones unseen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = main_metric(task)
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
    ax.set_ylabel(key)
    ax.set_title(f"{task}: {key} against storage cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
