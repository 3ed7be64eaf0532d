"""Quality against cost, with the Pareto front: the variants no other variant beats on both axes at once.

Quality is the zero-shot average when every variant has task scores (higher is better), else perplexity (lower is
better) on a log axis: compressed variants span orders of magnitude, and on a linear axis every useful point would
sit on one flat line at the bottom. Cost is weight bytes on disk, or batch-1 time per output token. Labels are
pushed apart until none overlaps another. Figures are PNG bytes (matplotlib, Agg).
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
            (ox <= x and sign * oy >= sign * y) and (ox < x or sign * oy > sign * y)
            for j, (ox, oy) in enumerate(points)
            if j != i
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
    "size": (
        "weights on disk (MB)",
        lambda v: v["metrics"]["weight_bytes"] / 1e6 if v["metrics"].get("weight_bytes") else None,
    ),
    "latency": ("time per output token, batch 1 (ms)", lambda v: get(v["metrics"], "speed", "tpot_ms")),
}


def plot(variants: list[dict], cost: str, device: str = "") -> bytes | None:
    """PNG of quality against `cost` ("size" or "latency"); None when fewer than two variants have both values."""
    fig = figure(variants, cost, device)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def figure(variants: list[dict], cost: str, device: str = ""):
    """The matplotlib figure `plot` renders (None when there is nothing to plot)."""
    axis = quality_axis(variants)
    if axis is None:
        return None
    quality_label, qualities, higher_is_better = axis
    cost_label, read_cost = COSTS[cost]
    named = [
        (v["name"], read_cost(v), q) for v, q in zip(variants, qualities) if read_cost(v) is not None and q is not None
    ]
    if len(named) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; set here, not at import, so importing slimlm.report stays cheap
    import matplotlib.pyplot as plt

    points = [(x, y) for _, x, y in named]
    front = pareto_front(points, higher_is_better)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    others = [i for i in range(len(points)) if i not in front]
    ax.scatter(
        [points[i][0] for i in others],
        [points[i][1] for i in others],
        s=46,
        color="#9aa5b1",
        label="dominated",
        zorder=3,
    )
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        "-o",
        color="#d1495b",
        markersize=8,
        linewidth=2,
        label="Pareto front",
        zorder=4,
    )
    if not higher_is_better:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 10, 20, 100 rather than 10^1
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    low, high = min(x for x, _ in points), max(x for x, _ in points)
    labels = []
    for name, x, y in named:
        right = high > low and (x - low) / (high - low) > 0.7  # labels of the rightmost points go to their left
        labels.append(
            ax.annotate(
                name,
                (x, y),
                textcoords="offset points",
                xytext=(-7 if right else 7, 7),
                ha="right" if right else "left",
                fontsize=8.5,
                color="#243b53",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                zorder=5,
                arrowprops={"arrowstyle": "-", "color": "#9aa5b1", "lw": 0.6},
            )
        )
    ax.set_xlabel(cost_label)
    ax.set_ylabel(
        quality_label if len(quality_label) < 32 else quality_label.split(" (")[0]
    )  # the tasks are in the notes
    if higher_is_better:
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
    title = f"quality vs {'size' if cost == 'size' else 'latency'}"
    ax.set_title(title + (f" — {device}" if cost == "latency" and device else ""), fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.15)
    ax.text(
        0.99,
        0.01,
        f"better: left, {'up' if higher_is_better else 'down'}",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=8,
        color="#7b8794",
    )
    ax.legend(loc="best", fontsize=8.5, frameon=False)
    fig.tight_layout()
    separate_labels(fig, labels)
    return fig


def separate_labels(fig, labels: list, pad_px: float = 2.0, passes: int = 50) -> None:
    """Push overlapping labels apart vertically (in display pixels, the lower one down, the upper one up) until no
    two boxes overlap; a thin leader line keeps each one tied to its point."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    to_points = 72.0 / fig.dpi

    def extents() -> list:  # the text's own box; an Annotation's extent also spans its leader line
        return [Text.get_window_extent(label, renderer) for label in labels]

    for _ in range(passes):
        boxes = extents()
        moved = False
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                a, b = boxes[i], boxes[j]
                if a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 + pad_px <= b.y0 or b.y1 + pad_px <= a.y0:
                    continue
                lower, upper = (i, j) if (a.y0 + a.y1) <= (b.y0 + b.y1) else (j, i)
                shift = (min(a.y1, b.y1) - max(a.y0, b.y0) + pad_px) / 2 * to_points + 0.5  # points each way
                for index, sign in ((lower, -1), (upper, 1)):
                    dx, dy = labels[index].xyann
                    labels[index].xyann = (dx, dy + sign * shift)
                moved = True
                boxes = extents()
        if not moved:
            return
