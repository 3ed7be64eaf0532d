"""AWQ: the Hessian loss against the explicit output error, the scale and clipping searches against naive loops,
α = 0 is RTN, never worse than RTN by its loss, folding keeps the function, and end to end on tiny models."""

import copy

import pytest
import torch
import transformers
from conftest import TINY_CONFIGS, tiny_model, tiny_tokenizer
from test_quantize import naive_rtn

from slimlm.calibration.stats import InputStats
from slimlm.checkpoint.save import save_model
from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.models.adapters import adapter_for, block_linears, decoder_blocks
from slimlm.models.load import load_model
from slimlm.pipeline import check_recipe, compress_
from slimlm.quantize.awq import (
    AWQConfig,
    awq_clip_quantize,
    awq_scale_candidates,
    awq_search_scale,
    output_error,
    relative_weight_mean,
    scale_groups,
    scaled_quantization_error,
)
from slimlm.quantize.grid import (
    QuantGrid,
    dequantize,
    fake_quantize_in_ranges,
    group_ranges,
)
from slimlm.quantize.linear import QuantizedLinear
from slimlm.quantize.rtn import rtn_quantize
from slimlm.quantize.smoothing import scale_linear_columns_, scale_norm_output_
from slimlm.recipes import load_recipe, parse_recipe
from slimlm.recipes.registry import METHODS

CPU = torch.device("cpu")


def outlier_inputs(n: int, width: int, seed: int, gain: float = 30.0) -> torch.Tensor:
    """(n, width) correlated inputs whose channels 3, 17, 40 (mod width) are `gain` times larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) @ (torch.eye(width) + 0.3 * torch.randn(width, width, generator=g))
    x[:, [3, 17, 40 % width]] *= gain
    return x


def stats_of(x: torch.Tensor) -> InputStats:
    stats = InputStats(x.shape[1], ("hessian", "input_norm"), CPU)
    stats.update(x)
    return stats


def naive_scaled_error(x: torch.Tensor, weights: list[torch.Tensor], scales: torch.Tensor, grid: QuantGrid) -> float:
    """2/N · Σ‖(x/s)·(W·s)ᵀ − (x/s)·Q(W·s)ᵀ‖², the scaled layers run literally."""
    xs = x / scales
    total = 0.0
    for weight in weights:
        scaled = weight * scales
        fake = naive_rtn(scaled, grid.bits, grid.group_size, grid.symmetric)
        total += (xs @ scaled.t() - xs @ fake.t()).pow(2).sum().item()
    return 2 * total / x.shape[0]


def calibration(seed: int = 0) -> CalibrationSet:
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, "x", "random", seed)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def model_with_outliers(arch: str, gain: float = 20.0, **overrides) -> torch.nn.Module:
    """A tiny model whose norms emit a few channels `gain` times larger, readers' columns shrunk to match:
    the same function, but the activation outliers AWQ exists for."""
    config = TINY_CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = adapter_for(model)
    for block in decoder_blocks(model):
        for norm_path, readers in adapter.input_norms:
            norm = block.get_submodule(norm_path)
            scales = torch.ones(norm.weight.shape[0])
            scales[[1, 9, 30]] = 1 / gain
            scale_norm_output_(norm, scales)
            for reader in readers:
                scale_linear_columns_(block.get_submodule(reader), scales)
    return model


# ------------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("grid", [QuantGrid(4, 16, False), QuantGrid(3, None, True), QuantGrid(4, 64, True)])
def test_hessian_loss_is_the_output_error_of_the_scaled_layers(grid):
    x = outlier_inputs(256, 64, seed=0)
    stats = stats_of(x)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(8, 64, generator=g), torch.randn(4, 64, generator=g) * 0.1]
    delta = torch.randn(8, 64, generator=g)
    explicit = 2 / 256 * (x @ delta.t()).pow(2).sum()
    torch.testing.assert_close(output_error(delta, stats.hessian), explicit, rtol=1e-4, atol=0)
    for scales in (torch.ones(64), torch.rand(64, generator=g) * 3 + 0.1):
        got = scaled_quantization_error(weights, stats.hessian, scales, grid).item()
        assert got == pytest.approx(naive_scaled_error(x, weights, scales, grid), rel=1e-4)


@pytest.mark.parametrize("grid", [QuantGrid(4, 16, False), QuantGrid(3, 32, True)])
def test_scale_search_matches_a_naive_loop(grid):
    """s = mean|x|^α, normalised by sqrt(max·min), α = k/n; the one with the smallest literal output error."""
    x = outlier_inputs(256, 64, seed=2)
    x[:, 5] = 0  # a channel that never fires: s floors at 1e-4 instead of 0
    stats = stats_of(x)
    torch.testing.assert_close(stats.mean_abs, x.abs().mean(dim=0))
    weights = [torch.randn(12, 64, generator=torch.Generator().manual_seed(3))]
    best, best_error = None, float("inf")
    for k in range(10):
        s = x.abs().mean(dim=0).pow(k / 10).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = naive_scaled_error(x, weights, s, grid)
        if error < best_error:
            best, best_error = s, error
    torch.testing.assert_close(awq_scale_candidates(stats.mean_abs, 10)[0], torch.ones(64), rtol=0, atol=0)
    torch.testing.assert_close(awq_search_scale(weights, stats.hessian, stats.mean_abs, grid, 10), best)
    assert not torch.equal(best, torch.ones(64))  # the outlier channels made α > 0 pay


def test_duo_scaling_candidates_match_autoawq_and_only_add_to_the_search():
    """s = mean|x|^α / (mean_rows(|w| / group max|w|)^(1-α) + 1e-4), as AutoAWQ writes it; the search over both
    families never ends with a larger loss than the activation-only search."""
    grid = QuantGrid(4, 16, False)
    x = outlier_inputs(256, 64, seed=7, gain=10.0)
    stats = stats_of(x)
    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(8))
    per_group = weight.abs().reshape(12, 4, 16)
    w_mean = (per_group / per_group.amax(dim=-1, keepdim=True)).reshape(12, 64).mean(dim=0)
    torch.testing.assert_close(relative_weight_mean(weight, grid), w_mean)
    for k, candidate in enumerate(awq_scale_candidates(stats.mean_abs, 10, w_mean)):
        s = (x.abs().mean(dim=0).pow(k / 10) / (w_mean.pow(1 - k / 10) + 1e-4)).clamp(min=1e-4)
        torch.testing.assert_close(candidate, s / (s.max() * s.min()).sqrt(), rtol=1e-5, atol=1e-6)
    plain = awq_search_scale([weight], stats.hessian, stats.mean_abs, grid, 10)
    duo = awq_search_scale([weight], stats.hessian, stats.mean_abs, grid, 10, duo_scaling=True)
    assert scaled_quantization_error([weight], stats.hessian, duo, grid) <= scaled_quantization_error(
        [weight], stats.hessian, plain, grid
    )


def test_never_worse_than_rtn_and_much_better_with_outlier_channels():
    """α = 0 (s = 1, RTN) is a candidate and wins ties, so AWQ's loss is ≤ RTN's exactly; with outlier inputs <."""
    grid = QuantGrid(4, 16, False)
    for seed in range(4):
        for gain in (1.0, 30.0):
            x = outlier_inputs(256, 64, seed=seed, gain=gain)
            stats = stats_of(x)
            weights = [torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))]
            s = awq_search_scale(weights, stats.hessian, stats.mean_abs, grid, 20)
            awq = scaled_quantization_error(weights, stats.hessian, s, grid)
            rtn = scaled_quantization_error(weights, stats.hessian, torch.ones(64), grid)
            assert awq <= rtn
            if gain > 1:
                assert naive_scaled_error(x, weights, s, grid) < 0.5 * naive_scaled_error(
                    x, weights, torch.ones(64), grid
                )


@pytest.mark.parametrize("grid", [QuantGrid(4, 16, False), QuantGrid(3, 16, True), QuantGrid(4, None, False)])
def test_clipping_matches_a_naive_search_and_never_increases_a_groups_error(grid):
    g = torch.Generator().manual_seed(4)
    x = outlier_inputs(256, 32, seed=5, gain=3.0)
    hessian = stats_of(x).hessian
    weight = torch.randn(6, 32, generator=g) * (1 + 6 * (torch.rand(6, 32, generator=g) < 0.05))  # heavy tails
    ratios = torch.linspace(1.0, 0.5, 20).tolist()
    codes, scale, zero_point = awq_clip_quantize(weight, hessian, grid, ratios)
    clipped = dequantize(codes, scale, zero_point)
    size = grid.group_size or 32
    expected = torch.empty_like(weight)
    rtn = naive_rtn(weight, grid.bits, grid.group_size, grid.symmetric)
    gained = False
    for row in range(6):
        for start in range(0, 32, size):
            cols = slice(start, start + size)
            w, h = weight[row, cols], hessian[cols, cols]
            best, best_error = None, float("inf")
            for ratio in ratios:
                low, high = min(w.min().item(), 0.0) * ratio, max(w.max().item(), 0.0) * ratio
                fake = naive_rtn(w.clamp(low, high).unsqueeze(0), grid.bits, None, grid.symmetric)[0]
                error = ((w - fake) @ h @ (w - fake)).item()
                if error < best_error:
                    best, best_error = fake, error
            expected[row, cols] = best
            rtn_error = ((w - rtn[row, cols]) @ h @ (w - rtn[row, cols])).item()
            got_error = ((w - clipped[row, cols]) @ h @ (w - clipped[row, cols])).item()
            assert got_error <= rtn_error * (1 + 1e-6)
            gained |= got_error < 0.9 * rtn_error
    torch.testing.assert_close(clipped, expected, rtol=0, atol=1e-6)
    assert gained


@pytest.mark.parametrize(
    "grid", [QuantGrid(4, 16, False), QuantGrid(3, 16, True), QuantGrid(8, None, False), QuantGrid(2, 32, True)]
)
def test_the_searches_fake_quantizer_is_the_grids_rtn_bit_for_bit(grid):
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(7)) * 0.05
    weight[0] = 0  # an all-zero row: the smallest scale, no division by zero
    weight[1] = weight[1].abs()  # a row with nothing below zero
    groups, low, high = group_ranges(weight, grid)
    for ratio in (1.0, 0.8, 0.5):
        clamped = torch.clamp(groups, low * ratio, high * ratio).reshape(weight.shape)
        fake = fake_quantize_in_ranges(groups, low * ratio, high * ratio, grid).reshape(weight.shape)
        assert torch.equal(fake, dequantize(*rtn_quantize(clamped, grid)))


def test_ratio_one_and_alpha_zero_are_rtn():
    grid = QuantGrid(4, 16, False)
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    for got, expected in zip(
        awq_clip_quantize(weight, torch.eye(64), grid, (1.0,)), rtn_quantize(weight, grid), strict=True
    ):
        assert torch.equal(got, expected)
    assert torch.equal(awq_scale_candidates(torch.rand(64) + 0.1, 1), torch.ones(1, 64))


# ------------------------------------------------------------------------------------------------- applier


@pytest.mark.parametrize(
    "arch, overrides, expected",
    [
        ("llama", {}, [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",)]),  # GQA: no v→o
        (
            "llama",
            {"num_key_value_heads": 4},
            [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",)],
        ),
        ("gemma3_text", {}, [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",)]),
        ("phi3", {"num_key_value_heads": 4}, [("qkv_proj",), ("gate_up_proj",), ("o_proj",), ("down_proj",)]),
        ("gpt2", {}, [("c_attn",), ("c_fc",), ("c_proj",)]),  # GELU: no c_fc → c_proj
        ("opt", {}, [("q_proj", "k_proj", "v_proj"), ("fc1",), ("out_proj",), ("fc2",)]),
    ],
)
def test_scale_groups_per_architecture(arch, overrides, expected):
    model = model_with_outliers(arch, **overrides)
    groups = scale_groups(model, block_linears(model, 1))
    assert [tuple(name.rpartition(".")[2] for name in group.readers) for group in groups] == expected
    assert all(name.startswith(f"{adapter_for(model).blocks}.1.") for group in groups for name in group.readers)
    mlp_only = scale_groups(model, {k: v for k, v in block_linears(model, 1).items() if "attn" not in k})
    assert all("attn" not in name for group in mlp_only for name in group.readers)


@pytest.mark.parametrize(
    "arch, overrides",
    [(arch, {}) for arch in sorted(TINY_CONFIGS)]
    + [("llama", {"num_key_value_heads": 4}), ("phi3", {"num_key_value_heads": 4})],
)
def test_folding_the_searched_scales_keeps_the_logits(arch, overrides):
    """quantize: false folds the scales only: same function, different weights (the searched s are not 1)."""
    model = model_with_outliers(arch, **overrides)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    before = logits(model, ids)
    norms_before = {name: p.clone() for name, p in model.named_parameters() if "norm" in name or "ln_" in name}
    compress_(model, parse_recipe([{"method": "awq", "group_size": 32, "quantize": False}], "fold"), calibration())
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    changed = [
        name for name, p in model.named_parameters() if name in norms_before and not torch.equal(p, norms_before[name])
    ]
    assert changed


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "phi3"])
def test_alpha_zero_without_clipping_is_rtn_end_to_end(arch):
    rtn_model, awq_model = tiny_model(arch), tiny_model(arch)
    compress_(rtn_model, parse_recipe([{"method": "rtn", "group_size": 32, "symmetric": False}], "rtn"))
    compress_(
        awq_model,
        parse_recipe(
            [{"method": "awq", "group_size": 32, "alpha_grid": 1, "clip": False, "duo_scaling": False}], "awq"
        ),
        calibration(),
    )
    for index in range(len(decoder_blocks(rtn_model))):
        for (name, a), b in zip(
            block_linears(rtn_model, index).items(), block_linears(awq_model, index).values(), strict=True
        ):
            assert torch.equal(a.weight_q, b.weight_q) and torch.equal(a.weight_scale, b.weight_scale), name
            assert torch.equal(a.weight_zero_point, b.weight_zero_point), name
    ids = calibration(1).input_ids
    assert torch.equal(logits(rtn_model, ids), logits(awq_model, ids))


@pytest.mark.parametrize("arch", ["llama", "opt", "phi3"])
def test_closer_to_dense_than_rtn_on_a_model_with_activation_outliers(arch):
    dense = model_with_outliers(arch)
    ids = calibration(1).input_ids
    expected = logits(dense, ids)
    errors = {}
    for method in ("awq", "rtn"):
        model = copy.deepcopy(dense)
        compress_(
            model, parse_recipe([{"method": method, "group_size": 32, "symmetric": False}], method), calibration()
        )
        errors[method] = (logits(model, ids) - expected).pow(2).mean().item()
    assert errors["awq"] < 0.5 * errors["rtn"], errors


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "phi3", "gpt2", "opt"])
def test_recipe_end_to_end_saves_and_reloads_with_the_same_logits(arch, tmp_path):
    model = tiny_model(arch)
    compress_(model, load_recipe("awq-w4-g64"), calibration())
    linears = [m for index in range(len(decoder_blocks(model))) for m in block_linears(model, index).values()]
    assert linears and all(
        isinstance(m, QuantizedLinear) and not m.grid.symmetric and m.grid.group_size == 64 for m in linears
    )
    ids = calibration(1).input_ids
    expected = logits(model, ids)
    save_model(model, tiny_tokenizer(), tmp_path / "out", {"recipe": "awq-w4-g64"})
    loaded = load_model(str(tmp_path / "out"), device="cpu")
    torch.testing.assert_close(logits(loaded.model, ids), expected, rtol=0, atol=1e-5)


def test_fold_only_stage_lets_a_later_stage_quantize_and_targets_narrow_it():
    model = model_with_outliers("llama")
    q_before = decoder_blocks(model)[0].self_attn.q_proj.weight.clone()
    fold_then_rtn = parse_recipe(
        [{"method": "awq", "group_size": 32, "quantize": False, "targets": "mlp"}, {"method": "rtn", "group_size": 32}],
        "r",
    )
    compress_(model, fold_then_rtn, calibration())
    block = decoder_blocks(model)[0]
    assert all(isinstance(m, QuantizedLinear) for m in block_linears(model, 0).values())
    torch.testing.assert_close(
        block.self_attn.q_proj.dequantized_weight(), dequantize(*rtn_quantize(q_before, QuantGrid(4, 32, True)))
    )
    with pytest.raises(SlimlmError, match="which an earlier stage quantizes"):
        check_recipe(
            tiny_model("llama"),
            parse_recipe([{"method": "awq", "group_size": 32}, {"method": "rtn", "group_size": 32}], "r"),
            True,
        )
    assert METHODS["awq"].quantizes_with(AWQConfig(quantize=False)) is False and METHODS["awq"].quantizes_with(
        AWQConfig()
    )


def test_awq_gptq_recipe_is_shipped_when_gptq_exists():
    if "gptq" not in METHODS:
        pytest.skip("the gptq method is not registered yet")
    stages = load_recipe("awq-gptq-w4-g64").stages
    assert [s.method for s in stages] == ["awq", "gptq"] and not stages[0].quantize
    assert (stages[0].bits, stages[0].group_size, stages[0].symmetric) == (
        stages[1].bits,
        stages[1].group_size,
        stages[1].symmetric,
    )


def test_bad_settings_are_refused_with_a_fix():
    for key, value in (("bits", 9), ("alpha_grid", 0), ("clip_grid", 0), ("group_size", 0)):
        with pytest.raises(SlimlmError, match=f"awq: '{key}' is {value}"):
            AWQConfig(**{key: value})
    with pytest.raises(
        SlimlmError, match="awq: group_size 48 does not divide the input size 64.*use a group_size that divides it"
    ):
        compress_(tiny_model("llama"), parse_recipe([{"method": "awq", "group_size": 48}], "r"), calibration())
    with pytest.raises(SlimlmError, match="method 'awq' needs calibration data"):
        compress_(tiny_model("llama"), load_recipe("awq-w4-g64"))
