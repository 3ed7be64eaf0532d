"""What a search leaves in its directory: front.json, recipe.yaml, the plots and report.html; and the table printed.

The front is drawn over *held-out* KL (evaluation text the search never saw) against file bytes; uniform points
(slimlm's codes, one type everywhere) and llama.cpp's presets (its reference quantizer) share the axes.
"""

from __future__ import annotations

import html
import io
import json
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


def plot_front(rows: list[dict], x_key: str, x_label: str, title: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get(x_key) is not None and r["metrics"].get("kl_divergence") is not None]
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for kind, (colour, marker) in KIND_STYLE.items():
        mine = [r for r in points if r["kind"] == kind]
        if mine:
            ax.scatter(
                [r[x_key] for r in mine],
                [max(r["metrics"]["kl_divergence"], 1e-5) for r in mine],
                c=colour,
                marker=marker,
                label=kind,
                s=36,
                zorder=3,
            )
    searched = sorted((r for r in points if r["kind"] == "searched"), key=lambda r: r[x_key])
    if len(searched) > 1:
        ax.plot(
            [r[x_key] for r in searched],
            [max(r["metrics"]["kl_divergence"], 1e-5) for r in searched],
            c=KIND_STYLE["searched"][0],
            lw=1,
            zorder=2,
        )
    for r in points:
        if r["kind"] != "searched":
            ax.annotate(
                r["name"].replace("slimlm uniform ", "").replace("llama.cpp ", "lc "),
                (r[x_key], max(r["metrics"]["kl_divergence"], 1e-5)),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
    ax.set_yscale("log")
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


def table_rows(data: dict) -> list[list[str]]:
    rows = []
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
        )
    return rows


HEADERS = ["point", "kind", "file MB", "KL held-out", "ppl", "top-1 %", "KL calib", "front"]


def write_search_report(result, database) -> None:
    out: Path = result.out
    data = front_dict(result, database)
    (out / "front.json").write_text(json.dumps(data, indent=1))
    (out / "recipe.yaml").write_text(
        yaml.safe_dump(recipe_dict(result.chosen, database, result.context["settings"]["statistics"]), sort_keys=False)
    )
    figure = plot_front(
        data["points"],
        "file_bytes",
        "GGUF file size (bytes)"
        if data["context"].get("target", "gguf") == "gguf"
        else "model.safetensors size (bytes)",
        f"{data['context']['model']['source']}: held-out KL against file size",
    )
    figures = {}
    if figure is not None:
        (out / "front-size.png").write_bytes(figure)
        figures["front-size.png"] = figure
    (out / "report.html").write_text(page(data, figures))


def page(data: dict, figures: dict[str, bytes]) -> str:
    import base64

    from slimlm.report.html import STYLE

    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(data))
    images = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for n, png in figures.items()
    )
    context = data["context"]
    notes = [
        f"model: {context['model']['source']}; chosen: {data['chosen']} (written to {'model.gguf' if context.get('target', 'gguf') == 'gguf' else 'this directory, a compressed-tensors checkpoint'})",
        f"held-out evaluation: {context['evaluation']['protocol']}",
        f"search: {context['seconds']} s; database {data['database']['knobs']} tensors, {data['database']['bytes'] / 1e6:.1f} MB on disk",
        f"sparsity: {context['sparsity']}",
    ]
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>slimlm search</title><style>{STYLE}</style></head><body>'
        f'<h1>slimlm search</h1><ul class="notes">{notes_html}</ul>'
        f'<h2>Front and baselines</h2><div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
        f'<h2>Quality against size</h2><div class="figures">{images}</div></body></html>\n'
    )


def print_table(data: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title="slimlm search: searched points against uniform codes and llama.cpp presets (held-out KL)")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("point", "kind") else "right")
    for row in table_rows(data):
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(
        table
    )  # a log or pipe gets the whole row, as progress lines do
