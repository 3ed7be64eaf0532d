"""The report: Pareto front, the table's columns, and a self-contained HTML page with the plots embedded."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest

from slimlm.errors import SlimlmError
from slimlm.report import report_run_dir, write_report
from slimlm.report.plots import pareto_front, quality_axis
from slimlm.report.table import markdown_table, zero_shot_average

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def variant(name: str, mb: float, ppl: float, accs: dict[str, float] | None, tpot: float | None) -> dict:
    metrics: dict = {
        "quality": {"perplexity": ppl, "kl_divergence": None if name == "base" else 0.1, "top1_agreement": None},
        "weight_bytes": mb * 1e6,
        "parameters": 134.5e6,
        "sparsity": 0.0,
    }
    if accs is not None:
        metrics["tasks"] = {
            t: {"metrics": {"acc": a, "acc_norm": a + 0.01}, "protocol": f"{t} protocol line"} for t, a in accs.items()
        }
    if tpot is not None:
        metrics["speed"] = {
            "device": "cpu (2 threads)",
            "prompt_tokens": 512,
            "repeats": 3,
            "ttft_ms": 10 * tpot,
            "tpot_ms": tpot,
            "cpu_peak_scope": "this measurement",
            "throughput_tokens_per_s": {"1": 1000 / tpot, "8": 5000 / tpot},
            "cpu_peak_rss_mb": 700.0,
            "energy_joules_per_token": None,
            "energy_meter": "unavailable: no powercap/RAPL counters on this machine",
        }
    return {"name": name, "recipe": None, "metrics": metrics, "path": None}


VARIANTS = [
    variant("base", 538.0, 18.0, {"hellaswag": 0.42, "piqa": 0.68, "lambada": 0.40}, 30.0),
    variant("magnitude-50", 538.0, 60.0, {"hellaswag": 0.30, "piqa": 0.60, "lambada": 0.10}, 29.0),
    variant("rtn-w8", 170.0, 18.1, {"hellaswag": 0.42, "piqa": 0.68, "lambada": 0.39}, 45.0),
    variant("rtn-w4-g64", 110.0, 21.0, {"hellaswag": 0.39, "piqa": 0.65, "lambada": 0.33}, 47.0),
    variant("wanda-2of4", 540.0, 40.0, {"hellaswag": 0.33, "piqa": 0.61, "lambada": 0.20}, 25.0),
]
CONTEXT = {
    "model": {"source": "smollm2-135m", "resolved": "x.gguf", "dtype": "torch.float32"},
    "device": "cpu",
    "evaluation": {"protocol": "GPTQ protocol: 4 windows", "kl_windows": 2},
    "peak_memory": {"cpu_peak_rss_mb": 900.0, "cuda_max_allocated_mb": None},
    "created": "2025-01-01T00:00:00+00:00",
}


def test_pareto_front_on_hand_made_points():
    points = [(1.0, 0.5), (2.0, 0.7), (2.5, 0.6), (3.0, 0.9), (3.0, 0.8), (4.0, 0.9)]
    assert pareto_front(points, higher_is_better=True) == [0, 1, 3]  # (2.5, .6), (3, .8), (4, .9) are dominated
    assert pareto_front([(1.0, 30.0), (2.0, 20.0), (3.0, 25.0)], higher_is_better=False) == [
        0,
        1,
    ]  # perplexity: lower wins
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], True) == [0, 1]  # equal points do not dominate each other


def test_quality_axis_prefers_tasks_and_averages_headline_metrics():
    label, values, higher = quality_axis(VARIANTS)
    assert higher and label.startswith("zero-shot average")
    # acc_norm for hellaswag/piqa (acc + 0.01 here), acc for lambada
    assert values[0] == pytest.approx((0.43 + 0.69 + 0.40) / 3)
    assert zero_shot_average(VARIANTS[0]["metrics"], ["hellaswag", "crows_pairs"]) == pytest.approx(
        0.43
    )  # bias share not averaged
    assert (
        zero_shot_average(VARIANTS[0]["metrics"], ["hellaswag", "boolq"]) is None
    )  # a task without a score: no average
    no_tasks = [variant("a", 10, 20.0, None, None), variant("b", 5, 30.0, None, None)]
    assert quality_axis(no_tasks)[2] is False  # perplexity: lower is better


def test_markdown_table_has_task_and_speed_columns_and_dashes_for_missing():
    lines = markdown_table([*VARIANTS, variant("no-speed", 100.0, 25.0, None, None)])
    header = lines[0]
    for column in ("hellaswag acc_norm", "lambada acc", "0-shot avg", "TPOT ms", "tok/s @8", "MB"):
        assert column in header
    assert "J/token" not in header  # no variant has an energy figure
    assert lines[-1].count("—") >= 5


def test_report_writes_valid_self_contained_html_with_images(tmp_path):
    write_report(tmp_path, VARIANTS, CONTEXT)
    page = (tmp_path / "report.html").read_text()
    parser = _Checker()
    parser.feed(page)
    parser.close()
    assert parser.stack == [] and parser.errors == []
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(image).startswith(PNG_MAGIC) for image in images)
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside
    assert "rtn-w4-g64" in page and "unavailable: no powercap" in page
    assert (tmp_path / "quality_vs_size.png").read_bytes().startswith(PNG_MAGIC)
    markdown = (tmp_path / "report.md").read_text()
    assert "![quality vs latency](quality_vs_latency.png)" in markdown
    assert json.loads((tmp_path / "report.json").read_text())["variants"][3]["name"] == "rtn-w4-g64"


def test_report_run_dir_rerenders_and_explains_missing_plots(tmp_path):
    payload = {
        "context": CONTEXT,
        "variants": [variant("base", 538.0, 18.0, None, None), variant("rtn-w8", 170.0, 18.1, None, None)],
    }
    (tmp_path / "report.json").write_text(json.dumps(payload))
    written = report_run_dir(tmp_path)
    assert written["html"].is_file() and (tmp_path / "quality_vs_size.png").is_file()
    assert "No quality-vs-latency plot" in (tmp_path / "report.md").read_text()
    with pytest.raises(SlimlmError, match="has no report.json"):
        report_run_dir(tmp_path / "missing")
    (tmp_path / "report.json").write_text('{"variants": []}')
    with pytest.raises(SlimlmError, match="not a slimlm report"):
        report_run_dir(tmp_path)


class _Checker(HTMLParser):
    """Tags open and close in order (void elements excepted)."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_run_puts_tasks_and_speed_into_the_report(tmp_path):
    from conftest import TEXT, tiny_model, tiny_tokenizer

    from slimlm.api import EvalSettings, run
    from slimlm.checkpoint.save import save_model
    from slimlm.evaluate.speed import SpeedSettings

    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny", {})
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "piqa.jsonl").write_text(
        "".join(json.dumps({"goal": f"g{i}", "sol1": "a b", "sol2": "c", "label": i % 2}) + "\n" for i in range(4))
    )
    speed = SpeedSettings(
        prompt_tokens=8,
        new_tokens=2,
        repeats=1,
        batch_sizes=(1, 2),
        throughput_prompt_tokens=4,
        throughput_new_tokens=2,
    )
    settings = EvalSettings(
        data=str(tmp_path / "text.txt"),
        seqlen=32,
        max_windows=2,
        kl_windows=1,
        tasks=(f"piqa:{tmp_path / 'piqa.jsonl'}",),
        task_limit=3,
        speed=speed,
    )
    out = run(model=str(tmp_path / "tiny"), recipes=("magnitude-50",), evaluation=settings, out_dir=tmp_path / "run")
    report = json.loads((out / "report.json").read_text())
    for row in report["variants"]:
        assert row["metrics"]["tasks"]["piqa"]["examples"] == 3 and row["metrics"]["speed"]["tpot_ms"] > 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "piqa acc_norm" in page


def test_perplexity_plot_is_log_scaled_and_no_two_labels_overlap():
    """Perplexities over three orders of magnitude and points almost on top of each other (the issue's plot)."""
    from slimlm.report.plots import figure

    close = [
        variant("base", 269.0, 8.66, None, None),
        variant("rtn-w8", 219.9, 8.68, None, None),
        variant("smoothquant-w8a8", 219.0, 8.70, None, None),
        variant("awq-gptq-w4-g64", 170.6, 9.4, None, None),
        variant("rtn-w4-g64", 170.6, 11.3, None, None),
        variant("magnitude-50", 538.1, 240.8, None, None),
        variant("magnitude-2of4", 538.1, 2264.6, None, None),
    ]
    fig = figure(close, "size")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    boxes = [
        (text.get_text(), Text.get_window_extent(text, renderer))
        for text in ax.texts
        if text.get_text() in {v["name"] for v in close}
    ]
    assert len(boxes) == len(close)
    for i, (name, box) in enumerate(boxes):
        for other, box2 in boxes[i + 1 :]:
            assert not box.overlaps(box2), f"labels {name} and {other} overlap"
    accuracy = figure(VARIANTS, "size")  # a zero-shot average stays on a linear percent axis
    assert accuracy.axes[0].get_yscale() == "linear"


def test_base_is_counted_at_the_bytes_a_user_ships():
    import torch

    from slimlm.evaluate.footprint import shipped_bytes

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))  # fp32 as loaded
    assert shipped_bytes(model) == (40 + 12 + 3) * 2  # 16-bit weights, not 4 bytes each
    assert shipped_bytes(model.to(torch.bfloat16)) == (40 + 12 + 3) * 2


def test_main_job_defaults_are_calibrated_recipes_each_with_its_purpose():
    import inspect

    from slimlm.api import DEFAULT_RUN_RECIPES, RUN_CALIBRATION, run
    from slimlm.pipeline import recipe_needs
    from slimlm.recipes import load_recipe

    assert inspect.signature(run).parameters["recipes"].default == tuple(DEFAULT_RUN_RECIPES)
    assert inspect.signature(run).parameters["calibration"].default is RUN_CALIBRATION
    calibrated = [name for name in DEFAULT_RUN_RECIPES if "calibration" in recipe_needs(load_recipe(name))]
    assert len(calibrated) >= 3 and not any(name.startswith("magnitude") for name in DEFAULT_RUN_RECIPES)
    assert all(len(purpose) > 20 for purpose in DEFAULT_RUN_RECIPES.values())
    rows = [
        {**variant(name, 100.0, 10.0, None, None), "purpose": purpose} for name, purpose in DEFAULT_RUN_RECIPES.items()
    ]
    from slimlm.report import notes

    lines = notes(rows, CONTEXT)
    assert all(f"row {name}: {purpose}" in lines for name, purpose in DEFAULT_RUN_RECIPES.items())
