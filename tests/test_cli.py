"""The `slimlm` command line as a user runs it: a subprocess, on a tiny random Llama saved to a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEXT, run_cli

from slimlm.recipes import load_recipe, shipped_recipes
from slimlm.recipes.registry import METHODS


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout
    assert "Traceback" not in result.stdout
    return result.stdout


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("verb", [None, "run", "compress", "eval", "recipes"])
def test_help_has_examples(verb):
    out = ok(run_cli(*([verb] if verb else []), "--help"))
    assert "Examples" in out
    examples = out.split("Examples", 1)[1]
    assert f"slimlm {verb or ''}".strip() in examples  # a runnable line of this very verb


def test_recipes_lists_every_shipped_recipe():
    out = ok(run_cli("recipes"))
    names = list(shipped_recipes())
    assert {"magnitude-2of4", "magnitude-50", "rtn-w8", "rtn-w4-g64"} <= set(names)
    for name in names:
        assert name in out
        assert load_recipe(name).description[:30] in " ".join(out.split())  # rich may wrap long descriptions
    for method in METHODS:  # and the methods a stage can name
        assert f"│ {method} " in out


def test_recipes_shows_one_recipe_stages():
    out = ok(run_cli("recipes", "magnitude-2of4"))
    assert "magnitude-2of4" in out
    assert "1. method=magnitude" in out
    assert "pattern=2:4" in out


def test_compress_then_eval(hf_dir, text_file, tmp_path):
    out = tmp_path / "tiny-2of4"
    printed = ok(
        run_cli(
            "compress",
            hf_dir,
            "--recipe",
            "magnitude-2of4",
            "--out",
            out,
            "--windows",
            "1",
            "--seqlen",
            "32",
            "--eval-data",
            text_file,
        )
    )
    assert "perplexity" in printed and f"saved: {out}" in printed
    assert {"config.json", "model.safetensors", "slimlm.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir())  # no staging dir left

    manifest = json.loads((out / "slimlm.json").read_text())
    assert manifest["recipe"]["name"] == "magnitude-2of4"
    assert manifest["recipe"]["stages"][0]["pattern"] == "2:4"
    assert manifest["base_model"]["source"] == str(hf_dir)
    assert {"torch", "transformers", "slimlm", "python"} <= manifest["versions"].keys()
    metrics = manifest["metrics"]
    assert metrics["sparsity"] == pytest.approx(0.5)
    assert metrics["base"]["windows"] == metrics["compressed"]["windows"] == 1
    assert metrics["base"]["perplexity"] > 1 and metrics["compressed"]["perplexity"] > 1
    assert metrics["compressed"]["kl_divergence"] > 0

    report = tmp_path / "eval.json"
    ok(run_cli("eval", out, "--data", text_file, "--seqlen", "32", "--windows", "1", "--json", report))
    result = json.loads(report.read_text())
    # Same text, seqlen and first window: the saved model reloads to the perplexity measured before saving.
    assert result["quality"]["perplexity"] == pytest.approx(metrics["compressed"]["perplexity"], rel=1e-5)
    assert result["quality"]["windows"] == 1 and result["sparsity"] == pytest.approx(0.5)
    assert result["storage"]["weight_bytes"] == manifest["storage"]["weight_bytes"]


def test_recipe_export_key_writes_the_engine_file_beside_the_model(hf_dir, tmp_path):
    recipe = tmp_path / "rtn-gguf.yaml"
    recipe.write_text("stages:\n  - method: rtn\n    bits: 4\n    group_size: 32\n    symmetric: false\nexport: gguf\n")
    out = tmp_path / "smol"
    printed = ok(run_cli("compress", hf_dir, "--recipe", recipe, "--out", out, "--no-eval"))
    assert (tmp_path / "smol.gguf").is_file() and f"exported (gguf): {out}.gguf" in printed.replace("\n", "")
    reader = __import__("gguf").GGUFReader(tmp_path / "smol.gguf")
    assert any(t.tensor_type.name == "Q4_1" for t in reader.tensors)  # the RTN codes, kept as Q4_1 blocks


@pytest.mark.parametrize("target", ["gguf", "compressed-tensors"])
def test_recipe_export_from_memory_equals_exporting_the_saved_model(hf_dir, tmp_path, target):
    """compress hands the model it just saved to the exporter instead of reading it back: same bytes either way."""
    from slimlm.api import compress, export

    recipe = tmp_path / "rtn.yaml"
    recipe.write_text(
        f"stages:\n  - method: rtn\n    bits: 4\n    group_size: 32\n    symmetric: false\nexport: {target}\n"
    )
    manifest = compress(model=str(hf_dir), recipe=str(recipe), out=tmp_path / "smol", evaluation=None)
    written = Path(manifest["export"]["path"])
    again = tmp_path / ("again.gguf" if target == "gguf" else "again")
    export(model=str(tmp_path / "smol"), format=target, out=again)
    if target == "gguf":
        assert written.read_bytes() == again.read_bytes()
    else:
        assert (written / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_eval_json_dash_prints_the_results_on_stdout(hf_dir, text_file):
    env = {**os.environ, "SLIMLM_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "slimlm.cli",
        "eval",
        str(hf_dir),
        "--data",
        text_file,
        "--seqlen",
        "32",
        "--windows",
        "1",
        "--json",
        "-",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["quality"]["windows"] == 1  # stdout is the JSON alone; the table went to stderr


def test_compress_prints_and_saves_what_the_depth_stage_did(hf_dir, tmp_path):
    out = tmp_path / "shallow"
    printed = ok(
        run_cli(
            "compress",
            hf_dir,
            "--recipe",
            "depth-33pct",
            "--out",
            out,
            "--no-eval",
            "--calib-samples",
            "2",
            "--calib-seqlen",
            "16",
        )
    )
    removed = json.loads((out / "slimlm.json").read_text())["stages"][0]["details"]["removed_blocks"]
    assert len(removed) == 1 and f"depth: removed_blocks {removed}" in printed
