"""One self-contained HTML page: the notes, the variants table, and the plots embedded as base64 PNG."""

from __future__ import annotations

import base64
import html

from slimlm.report.table import cells, columns

STYLE = """
body { font: 14px/1.5 system-ui, -apple-system, Segoe UI, sans-serif; color: #1f2933; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 1rem 0; font-size: 13px; }
th, td { padding: .3rem .5rem; border-bottom: 1px solid #d9e2ec; text-align: right; white-space: nowrap; }
th { background: #f0f4f8; } td:first-child, th:first-child { text-align: left; font-weight: 600; }
tr:hover td { background: #f7fafc; }
.notes li { margin: .15rem 0; color: #3e4c59; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; } .figures figure { margin: 0; flex: 1 1 520px; max-width: 700px; }
.figures img { width: 100%; border: 1px solid #d9e2ec; }
.muted { color: #7b8794; } code { background: #f0f4f8; padding: 0 .25rem; border-radius: 3px; }
"""


def page(variants: list[dict], notes: list[str], figures: dict[str, bytes], missing: list[str], title: str) -> str:
    cols = columns(variants)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(v, cols)) + "</tr>" for v in variants)
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for name, png in figures.items()
    )
    missing_html = "".join(f'<p class="muted">{html.escape(m)}</p>' for m in missing)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>'
        f'<h1>{html.escape(title)}</h1><ul class="notes">{notes_html}</ul>'
        f'<h2>Variants</h2><div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
        f'<h2>Quality against cost</h2><div class="figures">{images}</div>{missing_html}'
        "</body></html>\n"
    )
