"""Quality against cost, with the Pareto front: the variants no other variant beats on both axes at once.

Quality is the zero-shot average when every variant has task scores (higher is better), else perplexity (lower is
better). Cost is weight bytes on disk, or batch-1 time per output token. Figures are PNG bytes (matplotlib, Agg).
"""

from __future__ import annotations

import io

from slimlm.report.table import get, task_names, zero_shot_average


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points on the Pareto front, cheapest first: x (cost) lower is better; y (quality) higher or
    lower is better. A point is on the front if no other point has cost <= and quality >=, one of them strictly."""
    sign = 1 if higher_is_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox <= x and sign * oy >= sign * y) and (ox < x or sign * oy > sign * y) for j, (ox, oy) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def quality_axis(variants: list[dict]) -> tuple[str, list[float | None], bool] | None:
    """(label, one value per variant, higher is better), or None when there is nothing to plot."""
    tasks = task_names(variants)
    averages = [zero_shot_average(v["metrics"], tasks) for v in variants]
    if tasks and all(a is not None for a in averages):
        return f"zero-shot average ({', '.join(t for t in tasks if t != 'crows_pairs')})", averages, True
    perplexities = [get(v["metrics"], "quality", "perplexity") for v in variants]
    if any(p is not None for p in perplexities):
        return "perplexity (lower is better)", perplexities, False
    return None


COSTS = {
    "size": ("weights on disk (MB)", lambda v: v["metrics"]["weight_bytes"] / 1e6 if v["metrics"].get("weight_bytes") else None),
    "latency": ("time per output token, batch 1 (ms)", lambda v: get(v["metrics"], "speed", "tpot_ms")),
}


def plot(variants: list[dict], cost: str, device: str = "") -> bytes | None:
    """PNG of quality against `cost` ("size" or "latency"); None when fewer than two variants have both values."""
    axis = quality_axis(variants)
    if axis is None:
        return None
    quality_label, qualities, higher_is_better = axis
    cost_label, read_cost = COSTS[cost]
    named = [(v["name"], read_cost(v), q) for v, q in zip(variants, qualities) if read_cost(v) is not None and q is not None]
    if len(named) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; set here, not at import, so importing slimlm.report stays cheap
    import matplotlib.pyplot as plt

    points = [(x, y) for _, x, y in named]
    front = pareto_front(points, higher_is_better)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    others = [i for i in range(len(points)) if i not in front]
    ax.scatter([points[i][0] for i in others], [points[i][1] for i in others], s=46, color="#9aa5b1", label="dominated", zorder=3)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-o", color="#d1495b", markersize=8, linewidth=2, label="Pareto front", zorder=4)
    low, high = min(x for x, _ in points), max(x for x, _ in points)
    for name, x, y in named:
        right = high > low and (x - low) / (high - low) > 0.7  # labels of the rightmost points go to their left
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(-7 if right else 7, 7), ha="right" if right else "left", fontsize=8.5, color="#243b53",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}, zorder=5)
    ax.set_xlabel(cost_label)
    ax.set_ylabel(quality_label if len(quality_label) < 32 else quality_label.split(" (")[0])  # the tasks are in the notes
    if higher_is_better:
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
    title = f"quality vs {'size' if cost == 'size' else 'latency'}"
    ax.set_title(title + (f" — {device}" if cost == "latency" and device else ""), fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.15)
    ax.text(0.99, 0.01, f"better: left, {'up' if higher_is_better else 'down'}", transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="#7b8794")
    ax.legend(loc="best", fontsize=8.5, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
