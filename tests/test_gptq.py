"""GPTQ against a naive column-by-column OBQ loop written here, its invariants (identity Hessian = RTN, static
groups under act_order, dead inputs), dampening retries, the true-sequential engine, and end to end on tiny
models of several architectures: quantized, saved, reloaded."""

import copy

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from slimlm.calibration.sequential import calibrate_sequentially, execution_groups
from slimlm.calibration.stats import InputStats
from slimlm.checkpoint.save import save_model
from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.models.adapters import (
    adapter_for,
    block_linears,
    decoder_blocks,
    linear_weight,
)
from slimlm.models.load import load_model
from slimlm.pipeline import compress_
from slimlm.quantize.gptq import GPTQConfig, gptq_quantize, quantize_gptq_
from slimlm.quantize.grid import (
    QuantGrid,
    choose_qparams,
    clip_by_error,
    dequantize,
    quantize_with,
    shrink_ratios,
)
from slimlm.quantize.linear import QuantizedLinear
from slimlm.quantize.rtn import rtn_quantize
from slimlm.recipes import load_recipe, parse_recipe

GRIDS = [
    QuantGrid(4, None, True),
    QuantGrid(4, 16, False),
    QuantGrid(3, 16, True),
    QuantGrid(8, None, False),
    QuantGrid(2, 8, False),
]


def naive_gptq(weight, hessian, grid, act_order=False, dampening=0.01):
    """Column by column in float64, with the explicit inverse of the free columns' Hessian at every step.

    When column j is quantized, the columns still free are F = j.. (in visiting order) with Hessian H[F, F]; OBQ
    moves them by −(w_j − q_j) · [H[F, F]⁻¹]_{0,:} / [H[F, F]⁻¹]_{0,0}. Quantization parameters: per channel from
    the original rows; groups from the group's current (updated) columns when its first column is reached; with
    act_order, columns are visited by descending H_jj and every group's parameters come from the original rows.
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += dampening * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out_features, in_features = W.shape
    group = grid.group_size or in_features
    order = sorted(range(in_features), key=lambda c: -H[c, c].item()) if act_order else list(range(in_features))
    static = grid.group_size is None or act_order
    scale, zero_point = choose_qparams(W.float(), grid)  # replaced group by group below unless static
    codes = torch.zeros(out_features, in_features, dtype=torch.int8)
    for step, j in enumerate(order):
        free = order[step:]
        inverse = torch.linalg.inv(H[free][:, free])
        g = j // group
        if not static and j % group == 0:
            s, z = choose_qparams(W[:, j : j + group].float(), QuantGrid(grid.bits, None, grid.symmetric))
            scale[:, g] = s[:, 0]
            if z is not None:
                zero_point[:, g] = z[:, 0]
        s = scale[:, g].double()
        z = zero_point[:, g].double() if zero_point is not None else torch.zeros_like(s)
        c = torch.clamp(torch.round(W[:, j].float().double() / s) + z, grid.qmin, grid.qmax)
        codes[:, j] = c.to(torch.int8)
        q = (c - z) * s
        W[:, free] -= torch.outer((W[:, j] - q) / inverse[0, 0], inverse[0, :])
    return codes, scale, zero_point


def correlated_inputs(n: int, in_features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_features, generator=g) @ torch.randn(in_features, in_features, generator=g)  # (n, in)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_is_rtn(grid, act_order):
    """With H = I no column informs another: GPTQ is round-to-nearest, scales and codes bit for bit."""
    torch.manual_seed(grid.bits)
    weight = torch.randn(12, 48) * 0.05
    got = gptq_quantize(weight, torch.eye(48), grid, block_size=16, act_order=act_order)
    expected = rtn_quantize(weight, grid)
    for a, b in zip(got, expected):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_with_clipping_is_rtn_of_the_mse_clipped_weights(grid, act_order):
    """The clip search only picks the qparams: with H = I, GPTQ is RTN with each group's MSE-best clipped range
    (fixed order: per group, from the weights at the group's start, which H = I leaves untouched)."""
    torch.manual_seed(grid.bits + 1)
    weight = torch.randn(12, 48) * 0.05
    ratios = shrink_ratios()
    codes, scale, zero_point = gptq_quantize(
        weight, torch.eye(48), grid, block_size=16, act_order=act_order, clip_ratios=ratios
    )
    clipped_scale, clipped_zero = choose_qparams(clip_by_error(weight, grid, ratios), grid)
    assert torch.equal(scale, clipped_scale) and (zero_point is None or torch.equal(zero_point, clipped_zero))
    assert torch.equal(codes, quantize_with(weight, clipped_scale, clipped_zero, grid))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_clip_by_error_never_raises_a_groups_rounding_error(grid):
    torch.manual_seed(3)
    weight = torch.randn(16, 48)

    def group_errors(clipped: torch.Tensor) -> torch.Tensor:
        s, z = choose_qparams(clipped, grid)
        delta = dequantize(quantize_with(weight, s, z, grid), s, z) - weight
        return delta.square().reshape(16, grid.group_count(48), -1).sum(-1)

    plain = group_errors(weight)
    clipped = group_errors(clip_by_error(weight, grid, shrink_ratios()))
    assert torch.equal(clip_by_error(weight, grid, (1.0,)), weight)
    assert bool((clipped <= plain * (1 + 1e-6)).all())
    if grid.bits <= 4:  # a Gaussian group's min/max range is wider than its MSE-best one at few levels
        assert float(clipped.sum()) < float(plain.sum())


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("block_size", [128, 12, 5])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_naive_obq_loop(grid, block_size, act_order):
    """Blocks, lazy updates and the Cholesky trick reorder the arithmetic only (groups that straddle blocks too)."""
    torch.manual_seed(0)
    weight = torch.randn(10, 48)
    hessian = hessian_of(correlated_inputs(200, 48, seed=1))
    codes, scale, zero_point = gptq_quantize(weight, hessian, grid, block_size=block_size, act_order=act_order)
    ref_codes, ref_scale, ref_zero_point = naive_gptq(weight, hessian, grid, act_order)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (10, grid.group_count(48))
    assert int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax
    assert torch.equal(codes, ref_codes)
    # Scales of later groups come from error-updated fp32 weights; the reordered sums can put one on the other side
    # of an fp16 rounding boundary (seen on one CPU's MKL kernels): at most one fp16 step apart, never more.
    assert torch.allclose(scale.float(), ref_scale.float(), rtol=2**-10, atol=0)
    assert (zero_point is None) == grid.symmetric and (zero_point is None or torch.equal(zero_point, ref_zero_point))


@pytest.mark.parametrize("grid", [QuantGrid(4, 16, False), QuantGrid(3, 8, True)], ids=str)
def test_act_order_keeps_static_groups_in_the_standard_layout(grid):
    """act_order visits columns out of order, but group k still holds original columns k·g.. with the scale
    chosen from the original weights, so the result dequantizes with the standard (no g_idx) layout."""
    torch.manual_seed(0)
    weight = torch.randn(8, 48)
    x = correlated_inputs(300, 48, seed=2) * torch.linspace(0.1, 3, 48)[torch.randperm(48)]  # diag(H) far from sorted
    hessian = hessian_of(x)
    codes, scale, zero_point = gptq_quantize(weight, hessian, grid, block_size=16, act_order=True)
    static_scale, static_zero_point = choose_qparams(weight, grid)
    assert torch.equal(scale, static_scale)
    assert zero_point is None or torch.equal(zero_point, static_zero_point)
    # a diagonal Hessian has no cross terms: any visiting order then gives RTN, group by group in place
    diagonal = torch.diag(hessian.diagonal())
    assert torch.equal(gptq_quantize(weight, diagonal, grid, act_order=True)[0], rtn_quantize(weight, grid)[0])
    # and it is worth it: the output error is below RTN's
    error = ((weight - dequantize(codes, scale, zero_point)) @ x.t()).norm()
    rtn_error = ((weight - dequantize(*rtn_quantize(weight, grid))) @ x.t()).norm()
    assert error < rtn_error


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_below_rtn_on_correlated_inputs(grid, act_order):
    """‖(W − Ŵ)X‖ on the calibration inputs, the quantity GPTQ minimises greedily, beats round-to-nearest."""
    torch.manual_seed(1)
    weight = torch.randn(32, 64)
    x = correlated_inputs(512, 64, seed=3)
    codes, scale, zero_point = gptq_quantize(weight, hessian_of(x), grid, act_order=act_order)
    error = ((weight - dequantize(codes, scale, zero_point)) @ x.t()).norm()
    rtn_error = ((weight - dequantize(*rtn_quantize(weight, grid))) @ x.t()).norm()
    assert error < 0.9 * rtn_error, (error, rtn_error)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs_are_zeroed_and_the_callers_hessian_is_left_alone(act_order):
    torch.manual_seed(0)
    weight = torch.randn(6, 32)
    x = correlated_inputs(100, 32, seed=4)
    x[:, [3, 17]] = 0  # two input channels that never fire
    hessian = hessian_of(x)
    codes, scale, zero_point = gptq_quantize(weight, hessian, QuantGrid(4, 16, False), act_order=act_order)
    assert torch.all(dequantize(codes, scale, zero_point)[:, [3, 17]] == 0)
    assert hessian[3, 3] == 0
    ref = naive_gptq(weight, hessian, QuantGrid(4, 16, False), act_order)
    assert torch.equal(codes, ref[0])


def test_dampening_is_raised_tenfold_until_the_hessian_factorizes():
    """A Hessian with a small negative eigenvalue (rounding, too few tokens) fails at δ = 0.01 but factorizes at
    0.1: the result is the one at 0.1. A hopeless one fails with a clear error after the retries."""
    torch.manual_seed(0)
    n = 32
    basis, _ = torch.linalg.qr(torch.randn(n, n))
    eigenvalues = torch.ones(n)
    eigenvalues[0] = -0.03  # mean(diag H) ≈ 0.97: +0.0097 is not enough, +0.097 is
    hessian = basis @ torch.diag(eigenvalues) @ basis.t()
    assert torch.linalg.cholesky_ex(hessian + 0.01 * hessian.diagonal().mean() * torch.eye(n))[1] != 0
    weight = torch.randn(4, n)
    grid = QuantGrid(4, 16, True)
    retried = gptq_quantize(weight, hessian, grid, dampening=0.01)
    direct = gptq_quantize(weight, hessian, grid, dampening=0.1)
    assert all(torch.equal(a, b) for a, b in zip(retried[:2], direct[:2]))
    with pytest.raises(
        SlimlmError,
        match=r"gptq: the dampened Hessian is not positive definite .*dampening raised to 1\b.*raise 'dampening'",
    ):
        gptq_quantize(weight, -torch.eye(n), grid)


def test_bad_settings_and_inputs_are_refused():
    for values, match in [
        ({"bits": 1}, "gptq: 'bits' is 1, outside \\[2, 8\\]"),
        ({"bits": 9}, "'bits' is 9"),
        ({"group_size": 0}, "'group_size' is 0"),
        ({"block_size": 0}, "'block_size' is 0"),
        ({"dampening": 0.0}, "'dampening' is 0.0, outside \\(0, 1\\]"),
    ]:
        with pytest.raises(SlimlmError, match=match):
            GPTQConfig(**values)
    with pytest.raises(SlimlmError, match="group_size 48 does not divide the input size 64"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), QuantGrid(4, 48, True))
    with pytest.raises(SlimlmError, match="do not match"):
        gptq_quantize(torch.randn(4, 64), torch.eye(32), QuantGrid(4, 32, True))
    with pytest.raises(SlimlmError, match="NaN or Inf"):
        gptq_quantize(torch.full((4, 64), float("nan")), torch.eye(64), QuantGrid(4, 32, True))
    # through a recipe: refused by name before any layer changes
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = CalibrationSet(torch.randint(0, 300, (2, 16)), "x", "random", 0)
    with pytest.raises(
        SlimlmError, match="gptq: group_size 48 does not divide the input size 64 of model.layers.0.self_attn.q_proj"
    ):
        compress_(model, parse_recipe([{"method": "gptq", "group_size": 48}], "bad"), calibration)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SlimlmError, match="method 'gptq' needs calibration data"):
        compress_(model, load_recipe("gptq-w4-g64"))


def test_non_finite_activations_name_the_layer():
    stats = InputStats(4, ("hessian",), torch.device("cpu"), name="model.layers.7.mlp.down_proj")
    with pytest.raises(SlimlmError, match="non-finite activations \\(NaN/Inf\\) reach model.layers.7.mlp.down_proj"):
        stats.update(torch.tensor([[1.0, float("inf"), 0.0, 2.0]]))
    model = tiny_model("llama")
    with torch.no_grad():
        decoder_blocks(model)[1].post_attention_layernorm.weight[3] = float("nan")
    calibration = CalibrationSet(torch.randint(0, 300, (2, 16)), "x", "random", 0)
    for recipe in ("gptq-w4-g64", "sparsegpt-50"):
        with pytest.raises(
            SlimlmError,
            match="non-finite activations \\(NaN/Inf\\) reach model.layers.1.mlp.gate_proj during calibration",
        ):
            compress_(copy.deepcopy(model), load_recipe(recipe), calibration)


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
        ("phi3", [["qkv_proj"], ["o_proj"], ["gate_up_proj"], ["down_proj"]]),
        ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
        ("opt", [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
    ],
)
def test_execution_groups_follow_the_adapter(arch, expected):
    model = tiny_model(arch)
    groups = execution_groups(block_linears(model, 0), adapter_for(model).shared_inputs)
    assert [len(group) for group in groups] == [len(names) for names in expected]
    for group, names in zip(groups, expected):
        assert all(name.endswith("." + suffix) for name, suffix in zip(group, names)), (list(group), names)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_true_sequential_statistics_see_the_earlier_groups_compressed(arch):
    """Each group's Hessian equals a naive hook's on a full forward of a model in which exactly the groups before
    it (in this block and every earlier block) are already compressed — here "compression" halves a weight."""
    model = tiny_model(arch)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    observed = []

    def halve(index, linears, stats):
        observed.append((index, list(linears), {name: s.hessian.clone() for name, s in stats.items()}))
        for module in linears.values():
            module.weight.data.mul_(0.5)

    calibrate_sequentially(model, ids, ("hessian",), halve, true_sequential=True)
    groups_per_block = len(execution_groups(block_linears(reference, 0), adapter_for(reference).shared_inputs))
    assert len(observed) == groups_per_block * len(decoder_blocks(reference))
    for _index, names, hessians in observed:
        rows = []
        handle = reference.get_submodule(names[0]).register_forward_hook(
            lambda m, inp, out, rows=rows: rows.append(inp[0].reshape(-1, inp[0].shape[-1]))
        )
        with torch.no_grad():
            reference(ids, use_cache=False)
        handle.remove()
        x = torch.cat(rows)
        for name in names:
            torch.testing.assert_close(hessians[name], 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
            reference.get_submodule(name).weight.data.mul_(0.5)  # now compressed in the reference as well
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_stacked_shared_input_linears_equal_separate_calls():
    """q/k/v share one Hessian: one stacked call gives each layer exactly what its own call gives."""
    model = tiny_model("llama")
    linears = {name: m for name, m in block_linears(model, 0).items() if "self_attn" in name and "o_proj" not in name}
    hessian = hessian_of(correlated_inputs(64, 64, seed=5))
    shared = InputStats(64, ("hessian",), torch.device("cpu"))
    shared.hessian = hessian
    config = GPTQConfig(group_size=32, symmetric=False)
    weights = {name: linear_weight(m).detach().clone() for name, m in linears.items()}
    quantize_gptq_(model, linears, config, {name: shared for name in linears})
    for name, weight in weights.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantizedLinear)
        codes, scale, zero_point = gptq_quantize(
            weight, hessian, config.grid, config.block_size, clip_ratios=config.clip_ratios
        )
        assert (
            torch.equal(module.weight_q, codes)
            and torch.equal(module.weight_scale, scale)
            and torch.equal(module.weight_zero_point, zero_point)
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "gpt2", "phi3", "opt"])
def test_compress_save_reload_and_closer_to_dense_than_rtn(arch, tmp_path):
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    calibration = CalibrationSet(ids, "x", "random", 0)
    dense = tiny_model(arch)
    with torch.no_grad():
        dense_logits = dense(ids).logits
    errors = {}
    for method in ("gptq", "rtn"):
        model = copy.deepcopy(dense)
        compress_(
            model,
            parse_recipe([{"method": method, "bits": 3, "group_size": 32, "symmetric": False}], method),
            calibration,
        )
        with torch.no_grad():
            logits = model(ids).logits
        errors[method] = (logits - dense_logits).pow(2).mean().item()
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == len(decoder_blocks(model)) * len(adapter_for(model).linears())
    assert errors["gptq"] < errors["rtn"], errors

    model = copy.deepcopy(dense)
    compress_(model, load_recipe("gptq-w4-g64" if arch in ("llama", "gpt2", "opt") else "gptq-w4-g64-sym"), calibration)
    with torch.no_grad():
        expected = model(ids).logits
    save_model(model, tiny_tokenizer(), tmp_path / "out", {"recipe": "gptq"})
    loaded = load_model(str(tmp_path / "out")).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
