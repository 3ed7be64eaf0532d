"""What a search leaves in its directory: front.json, recipe.yaml, the plots and report.html; and the table printed.

The front is drawn over *held-out* KL (evaluation text the search never saw) against file bytes, and against decode
tok/s measured in llama.cpp where the points were timed (`search.speed.measure_points_decode`); uniform points
(slimlm's codes, one type everywhere) and llama.cpp's presets (its reference quantizer) share the axes.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Callable
from pathlib import Path

import yaml

from slimlm.report.plots import pareto_front

KIND_STYLE = {
    "searched": ("#d64545", "o"),
    "uniform": ("#2f6fbd", "s"),
    "preset": ("#7b8794", "^"),
    "base": ("#1f2933", "D"),
}


def _rows(result, database) -> list[dict]:
    return [p.to_dict(database) for p in result.points]


def front_dict(result, database) -> dict:
    rows = _rows(result, database)
    quality = [(r["file_bytes"], r["metrics"].get("kl_divergence") or 0.0) for r in rows]
    on_front = set(pareto_front(quality, higher_is_better=False))
    for i, row in enumerate(rows):
        row["on_front"] = i in on_front
    return {**result.to_dict(), "points": rows}


def recipe_dict(point, database, statistics: dict) -> dict:
    """A recipe `slimlm compress` replays into the same file (`search.replay`): every kept tensor's TYPE/METHOD,
    the blocks removed and the calibration windows of the search's statistics (`statistics`: CalibrationSettings)."""
    from slimlm.search.rerank import describe_configuration

    export = {"format": database.space.target, "tensors": describe_configuration(point.configuration, database)}
    if point.configuration.removed:
        export["remove_blocks"] = list(point.configuration.removed)
    export["calibration"] = {key: statistics[key] for key in ("data", "samples", "seqlen", "seed")}
    return {
        "description": f"slimlm search: {point.name}, {point.file_bytes / 1e6:.2f} MB",
        "stages": [],
        "export": export,
    }


def file_mb_of(row: dict) -> float | None:
    return None if row.get("file_bytes") is None else row["file_bytes"] / 1e6


def decode_tps_of(row: dict) -> float | None:
    return row["metrics"].get("decode_tps")


def plot_front(
    rows: list[dict],
    x_of: Callable[[dict], float | None],
    x_label: str,
    title: str,
    join: bool = True,
    chosen: str | None = None,
) -> bytes | None:
    """Held-out KL (log) against `x_of(row)` for every row that has both; `join`: the searched points joined in x
    order (the front over bytes), else labelled by their budgets (over speed, where their order is not a front).
    The `chosen` point gets a ring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def kl_of(r: dict) -> float:
        return max(r["metrics"]["kl_divergence"], 1e-5)

    points = [r for r in rows if x_of(r) is not None and r["metrics"].get("kl_divergence") is not None]
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for kind, (colour, marker) in KIND_STYLE.items():
        mine = [r for r in points if r["kind"] == kind]
        if mine:
            ax.scatter(
                [x_of(r) for r in mine], [kl_of(r) for r in mine], c=colour, marker=marker, label=kind, s=36, zorder=3
            )
    for r in (r for r in points if r["name"] == chosen):
        ax.scatter(
            [x_of(r)], [kl_of(r)], s=160, facecolors="none", edgecolors="#1f2933", lw=1.2, label="chosen", zorder=4
        )
    searched = sorted((r for r in points if r["kind"] == "searched"), key=x_of)
    if join and len(searched) > 1:
        ax.plot([x_of(r) for r in searched], [kl_of(r) for r in searched], c=KIND_STYLE["searched"][0], lw=1, zorder=2)
    labels: dict[tuple[float, float], list[str]] = {}  # points holding the same bytes share one label
    for r in points:
        if r["kind"] != "searched" or not join:
            name = r["name"].replace("slimlm uniform ", "").replace("llama.cpp ", "lc ").replace("searched ", "")
            labels.setdefault((x_of(r), kl_of(r)), []).append(name)
    ax.set_yscale("log")
    _annotate_apart(ax, fig, labels)
    ax.set_xlabel(x_label)
    ax.set_ylabel("KL(base ‖ model), held-out, nats/token (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


LABEL_GAP = (48, 8)  # points: two labels nearer than this in x and y overlap, so the later one moves up


def _annotate_apart(ax, fig, labels: dict[tuple[float, float], list[str]]) -> None:
    """Each label beside its point, stepped up where it would overlap one already placed (points a few tenths of a
    MB or tok/s apart otherwise print their labels on top of each other)."""
    ax.autoscale_view()
    fig.canvas.draw()  # the axes' limits are final only once drawn
    placed: list[tuple[float, float]] = []
    for xy, names in sorted(labels.items(), key=lambda item: (item[0][1], item[0][0])):
        px, py = ax.transData.transform(xy) * 72 / fig.dpi  # in points, as the offsets are
        lift = 3
        while any(abs(px - qx) < LABEL_GAP[0] and abs(py + lift - qy) < LABEL_GAP[1] for qx, qy in placed):
            lift += LABEL_GAP[1]
        placed.append((px, py + lift))
        ax.annotate(
            " = ".join(names),
            xy,
            fontsize=7,
            xytext=(4, lift),
            textcoords="offset points",
            arrowprops=None if lift == 3 else {"arrowstyle": "-", "lw": 0.5, "color": "#9aa5b1"},
        )


def table_rows(data: dict) -> list[list[str]]:
    rows, timed = [], _timed(data)
    for r in sorted(data["points"], key=lambda r: r["file_bytes"]):
        m = r["metrics"]
        rows.append(
            [
                ("★ " if r["name"] == data["chosen"] else "") + r["name"],
                r["kind"],
                f"{r['file_bytes'] / 1e6:.2f}",
                "—" if m.get("kl_divergence") is None else f"{m['kl_divergence']:.4f}",
                "—" if m.get("perplexity") is None else f"{m['perplexity']:.3f}",
                "—" if m.get("top1_agreement") is None else f"{100 * m['top1_agreement']:.1f}",
                "—" if r.get("rerank_kl") is None else f"{r['rerank_kl']:.4f}",
                "yes" if r.get("on_front") else "",
            ]
            + ([] if not timed else ["—" if m.get("decode_tps") is None else f"{m['decode_tps']:.1f}"])
        )
    return rows


def headers(data: dict) -> list[str]:
    """The table's columns; decode tok/s where the points were timed in llama.cpp."""
    return HEADERS + (["decode tok/s"] if _timed(data) else [])


def _timed(data: dict) -> bool:
    return any(r["metrics"].get("decode_tps") is not None for r in data["points"])


HEADERS = ["point", "kind", "file MB", "KL held-out", "ppl", "top-1 %", "KL calib", "front"]


def write_search_report(result, database) -> None:
    out: Path = result.out
    data = front_dict(result, database)
    (out / "front.json").write_text(json.dumps(data, indent=1))
    (out / "recipe.yaml").write_text(
        yaml.safe_dump(recipe_dict(result.chosen, database, result.context["settings"]["statistics"]), sort_keys=False)
    )
    source = data["context"]["model"]["source"]
    plots = {
        "front-size.png": (
            file_mb_of,
            "GGUF file size (MB)" if data["context"].get("target", "gguf") == "gguf" else "model.safetensors size (MB)",
            f"{source}: held-out KL against file size",
            True,
        ),
        "front-speed.png": (
            decode_tps_of,
            "decode tok/s, measured in llama.cpp side by side",
            f"{source}: held-out KL against decode speed ({data['context']['constraints']['threads']} threads)",
            False,
        ),
    }
    figures = {}
    for name, (x_of, x_label, title, join) in plots.items():
        figure = plot_front(data["points"], x_of, x_label, title, join, chosen=data["chosen"])
        if figure is not None:
            (out / name).write_bytes(figure)
            figures[name] = figure
    (out / "report.html").write_text(page(data, figures))


def page(data: dict, figures: dict[str, bytes]) -> str:
    import base64

    from slimlm.report.html import STYLE

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers(data))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(data))
    images = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for n, png in figures.items()
    )
    context = data["context"]
    notes = [
        f"model: {context['model']['source']}; chosen: {data['chosen']} (written to {'model.gguf' if context.get('target', 'gguf') == 'gguf' else 'this directory, a compressed-tensors checkpoint'})",
        f"held-out evaluation: {context['evaluation']['protocol']}",
        *([f"speed: {context['evaluation']['speed']}"] if context["evaluation"].get("speed") else []),
        f"search: {context['seconds']} s; database {data['database']['knobs']} tensors, {data['database']['bytes'] / 1e6:.1f} MB on disk",
        f"sparsity: {context['sparsity']}",
    ]
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>slimlm search</title><style>{STYLE}</style></head><body>'
        f'<h1>slimlm search</h1><ul class="notes">{notes_html}</ul>'
        f'<h2>Front and baselines</h2><div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
        f'<h2>Quality against size and speed</h2><div class="figures">{images}</div></body></html>\n'
    )


def print_table(data: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title="slimlm search: searched points against uniform codes and llama.cpp presets (held-out KL)")
    for h in headers(data):
        table.add_column(h, justify="left" if h in ("point", "kind") else "right")
    for row in table_rows(data):
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(
        table
    )  # a log or pipe gets the whole row, as progress lines do
