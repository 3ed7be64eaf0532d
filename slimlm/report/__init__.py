"""Reports: one table (rows = variants; columns = quality and efficiency), as terminal, Markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

COLUMNS = (  # header, how to read it from a variant, format
    ("variant", lambda v: v.name, "{}"),
    ("ppl", lambda v: v.metrics["quality"]["perplexity"], "{:.2f}"),
    ("Δppl", lambda v: v.metrics.get("ppl_change"), "{:+.1%}"),
    ("KL", lambda v: v.metrics["quality"]["kl_divergence"], "{:.4f}"),
    ("top-1", lambda v: v.metrics["quality"]["top1_agreement"], "{:.1%}"),
    ("sparsity", lambda v: v.metrics["sparsity"], "{:.1%}"),
    ("params", lambda v: v.metrics["parameters"] / 1e6, "{:.1f}M"),
    ("MB", lambda v: v.metrics["weight_bytes"] / 1e6, "{:.1f}"),
    ("ratio", lambda v: v.metrics["compression_ratio"], "{:.2f}×"),
    ("q/fp16", lambda v: v.metrics.get("quantized_share_of_fp16"), "{:.1%}"),
    ("time s", lambda v: v.metrics.get("compress_seconds"), "{:.1f}"),
)


def _cells(variant) -> list[str]:
    cells = []
    for _, read, fmt in COLUMNS:
        value = read(variant)
        cells.append("—" if value is None else fmt.format(value))
    return cells


def _with_changes(variants) -> list:
    base_ppl = variants[0].metrics["quality"]["perplexity"]
    for variant in variants[1:]:
        variant.metrics["ppl_change"] = variant.metrics["quality"]["perplexity"] / base_ppl - 1
    return variants


def rich_table(variants, title: str = "slimlm") -> Table:
    table = Table(title=title)
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="left" if header == "variant" else "right", no_wrap=True)
    for variant in variants:
        table.add_row(*_cells(variant))
    return table


def markdown(variants, context: dict) -> str:
    lines = [
        "# slimlm report",
        "",
        f"- model: `{context['model']['source']}` ({context['model']['resolved']}), {context['model']['dtype']}, on {context['device']}",
        f"- perplexity: {context['evaluation']['protocol']}",
        f"- KL divergence (nats/token, KL(base‖variant)) and top-1 agreement over the first {context['evaluation']['kl_windows']} windows",
        "- ppl: perplexity; Δppl: change vs base; KL: KL(base‖variant) in nats/token; top-1: share of positions with the same argmax as base",
        "- MB: tensor bytes of the saved safetensors (base: dense, in its dtype); ratio = base bytes / variant bytes",
        "- q/fp16: bytes on disk of the quantized linear layers (packed codes + scales + zero points) / their fp16 bytes",
        f"- peak memory of the run: {_peak(context)}",
        f"- created: {context['created']}",
        "",
        "| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cells(v)) + " |" for v in variants]
    lines += ["", "## Variants", ""]
    for variant in variants[1:]:
        lines.append(f"- `{variant.name}`: saved to `{variant.path}`; recipe `{json.dumps(variant.recipe)}`")
    return "\n".join(lines) + "\n"


def _peak(context: dict) -> str:
    peak = context["peak_memory"]
    text = f"{peak['cpu_peak_rss_mb']:.0f} MB RSS"
    if peak["cuda_max_allocated_mb"] is not None:
        text += f", {peak['cuda_max_allocated_mb']:.0f} MB CUDA"
    return text


def write_report(out_dir: Path, variants, context: dict) -> None:
    """report.json (everything) and report.md (the table), then print the table."""
    from slimlm.progress import console

    out_dir.mkdir(parents=True, exist_ok=True)
    variants = _with_changes(variants)
    payload = {"context": context, "variants": [vars(v) for v in variants]}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(variants, context))
    console.print(rich_table(variants, title=f"slimlm — {context['model']['source']}"))
    console.print(f"[dim]{context['evaluation']['protocol']} · peak memory {_peak(context)}[/dim]")
    console.print(f"report: {out_dir / 'report.md'}  ·  {out_dir / 'report.json'}")
