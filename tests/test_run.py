"""The main job end to end on a tiny model: one report whose rows agree with the saved models."""

import json

import pytest
from conftest import TEXT, tiny_model, tiny_tokenizer

from slimlm.api import EvalSettings, evaluate, run
from slimlm.checkpoint.save import save_model
from slimlm.errors import SlimlmError


@pytest.fixture
def tiny_dir(tmp_path):
    save_model(tiny_model("qwen2"), tiny_tokenizer(), tmp_path / "tiny", {})
    (tmp_path / "text.txt").write_text(TEXT)
    return tmp_path


def test_run_writes_one_consistent_report(tiny_dir):
    settings = EvalSettings(data=str(tiny_dir / "text.txt"), seqlen=32, max_windows=3, kl_windows=2)
    out = run(
        model=str(tiny_dir / "tiny"),
        recipes=("magnitude-50", "rtn-w4-g64"),
        evaluation=settings,
        out_dir=tiny_dir / "report",
    )
    report = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["base", "magnitude-50", "rtn-w4-g64"]
    markdown = (out / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in names) and "GPTQ protocol" in markdown
    base, pruned, quantized = report["variants"]
    assert base["metrics"]["quality"]["kl_divergence"] is None
    assert pruned["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert pruned["metrics"]["quality"]["kl_divergence"] > 0 and pruned["metrics"]["quality"]["kl_windows"] == 2
    assert base["metrics"]["weight_bytes"] == 2 * base["metrics"]["parameters"]  # the base as shipped: 16-bit
    assert quantized["metrics"]["compression_ratio"] == pytest.approx(
        base["metrics"]["weight_bytes"] / quantized["metrics"]["weight_bytes"]
    )
    assert quantized["metrics"]["compression_ratio"] > 1.0  # 4-bit linears (the tiny model's fp32 embeddings dominate)
    # what the report says about a variant is what its saved model gives
    again = evaluate(quantized["path"], settings, base=str(tiny_dir / "tiny"))
    assert again["quality"]["perplexity"] == pytest.approx(quantized["metrics"]["quality"]["perplexity"], rel=1e-6)
    assert again["quality"]["kl_divergence"] == pytest.approx(
        quantized["metrics"]["quality"]["kl_divergence"], rel=1e-4
    )


def test_run_refuses_bad_recipe_and_existing_output_before_work(tiny_dir):
    (tiny_dir / "exists").mkdir()
    with pytest.raises(SlimlmError, match="already exists"):
        run(model=str(tiny_dir / "tiny"), recipes=("magnitude-50",), out_dir=tiny_dir / "exists")
    with pytest.raises(SlimlmError, match="neither a shipped recipe nor a file"):
        run(model=str(tiny_dir / "tiny"), recipes=("magnitude-50", "nope"), out_dir=tiny_dir / "new")
    assert not (tiny_dir / "new").exists()
