"""The variants table (rows = variants; columns = quality and efficiency), for the terminal, Markdown and HTML.

Variants are plain dicts as stored in report.json: `name`, `recipe`, `metrics`, `path`. A metric a variant was not
measured on shows as "—".
"""

from __future__ import annotations

from collections.abc import Callable

from rich.table import Table

# The one number per task that the table, the average and the plots use (lm-eval's headline metric for it).
TASK_METRIC = {
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "piqa": "acc_norm",
    "crows_pairs": "pct_stereotype",
}
NOT_IN_AVERAGE = {"crows_pairs"}  # a bias measure, lower is better: reported, not averaged with accuracies


def get(metrics: dict, *keys):
    """metrics[k1][k2]..., or None if any level is missing or None."""
    value = metrics
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def task_score(metrics: dict, task: str) -> float | None:
    return get(metrics, "tasks", task, "metrics", TASK_METRIC.get(task, "acc"))


def task_names(variants: list[dict]) -> list[str]:
    names: list[str] = []
    for variant in variants:
        for name in variant["metrics"].get("tasks") or {}:
            if name not in names:
                names.append(name)
    return names


def zero_shot_average(metrics: dict, tasks: list[str]) -> float | None:
    """Mean headline accuracy over the tasks (bias measures excluded); None unless every task was scored."""
    scores = [task_score(metrics, t) for t in tasks if t not in NOT_IN_AVERAGE]
    return sum(scores) / len(scores) if scores and all(s is not None for s in scores) else None


def columns(variants: list[dict]) -> list[tuple[str, Callable[[dict], object], str]]:
    """(header, read(variant) -> value or None, format) for every column some variant has a value for."""
    tasks = task_names(variants)
    base_ppl = get(variants[0]["metrics"], "quality", "perplexity") if variants else None
    batches = sorted({int(b) for v in variants for b in (get(v["metrics"], "speed", "throughput_tokens_per_s") or {})})
    ks = sorted({figure["draft_tokens"] for v in variants for figure in v["metrics"].get("draft_acceptance") or []})
    candidates: list[tuple[str, Callable[[dict], object], str]] = [
        ("variant", lambda v: v["name"], "{}"),
        ("ppl", lambda v: get(v["metrics"], "quality", "perplexity"), "{:.2f}"),
        (
            "Δppl",
            lambda v: (
                (get(v["metrics"], "quality", "perplexity") / base_ppl - 1)
                if base_ppl and get(v["metrics"], "quality", "perplexity") and v is not variants[0]
                else None
            ),
            "{:+.1%}",
        ),
        ("KL", lambda v: get(v["metrics"], "quality", "kl_divergence"), "{:.4f}"),
        ("top-1", lambda v: get(v["metrics"], "quality", "top1_agreement"), "{:.1%}"),
        *[(f"accept k={k}", lambda v, k=k: draft_acceptance(v["metrics"], k), "{:.1%}") for k in ks],
        *[(f"{t} {TASK_METRIC.get(t, 'acc')}", lambda v, t=t: task_score(v["metrics"], t), "{:.1%}") for t in tasks],
        ("0-shot avg", lambda v: zero_shot_average(v["metrics"], tasks), "{:.1%}"),
        ("sparsity", lambda v: v["metrics"].get("sparsity"), "{:.1%}"),
        ("params", lambda v: v["metrics"]["parameters"] / 1e6 if v["metrics"].get("parameters") else None, "{:.1f}M"),
        ("MB", lambda v: v["metrics"]["weight_bytes"] / 1e6 if v["metrics"].get("weight_bytes") else None, "{:.1f}"),
        ("ratio", lambda v: v["metrics"].get("compression_ratio"), "{:.2f}×"),
        ("q/fp16", lambda v: v["metrics"].get("quantized_share_of_fp16"), "{:.1%}"),
        ("TTFT ms", lambda v: get(v["metrics"], "speed", "ttft_ms"), "{:.1f}"),
        ("TPOT ms", lambda v: get(v["metrics"], "speed", "tpot_ms"), "{:.1f}"),
        *[(f"tok/s @{b}", lambda v, b=b: _throughput(v["metrics"], b), "{:.1f}") for b in batches],
        ("peak RSS MB", lambda v: get(v["metrics"], "speed", "cpu_peak_rss_mb"), "{:.0f}"),
        ("J/token", lambda v: get(v["metrics"], "speed", "energy_joules_per_token"), "{:.3f}"),
        ("time s", lambda v: v["metrics"].get("compress_seconds"), "{:.1f}"),
    ]
    return [c for c in candidates if c[0] == "variant" or any(c[1](v) is not None for v in variants)]


def draft_acceptance(metrics: dict, draft_tokens: int) -> float | None:
    """Greedy acceptance of the variant drafting `draft_tokens` per round for the base (`slimlm.evaluate.speculative`)."""
    return next(
        (f["acceptance"] for f in metrics.get("draft_acceptance") or [] if f["draft_tokens"] == draft_tokens), None
    )


def _throughput(metrics: dict, batch: int) -> float | None:
    table = get(metrics, "speed", "throughput_tokens_per_s") or {}
    return table.get(batch, table.get(str(batch)))  # JSON turns the int keys into strings


def cells(variant: dict, cols) -> list[str]:
    out = []
    for _, read, fmt in cols:
        value = read(variant)
        out.append("—" if value is None else fmt.format(value))
    return out


def rich_table(variants: list[dict], title: str = "slimlm") -> Table:
    cols = columns(variants)
    table = Table(title=title)
    for header, _, _ in cols:
        table.add_column(header, justify="left" if header == "variant" else "right", no_wrap=True)
    for variant in variants:
        table.add_row(*cells(variant, cols))
    return table


def markdown_table(variants: list[dict]) -> list[str]:
    cols = columns(variants)
    lines = ["| " + " | ".join(header for header, _, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return lines + ["| " + " | ".join(cells(v, cols)) + " |" for v in variants]
