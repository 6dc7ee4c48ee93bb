"""The low-bit regime's table and plot (``lowbit_regime.py``, ``rounding_regime.py``): cells' accuracy at the
budgets and at the random configurations, mean ± std over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def markdown(summary: dict[str, dict], bar: dict[str, object], budgets: Sequence[float]) -> str:
    """The cells' table (accuracy %, mean ± std over seeds) and the bars' differences as a list."""

    def cell(value: tuple[float, float] | None) -> str:
        return "-" if value is None else f"{100 * value[0]:.2f} ± {100 * value[1]:.2f}"

    labels = [*map(str, budgets)]
    lines = [
        "| method | seeds | "
        + " | ".join(f"acc@{b}" for b in labels)
        + " | mean, budgets | mean, 20 random | train min/seed |",
        "| --- " * (5 + len(labels)) + "|",
    ]
    for method, s in summary.items():
        at = [cell(s["budget"].get(b, s["budget"].get("fp"))) for b in labels]
        lines.append(
            f"| {method} | {len(s['seeds'])} | "
            + " | ".join(at)
            + f" | {cell(s['budget_mean'])} | {cell(s['random_mean'])} | {s['train_minutes_per_seed']} |"
        )
    lines.append("")

    def points(value: object) -> str:  # differences in accuracy points, mean ± std over seeds
        if isinstance(value, tuple | list) and len(value) == 2:
            return f"{value[0]:+.2f} ± {value[1]:.2f}"
        if isinstance(value, dict):
            return ", ".join(f"{k}: {points(v)}" for k, v in value.items())
        return str(value)

    for key, value in bar.items():
        lines.append(f"- {key}: {points(value)}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: dict[str, dict], path: Path, budgets: Sequence[float]) -> None:
    """Accuracy against bits per method: seed means with their std at the budgets, random points faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (method, s) in enumerate(summary.items()):
        colour = f"C{i % 10}"
        if "fp" in s["budget"]:
            ax.axhline(
                100 * s["budget"]["fp"][0], color=colour, linestyle="--", linewidth=1, label=f"{method}"
            )
            continue
        bits, means, stds = [], [], []
        for b in map(str, budgets):
            if b in s["budget"]:
                bits.append(float(b))
                means.append(100 * s["budget"][b][0])
                stds.append(100 * s["budget"][b][1])
        ax.errorbar(bits, means, yerr=stds, color=colour, marker="o", capsize=3, label=method)
        points = [
            (r["avg_bits"], 100 * r["accuracy"])
            for r in rows
            if r["method"] == method and r["kind"] == "random"
        ]
        if points:
            ax.scatter(*zip(*points), color=colour, alpha=0.25, s=10)
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("Low-bit regime: mean ± std over seeds at budgets; faint: the 20 random configurations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
