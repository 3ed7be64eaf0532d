"""QAT: the fake-quant kernel against grid.py and a naive STE/LSQ reference, FakeQuantLinear's round trips, training
that beats its RTN start, storage, recipes and refusals, on tiny random models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from slimlm.checkpoint.save import save_model
from slimlm.data.calibration import CalibrationSet
from slimlm.data.text import load_text
from slimlm.distill.data import TokenWindows
from slimlm.distill.losses import logit_distillation_loss
from slimlm.distill.stage import Base
from slimlm.errors import SlimlmError
from slimlm.models.adapters import block_linears, decoder_blocks
from slimlm.models.load import load_model
from slimlm.pipeline import compress_
from slimlm.quantize.grid import QuantGrid, choose_qparams, dequantize, quantize_with
from slimlm.quantize.linear import QuantizedLinear
from slimlm.quantize.qat import (
    FakeQuantLinear,
    QATConfig,
    check_qat,
    fake_quantize,
    qat_,
)
from slimlm.quantize.rtn import rtn_quantize
from slimlm.recipes import load_recipe, parse_recipe

GRIDS = [QuantGrid(4, 64, False), QuantGrid(3, None, True), QuantGrid(2, 16, False), QuantGrid(8, 32, True)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def weights(out_features=24, in_features=128, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    weight[3, 5] = 0.9  # an outlier stretches one group's range
    return weight


def all_linears(model) -> dict:
    return {name: m for index in range(len(decoder_blocks(model))) for name, m in block_linears(model, index).items()}


# --- the kernel ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_fake_quantize_equals_quantize_then_dequantize(grid):
    weight = weights()
    scale, zero_point = choose_qparams(weight, grid)
    for step in (scale, (scale.float() * 0.6).half()):  # min/max steps, and smaller ones that clip
        expected = dequantize(quantize_with(weight, step, zero_point, grid), step, zero_point)
        assert torch.equal(fake_quantize(weight, step.float(), zero_point, grid), expected)
    # a float32 step is rounded to float16 first, as it would be saved
    odd = scale.float() * 1.0003
    assert torch.equal(
        fake_quantize(weight, odd, zero_point, grid),
        dequantize(quantize_with(weight, odd.half(), zero_point, grid), odd.half(), zero_point),
    )


def naive_fake_quantize(weight, scale, zero_point, grid):
    """The textbook STE: round(x) replaced by x + (round(x) − x).detach(); torch.clamp passes gradient inside [min, max]."""
    groups = scale.shape[1]
    x = weight.reshape(weight.shape[0], groups, -1) / scale.unsqueeze(2)
    rounded = x + (torch.round(x) - x).detach()
    z = 0.0 if zero_point is None else zero_point.double().unsqueeze(2)
    q = torch.clamp(rounded + z, grid.qmin, grid.qmax) - z
    return (q * scale.unsqueeze(2)).reshape(weight.shape)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_ste_and_lsq_gradients_match_autograd_of_naive_reference(grid):
    weight = weights(seed=1)
    scale, zero_point = choose_qparams(weight, grid)
    scale = (scale.float() * 0.8).half().float()  # float16-exact, small enough that some weights clip
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))
    ours_w, ours_s = weight.clone().requires_grad_(), scale.clone().requires_grad_()
    (fake_quantize(ours_w, ours_s, zero_point, grid) * upstream).sum().backward()
    ref_w, ref_s = weight.double().requires_grad_(), scale.double().requires_grad_()
    (naive_fake_quantize(ref_w, ref_s, zero_point, grid) * upstream.double()).sum().backward()
    clipped = ours_w.grad == 0
    assert clipped.any() and not clipped.all()  # the test sees both sides of the clamp
    torch.testing.assert_close(ours_w.grad, ref_w.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(ours_s.grad, ref_s.grad.float(), rtol=1e-5, atol=1e-5)


# --- FakeQuantLinear -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D stores its weight transposed
def test_fake_quant_linear_round_trips(arch):
    model = tiny_model(arch)
    grid = QuantGrid(4, 32, False)
    for name, module in all_linears(model).items():
        codes, scale, zero_point = rtn_quantize(module.weight.t() if arch == "gpt2" else module.weight, grid)
        from_float = FakeQuantLinear.from_linear(module, grid).to_quantized()  # min/max init is RTN
        assert torch.equal(from_float.weight_q, codes) and torch.equal(from_float.weight_scale, scale), name
        quantized = QuantizedLinear(codes, scale, zero_point, grid, module.bias, torch.float32)
        fake = FakeQuantLinear.from_quantized(quantized)  # starts exactly where the earlier stage ended
        assert torch.equal(
            fake_quantize(fake.float_weight(), fake.scale(), fake.zero_point, grid), quantized.dequantized_weight()
        )
        x = torch.randn(3, module.weight.shape[0] if arch == "gpt2" else module.weight.shape[1])
        assert torch.equal(fake(x), quantized(x))
        back = fake.to_quantized()
        assert (
            torch.equal(back.weight_q, codes)
            and torch.equal(back.weight_scale, scale)
            and torch.equal(back.weight_zero_point, zero_point)
        )


def test_trained_layer_converts_to_the_same_function():
    module = torch.nn.Linear(64, 8)
    fake = FakeQuantLinear.from_linear(module, QuantGrid(3, 16, False))
    with torch.no_grad():
        fake.weight_offset.normal_(0, 0.7)
        fake.scale_ratio.uniform_(0.7, 1.3)
        fake.scale_ratio[0, 0] = 1e-9  # clamped to the smallest float16 step, as it would be saved
    x = torch.randn(5, 64)
    torch.testing.assert_close(fake.to_quantized()(x), fake(x), rtol=0, atol=1e-6)


# --- the stage on tiny models --------------------------------------------------------------------------------------


def held_out_kl(student, teacher, tokenizer, seqlen=32) -> float:
    ids = TokenWindows.from_text(tokenizer, load_text("default", "evaluation"), seqlen, seed=0).rows(range(8))
    with torch.no_grad():
        return logit_distillation_loss(student(ids).logits, teacher(ids).logits).item()


def rtn_model(model, grid):
    quantized = copy.deepcopy(model)
    compress_(
        quantized,
        parse_recipe(
            [{"method": "rtn", "bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric}], "rtn"
        ),
    )
    return quantized


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_training_beats_its_rtn_start_and_saves_packed(arch, tokenizer, tmp_path):
    teacher = tiny_model(arch)
    torch.manual_seed(1)
    with torch.no_grad():  # larger, heavier-tailed weights than the random init, so 3-bit rounding costs something
        for module in all_linears(teacher).values():
            module.weight.mul_(4).add_(torch.randn_like(module.weight).pow(3) * 0.02)
    config = QATConfig(bits=3, group_size=32, steps=40, batch_size=4, seqlen=32, lr=5e-3, warmup=2)
    rtn_kl = held_out_kl(rtn_model(teacher, config.grid), teacher, tokenizer)
    student = copy.deepcopy(teacher)
    result = qat_(student, Base(teacher, tokenizer), config)
    assert len(result.losses) == 40
    linears = all_linears(student)
    assert all(isinstance(m, QuantizedLinear) and m.grid == config.grid for m in linears.values())
    qat_kl = held_out_kl(student, teacher, tokenizer)
    assert qat_kl < 0.8 * rtn_kl, (qat_kl, rtn_kl)
    ids = torch.randint(3, 256, (2, 24))
    expected = student(ids).logits
    save_model(student, tokenizer, tmp_path / "out", {"recipe": "qat"})
    loaded = load_model(str(tmp_path / "out"), device="cpu")
    torch.testing.assert_close(loaded.model(ids).logits, expected, rtol=0, atol=1e-5)


def test_refines_an_earlier_quantization_and_keeps_pruned_zeros(tokenizer):
    teacher = tiny_model("llama")
    config = QATConfig(bits=4, group_size=32, steps=3, batch_size=2, seqlen=16, lr=1e-2, warmup=0, learn_scales=False)
    # after gptq-like stages the layers are QuantizedLinear: qat starts from their codes and keeps their grid
    student = rtn_model(teacher, QuantGrid(4, 32, False))
    before = {name: m.weight_scale.clone() for name, m in all_linears(student).items()}
    qat_(student, Base(teacher, tokenizer), config)
    assert all(torch.equal(m.weight_scale, before[name]) for name, m in all_linears(student).items())  # scales frozen
    # a pruned float model: the zeros survive training and quantization
    pruned = copy.deepcopy(teacher)
    compress_(pruned, parse_recipe([{"method": "magnitude", "sparsity": 0.5}], "prune"))
    zeros = {name: m.weight == 0 for name, m in all_linears(pruned).items()}
    qat_(pruned, Base(teacher, tokenizer), dataclasses.replace(config, learn_scales=True))
    assert all((m.dequantized_weight()[zeros[name]] == 0).all() for name, m in all_linears(pruned).items())


def test_data_free_samples_train(tokenizer):
    teacher = tiny_model("qwen2")
    student = copy.deepcopy(teacher)
    result = qat_(
        student,
        Base(teacher, tokenizer),
        QATConfig(steps=2, batch_size=2, seqlen=12, warmup=0, samples="teacher", group_size=32),
    )
    assert len(result.losses) == 2 and all(isinstance(m, QuantizedLinear) for m in all_linears(student).values())


def test_shipped_recipes_parse_and_compose(tokenizer):
    for name in ("qat-w4-g64", "awq-qat-w4-g64"):
        recipe = load_recipe(name)
        qat = recipe.stages[-1]
        assert isinstance(qat, QATConfig) and qat.grid == QuantGrid(4, 64, False) and "steps" in recipe.description
        short = tuple(
            dataclasses.replace(s, steps=2, batch_size=2, seqlen=16, warmup=0) if s.method == "qat" else s
            for s in recipe.stages
        )
        model = tiny_model("llama")
        compress_(
            model,
            dataclasses.replace(recipe, stages=short),
            CalibrationSet(torch.randint(0, 300, (2, 16)), "test", "random ids", 0),
            tokenizer=tokenizer,
        )
        assert all(isinstance(m, QuantizedLinear) and m.grid.group_size == 64 for m in all_linears(model).values())


# --- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"bits": 9}, "qat: 'bits' is 9, outside \\[2, 8\\]"),
        ({"bits": 1}, "qat: 'bits' is 1"),
        ({"learn_weights": False, "learn_scales": False}, "nothing would train"),
        ({"lr": -1.0}, "^qat: 'lr' is -1.0"),
        ({"schedule": "step"}, "^qat: 'schedule'"),
        ({"samples": "student"}, "qat: 'samples' is 'student'"),
        ({"loss": "uld"}, "qat: 'loss' is 'uld'"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(SlimlmError, match=message):
        QATConfig(**settings)


def test_bad_models_are_refused(tokenizer):
    model = tiny_model("llama")  # input sizes 64 and 128
    with pytest.raises(
        SlimlmError, match="group_size 48 does not divide the input size 64 of model.layers.0.self_attn.q_proj"
    ):
        check_qat(model, QATConfig(group_size=48))
    with pytest.raises(SlimlmError, match="no linear layer is selected"):
        check_qat(model, QATConfig(targets="no_such_layer"))
    quantized = rtn_model(model, QuantGrid(3, 32, True))
    with pytest.raises(
        SlimlmError, match="already quantized to int3 sym g32, but this stage asks for int4 asym g64.*bits / group_size"
    ):
        check_qat(quantized, QATConfig())
    w8a8 = copy.deepcopy(model)
    compress_(w8a8, parse_recipe([{"method": "w8a8"}], "w8a8"))
    with pytest.raises(SlimlmError, match="W8A8 layer"):
        check_qat(w8a8, QATConfig())


def test_nan_loss_stops_and_leaves_quantized_layers(tokenizer):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        teacher.model.norm.weight[0] = float("nan")  # the teacher's logits, hence the loss, are NaN
    with pytest.raises(SlimlmError, match="qat: the loss became nan at step 1"):
        qat_(student, Base(teacher, tokenizer), QATConfig(steps=2, batch_size=2, seqlen=16, group_size=32))
    assert all(isinstance(m, QuantizedLinear) for m in all_linears(student).values())
