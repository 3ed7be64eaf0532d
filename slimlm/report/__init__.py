"""Reports: one table (rows = variants; columns = quality and efficiency) in the terminal, Markdown, a
self-contained HTML page with plots (quality vs size and vs latency, Pareto front highlighted), and JSON.

    write_report(out_dir, variants, context)   # at the end of `slimlm run`
    report_run_dir(run_dir)                    # `slimlm report RUN_DIR`: re-render from report.json
"""

from __future__ import annotations

import json
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.report.table import get, markdown_table, rich_table, task_names

FIGURES = {"size": "quality_vs_size.png", "latency": "quality_vs_latency.png"}


def _peak(context: dict) -> str:
    peak = context.get("peak_memory") or {}
    if peak.get("cpu_peak_rss_mb") is None:
        return "not recorded"
    text = f"{peak['cpu_peak_rss_mb']:.0f} MB RSS"
    if peak.get("cuda_max_allocated_mb") is not None:
        text += f", {peak['cuda_max_allocated_mb']:.0f} MB CUDA"
    return text


def notes(variants: list[dict], context: dict) -> list[str]:
    """What every column means and what exactly it was measured on."""
    model = context.get("model", {})
    lines = [
        f"model: {model.get('source')} ({model.get('resolved')}), {model.get('dtype')}, on {context.get('device')}"
    ]
    evaluation = context.get("evaluation") or {}
    if evaluation.get("protocol"):
        lines.append(f"perplexity: {evaluation['protocol']}")
        lines.append(
            evaluation.get("kl")
            or f"KL(base‖variant) in nats/token and top-1 agreement with the base over the first {evaluation.get('kl_windows')} windows"
        )
    for task in task_names(variants):
        protocol = next(
            (
                get(v["metrics"], "tasks", task, "protocol")
                for v in variants
                if get(v["metrics"], "tasks", task, "protocol")
            ),
            None,
        )
        if protocol:
            lines.append(f"{task}: {protocol}")
    lines += [f"row {v['name']}: {v['purpose']}" for v in variants if v.get("purpose")]
    if task_names(variants):
        lines.append(
            "zero-shot scores: acc_norm for HellaSwag, PIQA, ARC, OpenBookQA, acc otherwise; 0-shot avg = their mean (CrowS-Pairs excluded: a bias share, lower is better); standard errors in report.json"
        )
    speed = next((v["metrics"]["speed"] for v in variants if v["metrics"].get("speed")), None)
    if speed:
        lines.append(
            f"speed on {speed['device']}: TTFT = prompt of {speed['prompt_tokens']} tokens to first token, TPOT = per decoded token (batch 1, KV cache, "
            f"median of {speed['repeats']} after a warm-up); tok/s @B = decoded tokens per second at batch B; peak RSS during the measurement ({speed['cpu_peak_scope']})"
        )
        lines.append(
            f"energy: {speed['energy_meter']}"
            + ("" if speed.get("energy_joules_per_token") is not None else " — J/token not reported")
        )
    lines += [
        "MB: tensor bytes of the saved safetensors (base: dense at 16-bit weights, as it would be shipped); ratio = base bytes / variant bytes",
        "q/fp16: bytes on disk of the quantized linear layers / their fp16 bytes",
        f"peak memory of the run: {_peak(context)}",
        f"created: {context.get('created')}",
    ]
    return lines


def markdown(variants: list[dict], context: dict, figures: dict[str, str], missing: list[str]) -> str:
    lines = ["# slimlm report", "", *[f"- {n}" for n in notes(variants, context)], "", *markdown_table(variants), ""]
    if figures or missing:
        lines += ["## Quality against cost", ""]
        lines += [f"![quality vs {cost}]({file})" for cost, file in figures.items()]
        lines += missing
        lines.append("")
    if len(variants) > 1:
        lines += ["## Variants", ""]
        lines += [
            f"- `{v['name']}`: saved to `{v.get('path')}`; recipe `{json.dumps(v.get('recipe'))}`" for v in variants[1:]
        ]
    return "\n".join(lines) + "\n"


def render(out_dir: Path, variants: list[dict], context: dict) -> dict[str, Path]:
    """Write report.md, report.html and the PNGs into `out_dir`; returns what was written."""
    from slimlm.report.html import page
    from slimlm.report.plots import plot

    device = next((v["metrics"]["speed"]["device"] for v in variants if v["metrics"].get("speed")), "")
    pngs: dict[str, bytes] = {}
    missing = []
    for cost, file in FIGURES.items():
        png = plot(variants, cost, device)
        if png is None:
            missing.append(
                f"No quality-vs-{cost} plot: fewer than two variants have both a quality figure and {'weight bytes' if cost == 'size' else 'a speed measurement (run with --speed)'}."
            )
        else:
            pngs[file] = png
            (out_dir / file).write_bytes(png)
    written = {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    written["markdown"].write_text(
        markdown(variants, context, {cost: file for cost, file in FIGURES.items() if file in pngs}, missing)
    )
    title = f"slimlm report — {context.get('model', {}).get('source', '')}"
    written["html"].write_text(page(variants, notes(variants, context), pngs, missing, title))
    return {**written, **{file: out_dir / file for file in pngs}}


def write_report(out_dir: Path, variants, context: dict) -> None:
    """report.json (everything), report.md, report.html and the plots, then print the table. `variants` are
    `slimlm.api.Variant` objects or dicts with the same fields."""
    from slimlm.progress import console

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [v if isinstance(v, dict) else vars(v) for v in variants]
    (out_dir / "report.json").write_text(json.dumps({"context": context, "variants": rows}, indent=2) + "\n")
    written = render(out_dir, rows, context)
    console.print(rich_table(rows, title=f"slimlm — {context.get('model', {}).get('source', '')}"))
    protocol = (context.get("evaluation") or {}).get("protocol")
    console.print(f"[dim]{protocol + ' · ' if protocol else ''}peak memory {_peak(context)}[/dim]")
    console.print(f"report: {written['html']}  ·  {written['markdown']}  ·  {out_dir / 'report.json'}")


def report_run_dir(run_dir: str | Path) -> dict[str, Path]:
    """Re-render the Markdown, HTML and plots of a finished run from its report.json."""
    run_dir = Path(run_dir)
    source = run_dir / "report.json"
    if not source.is_file():
        raise SlimlmError(
            f"'{run_dir}' has no report.json", "pass the directory `slimlm run` wrote (e.g. slimlm-runs/<timestamp>)"
        )
    try:
        payload = json.loads(source.read_text())
        variants, context = payload["variants"], payload["context"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SlimlmError(
            f"'{source}' is not a slimlm report ({type(err).__name__}: {err})", "re-run `slimlm run` to write it again"
        ) from None
    if (
        not isinstance(variants, list)
        or not variants
        or not all(isinstance(v, dict) and "name" in v and isinstance(v.get("metrics"), dict) for v in variants)
    ):
        raise SlimlmError(
            f"'{source}' lists no variants with names and metrics", "re-run `slimlm run` to write it again"
        )
    return render(run_dir, variants, context)
