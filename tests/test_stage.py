"""The stage contract: the import graph it promises, what each stage leaves in its log, the CLI's settings."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_model

from slimlm.data.calibration import CalibrationSet
from slimlm.pipeline import compress_, recipe_needs
from slimlm.recipes import load_recipe, parse_recipe
from slimlm.recipes.registry import METHODS
from slimlm.settings import CalibrationSettings, EvalSettings, SettingError
from slimlm.stage import Stage

PACKAGE = Path(__file__).resolve().parents[1] / "slimlm"
FAMILIES = ("calibration", "data", "distill", "evaluate", "models", "prune", "quantize", "train")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("family", FAMILIES)
def test_no_method_family_imports_up_into_recipes_pipeline_or_api(family):
    upward = ("slimlm.recipes", "slimlm.pipeline", "slimlm.api", "slimlm.cli", "slimlm.sensitivity")
    for path in (PACKAGE / family).rglob("*.py"):
        bad = sorted(name for name in imported_modules(path) if name.startswith(upward))
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_the_stage_module_sits_at_the_bottom():
    assert {name for name in imported_modules(PACKAGE / "stage.py") if name.startswith("slimlm")} <= {
        "slimlm.errors",
        "slimlm.data.calibration",  # for type checking only
    }


def test_every_row_names_a_stage_record_of_its_config():
    for name in METHODS:
        stage = METHODS[name]
        assert isinstance(stage, Stage) and stage.config.method == name
        assert stage.scope in ("block", "model")


def test_the_command_line_and_the_method_table_import_no_torch():
    probe = "import sys, slimlm.cli, slimlm.recipes.registry; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_importing_slimlm_leaves_the_environment_alone():
    probe = "import os; before = dict(os.environ); import slimlm.api; print(dict(os.environ) == before)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
        == "True"
    )


def test_loading_restores_transformers_logging(tmp_path):
    from transformers.utils import logging as hf_logging

    from slimlm.models.load import load_model

    model = tiny_model("llama")
    from conftest import tiny_tokenizer

    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    hf_logging.set_verbosity_info()
    try:
        load_model(str(tmp_path / "m"))
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_what_rotate_depth_and_width_did_reaches_their_logs():
    ids = CalibrationSet(torch.randint(0, 300, (2, 16)), "test", "random ids", 0)
    rotate = compress_(tiny_model("llama"), parse_recipe([{"method": "rotate"}], "r"))[0].details
    assert rotate["residual"].startswith("random Hadamard 64×64") and rotate["value_heads"].startswith(
        "random Hadamard 16×16"
    )
    model = tiny_model("qwen2")
    depth = compress_(model, parse_recipe([{"method": "depth", "fraction": 0.5}], "d"), ids)[0].details
    assert len(depth["removed_blocks"]) == 1 and len(model.model.layers) == 1
    width = compress_(tiny_model("llama"), load_recipe("width-25pct"), ids)[0].details
    assert width["mlp_channels_kept"] == [72, 72]  # 128 channels, 43.75% removed


def test_the_pipeline_says_what_a_recipe_needs():
    assert recipe_needs(load_recipe("rtn-w4-g64")) == set()
    assert recipe_needs(load_recipe("wanda-50")) == {"calibration"}
    assert recipe_needs(load_recipe("minitron-25")) == {"calibration", "base"}


def test_settings_refuse_bad_values_naming_the_field():
    with pytest.raises(SettingError, match=r"CalibrationSettings.samples is 0: must be at least 1 — pass samples=128"):
        CalibrationSettings(samples=0)
    with pytest.raises(SettingError, match=r"EvalSettings.max_windows is 0"):
        EvalSettings(max_windows=0)


@pytest.mark.parametrize(
    "args, flag",
    [
        (("--calib-samples", "0"), "--calib-samples 0"),
        (("--calib-seqlen", "1"), "--calib-seqlen 1"),
        (("--windows", "0"), "--windows 0"),
        (("--seqlen", "1"), "--seqlen 1"),
    ],
)
def test_cli_errors_name_the_flag_the_user_typed(tmp_path, args, flag):
    result = run_cli("compress", "smollm2-135m", "--recipe", "wanda-50", "--out", tmp_path / "out", *args)
    assert result.returncode == 2
    assert flag in result.stdout and "n_samples" not in result.stdout and "Traceback" not in result.stdout
    assert not (tmp_path / "out").exists()


def test_recipes_json_lists_recipes_and_methods():
    result = subprocess.run(
        [sys.executable, "-m", "slimlm.cli", "recipes", "--json"], capture_output=True, text=True, check=True
    )
    listing = json.loads(result.stdout)
    by_name = {recipe["name"]: recipe for recipe in listing["recipes"]}
    assert by_name["minitron-25"]["stages"] == ["width", "distill"]
    assert set(listing["methods"]) == set(METHODS)
    one = json.loads(
        subprocess.run(
            [sys.executable, "-m", "slimlm.cli", "recipes", "rtn-w8", "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert one["stages"] == load_recipe("rtn-w8").to_list()


def module_graph() -> dict[str, set[str]]:
    """slimlm module -> the slimlm modules it imports, at the top or inside functions (type-checking-only imports
    left out: they never run)."""
    modules = {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        type_only = {
            id(node)
            for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
            for statement in branch.body
            for node in ast.walk(statement)
        }
        imported = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_no_import_loop_anywhere():
    """Not even one held shut by an import inside a function: every room can be read from the bottom up."""
    graph = module_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph[module]):
            assert state.get(imported) != 1, "import loop: " + " -> ".join(path[path.index(imported) :] + [imported])
            if imported not in state:
                visit(imported, path + [imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_saved_format_is_one_room_above_the_quantizers():
    """slimlm/checkpoint/ writes and reads the format and counts its bytes; the methods below it never import it, and
    it never imports the rooms above it (the loader, export, search, the API)."""
    graph = module_graph()
    below = (
        "slimlm.quantize",
        "slimlm.prune",
        "slimlm.distill",
        "slimlm.calibration",
        "slimlm.train",
        "slimlm.stage",
        "slimlm.data",
    )
    for module, imported in graph.items():
        if module.startswith(below):
            assert not any(name.startswith("slimlm.checkpoint") for name in imported), (
                f"{module} imports the saved format"
            )
    above = (
        "slimlm.models.load",
        "slimlm.export",
        "slimlm.search",
        "slimlm.api",
        "slimlm.cli",
        "slimlm.recipes",
        "slimlm.pipeline",
        "slimlm.finetune",
        "slimlm.serve",
    )
    for module, imported in graph.items():
        if module.startswith("slimlm.checkpoint"):
            assert not any(name.startswith(above) for name in imported), (
                f"{module} imports {sorted(n for n in imported if n.startswith(above))}"
            )


def test_only_the_saved_format_names_its_files():
    """The manifest's and the weights' file names are declared in slimlm/checkpoint/ and used through its constants."""
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name != "checkpoint":
            text = path.read_text()
            assert '"slimlm.json"' not in text and '"model.safetensors"' not in text, path.relative_to(PACKAGE)
