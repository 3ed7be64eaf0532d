"""Every shipped recipe loads and validates; recipe errors name the stage, the key and the allowed values."""

import dataclasses

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import linear_sparsity
from slimlm.pipeline import compress_
from slimlm.recipes import load_recipe, parse_recipe, shipped_recipes
from slimlm.recipes.registry import METHODS


def test_every_shipped_recipe_loads_and_runs_on_a_tiny_model():
    names = shipped_recipes()
    assert {"magnitude-50", "magnitude-2of4", "rtn-w8", "rtn-w4-g64"} <= names.keys()
    tokenizer = tiny_tokenizer()  # what a distill stage reads its data with
    for name in names:
        recipe = load_recipe(name)
        assert recipe.description and recipe.stages
        assert all(stage.method in METHODS for stage in recipe.stages)
        model = tiny_model("llama")
        ids = torch.randint(0, 300, (2, 16))
        # training stages (distill) run 2 short steps here: their full budgets are for real models
        short = tuple(
            dataclasses.replace(s, steps=2, batch_size=2, seqlen=16, warmup=0) if s.method in ("distill", "qat") else s
            for s in recipe.stages
        )
        logs = compress_(
            model,
            dataclasses.replace(recipe, stages=short),
            CalibrationSet(ids, "test", "random ids", 0),
            tokenizer=tokenizer,
        )
        assert [log.method for log in logs] == [stage.method for stage in recipe.stages]


def test_recipe_as_plain_list_and_round_trip():
    recipe = parse_recipe([{"method": "magnitude", "sparsity": 0.25}], "inline")
    assert recipe.to_list() == [
        {"method": "magnitude", "targets": None, "exclude": None, "sparsity": 0.25, "pattern": "unstructured"}
    ]
    assert parse_recipe(recipe.to_list(), "again") == parse_recipe(recipe.to_list(), "again")


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"method": "prune-it"}], f"unknown method 'prune-it'.*known methods: {', '.join(sorted(METHODS))}$"),
        (
            [{"method": "magnitude", "amount": 0.5}],
            "stage 1 \\(magnitude\\): unknown key 'amount'.*allowed keys: targets, exclude, sparsity, pattern",
        ),
        ([{"method": "magnitude", "sparsity": 1.5}], "stage 1: magnitude: 'sparsity' is 1.5, outside \\[0.0, 1.0\\)"),
        ([{"method": "magnitude", "sparsity": float("nan")}], "'sparsity' is nan, outside"),
        ([{"method": "rtn", "bits": 0}], "rtn: 'bits' is 0, outside \\[2, 8\\]"),
        ([{"method": "rtn", "bits": "four"}], "'bits' is 'four', expected int"),
        ([{"method": "magnitude", "pattern": 124}], "quote it"),
        ([{"method": "magnitude", "targets": "mlp("}], "not a valid regular expression"),
        ([{"method": "magnitude"}, {"sparsity": 0.5}], "stage 2: a stage must be a mapping with a 'method' key"),
        ([], "has no stages"),
    ],
)
def test_recipe_errors_name_stage_key_and_fix(stages, message):
    with pytest.raises(SlimlmError, match=message):
        parse_recipe(stages, "bad")


def test_unknown_recipe_name_lists_shipped(tmp_path):
    with pytest.raises(SlimlmError, match="shipped recipes: .*magnitude-2of4"):
        load_recipe("no-such-recipe")
    broken = tmp_path / "broken.yaml"
    broken.write_text("- method: [unclosed\n")
    with pytest.raises(SlimlmError, match="not valid YAML"):
        load_recipe(str(broken))


def test_group_size_must_divide_every_layer_before_anything_changes():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = parse_recipe([{"method": "magnitude"}, {"method": "rtn", "group_size": 48}], "bad-group")
    with pytest.raises(SlimlmError, match="group_size 48 does not divide the input size 64"):
        compress_(model, recipe)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # stage 1 did not run either


def test_calibrated_method_without_data_is_refused():
    with pytest.raises(SlimlmError, match="method 'wanda' needs calibration data"):
        compress_(tiny_model("llama"), load_recipe("wanda-50"))


def test_quantized_layers_cannot_be_edited_by_a_later_stage():
    recipe = parse_recipe([{"method": "rtn", "group_size": 32}, {"method": "magnitude"}], "wrong-order")
    with pytest.raises(SlimlmError, match="put quantization stages last"):
        compress_(tiny_model("qwen2"), recipe)


def test_targets_select_layers():
    model = tiny_model("llama")
    compress_(model, parse_recipe([{"method": "magnitude", "sparsity": 0.5, "targets": r"mlp\."}], "mlp-only"))
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5
    assert float((model.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == 0.0
    assert 0 < linear_sparsity(model) < 0.5
    with pytest.raises(SlimlmError, match="matches no layer"):
        compress_(model, parse_recipe([{"method": "magnitude", "targets": "nothing-here"}], "none"))


def test_structured_stage_after_quantization_is_refused_even_behind_another_structured_stage():
    stages = [{"method": "width", "mlp": 0.25}, {"method": "rtn", "group_size": 32}, {"method": "depth", "blocks": 1}]
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match="changes the architecture after a quantization stage"):
        compress_(
            model,
            parse_recipe(stages, "late-depth"),
            CalibrationSet(torch.randint(0, 300, (2, 16)), "test", "random ids", 0),
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_key_parses_and_bad_values_are_named():
    stages = [{"method": "rtn", "bits": 4, "group_size": 32}]
    assert parse_recipe({"stages": stages}, "r").export is None
    assert parse_recipe({"stages": stages, "export": "gguf"}, "r").export.format == "gguf"
    step = parse_recipe({"stages": stages, "export": {"format": "gguf", "gguf_type": "q4_0"}}, "r").export
    assert (step.format, step.gguf_type) == ("gguf", "q4_0")
    for export, message in [
        ("onnx", "unknown format 'onnx'"),
        ({"format": "gguf", "gguf_type": "iq2_xxs"}, "gguf_type 'iq2_xxs'"),
        ({"format": "hf", "gguf_type": "q4_0"}, "gguf_type 'q4_0'"),
        ({"format": "gguf", "bits": 4}, "unknown key 'bits'"),
        (3, "expected a format"),
    ]:
        with pytest.raises(SlimlmError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_recipe({"stages": stages, "export": export}, "r")
