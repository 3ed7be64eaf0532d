"""Per-layer sensitivity (KL when one linear alone is compressed) and mixed precision via targets / exclude."""

import json

import pytest
import torch
from conftest import TEXT, run_cli, tiny_model, tiny_tokenizer

from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.evaluate.perplexity import EvalWindows, evaluate_quality
from slimlm.models.adapters import block_linears
from slimlm.pipeline import check_recipe, compress_
from slimlm.quantize.linear import QuantizedLinear
from slimlm.quantize.rtn import RTNConfig, quantize_rtn_
from slimlm.recipes import parse_recipe, parse_stage
from slimlm.sensitivity import layer_sensitivity
from slimlm.stage import StageConfig

W4 = RTNConfig(bits=4, group_size=32, symmetric=False)


def windows(n: int = 2, seqlen: int = 16) -> EvalWindows:
    ids = torch.randint(3, 300, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return EvalWindows(input_ids=ids, source="random ids", seqlen=seqlen, total_windows=n)


def all_linears(model) -> list[str]:
    return [name for index in range(2) for name in block_linears(model, index)]


def test_ranking_covers_every_linear_and_is_deterministic():
    model = tiny_model("qwen2")
    first = layer_sensitivity(model, windows(), W4)
    second = layer_sensitivity(model, windows(), W4)
    assert first == second
    assert sorted(row.name for row in first.layers) == sorted(all_linears(model))
    kls = [row.kl_divergence for row in first.layers]
    assert kls == sorted(kls, reverse=True) and kls[-1] > -1e-6  # KL ≥ 0 up to float32 rounding
    assert first.stage == {
        "method": "rtn",
        "targets": None,
        "exclude": None,
        "bits": 4,
        "group_size": 32,
        "symmetric": False,
    }


def test_kl_equals_quantizing_that_layer_alone_by_hand():
    model = tiny_model("llama")
    table = layer_sensitivity(model, windows(), W4)
    row = table.layers[3]
    _, reference = evaluate_quality(model, windows(), keep_reference=2, progress=False)
    quantize_rtn_(model, {row.name: model.get_submodule(row.name)}, W4)
    quality, _ = evaluate_quality(model, windows(), reference=reference, progress=False)
    assert row.kl_divergence == pytest.approx(quality.kl_divergence, rel=1e-6)
    assert row.perplexity == pytest.approx(quality.perplexity, rel=1e-6)


def test_a_layer_with_huge_outliers_ranks_first():
    model = tiny_model("llama", seed=1)
    victim = "model.layers.0.self_attn.o_proj"
    with torch.no_grad():
        weight = model.get_submodule(victim).weight
        weight.mul_(20)
        weight[:, ::32] *= 50  # one outlier per group of 32: the other 31 weights round to (almost) nothing
    table = layer_sensitivity(model, windows(), W4)
    assert table.layers[0].name == victim
    assert table.layers[0].kl_divergence > 3 * table.layers[1].kl_divergence


@pytest.mark.parametrize("stage", [W4, parse_stage({"method": "sparsegpt", "sparsity": 0.5}, "test")])
def test_restoring_leaves_the_model_unchanged(stage):
    model = tiny_model("phi3")
    modules = dict(model.named_modules())
    state = {key: value.clone() for key, value in model.state_dict().items()}
    ids = windows().input_ids
    with torch.no_grad():
        before = model(ids).logits
    calibration = CalibrationSet(ids, "test", "random ids", 0)
    layer_sensitivity(model, windows(), stage, calibration)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(module is modules[name] for name, module in model.named_modules())
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_targets_limit_the_layers_and_bad_stages_are_refused():
    model = tiny_model("llama")
    table = layer_sensitivity(model, windows(), RTNConfig(bits=4, group_size=32, targets=r"mlp\.down_proj"))
    assert [row.projection for row in table.layers] == ["mlp.down_proj", "mlp.down_proj"]
    with pytest.raises(SlimlmError, match="not applied one linear at a time"):
        layer_sensitivity(model, windows(), parse_stage({"method": "depth"}, "test"))
    with pytest.raises(SlimlmError, match="needs calibration data"):
        layer_sensitivity(model, windows(), parse_stage({"method": "wanda"}, "test"))
    with pytest.raises(SlimlmError, match="group_size 48 does not divide"):
        layer_sensitivity(model, windows(), RTNConfig(group_size=48))
    with pytest.raises(SlimlmError, match="matches no layer"):
        layer_sensitivity(model, windows(), RTNConfig(group_size=32, targets="nothing"))


def test_exclude_selects_everything_but_its_matches():
    config = StageConfig(targets="mlp", exclude=r"down_proj|layers\.0\.")
    assert config.selects("model.layers.1.mlp.up_proj")
    assert not config.selects("model.layers.1.mlp.down_proj")
    assert not config.selects("model.layers.0.mlp.up_proj")
    assert not config.selects("model.layers.1.self_attn.q_proj")
    with pytest.raises(SlimlmError, match="'exclude' is not a valid regular expression"):
        parse_stage({"method": "rtn", "exclude": "mlp("}, "test")


def test_mixed_precision_recipe_gives_each_layer_its_own_bits():
    sensitive = r"mlp\.down_proj|layers\.0\.self_attn\.v_proj"
    recipe = parse_recipe(
        [
            {"method": "rtn", "bits": 8, "group_size": 32, "targets": sensitive},
            {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False, "exclude": sensitive},
        ],
        "mixed",
    )
    model = tiny_model("llama")
    compress_(model, recipe)
    for name in all_linears(model):
        module = model.get_submodule(name)
        assert isinstance(module, QuantizedLinear)
        expected = 8 if ("down_proj" in name or name == "model.layers.0.self_attn.v_proj") else 4
        assert module.grid.bits == expected, name


def test_a_layer_matched_by_two_quantization_stages_is_refused():
    recipe = parse_recipe(
        [
            {"method": "rtn", "bits": 8, "group_size": None, "targets": "mlp"},
            {"method": "rtn", "bits": 4, "group_size": 32, "exclude": "up_proj"},
        ],
        "overlap",
    )
    with pytest.raises(SlimlmError, match="which an earlier stage quantizes"):
        check_recipe(tiny_model("llama"), recipe, has_calibration=False)


def test_cli_prints_the_table_and_writes_json(tmp_path):
    model_dir, text = tmp_path / "tiny", tmp_path / "text.txt"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text.write_text(TEXT)
    out = tmp_path / "sens.json"
    result = run_cli(
        "sensitivity",
        model_dir,
        "--bits",
        "4",
        "--group-size",
        "32",
        "--asymmetric",
        "--data",
        text,
        "--seqlen",
        "32",
        "--windows",
        "2",
        "--top",
        "3",
        "--json",
        out,
    )
    assert result.returncode == 0, result.stdout
    assert "model.layers." in result.stdout and "mean KL by projection" in result.stdout
    saved = json.loads(out.read_text())
    assert len(saved["layers"]) == 14 and saved["stage"]["symmetric"] is False
    assert saved["layers"][0]["kl_divergence"] >= saved["layers"][-1]["kl_divergence"]
    bad = run_cli("sensitivity", model_dir, "--method", "depth", "--data", text, "--seqlen", "32")
    assert bad.returncode == 2 and "unknown key 'bits'" in bad.stdout


def test_help_has_runnable_examples():
    result = run_cli("sensitivity", "--help")
    assert result.returncode == 0 and "slimlm sensitivity smollm2-135m --method rtn --bits 4" in result.stdout
