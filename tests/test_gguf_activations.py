"""llama.cpp's rounding of matmul inputs: against the gguf package's Q8_0 codec, q8_K's grid, the statistics' noise,
its proxy against the measured KL, and the live model rounding each searched input for the type it holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

from slimlm.export.gguf_activations import engine_activations, rounded_activations
from slimlm.export.gguf_types import TYPES, WRITABLE
from slimlm.search.statistics import collect_statistics, rounding_proxy


def _activations(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    x[:, 5] *= 30  # an outlier channel, as real residual streams have
    return x


@pytest.mark.parametrize("kind", ["q8_0", "q8_1"])
def test_q8_blocks_of_32_are_the_gguf_packages_q8_0(kind):
    from gguf import GGMLQuantizationType, quants

    x = _activations(8, 256)
    codec = quants.dequantize(quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    assert np.array_equal(rounded_activations(x, kind).numpy(), codec)
    assert not torch.equal(rounded_activations(x, kind), x)


def test_q8_k_rounds_blocks_of_256_to_the_grid_of_their_largest_value():
    x = _activations(4, 512)
    rounded = rounded_activations(x, "q8_k")
    for row, out in zip(x.reshape(-1, 256), rounded.reshape(-1, 256)):
        top = int(row.abs().argmax())
        d = float(row[top].abs()) / 127
        codes = out / d
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3
        assert float(out[top]) == pytest.approx(float(row[top]), rel=1e-6)
        assert float((out - row).abs().max()) <= d / 2 * (1 + 1e-5)
    # one outlier widens a 256-block's step 8x as far as a 32-block's: the k-quants' inputs are rounded coarser
    error = {kind: float((rounded_activations(x, kind) - x).pow(2).mean()) for kind in ("q8_0", "q8_k")}
    assert error["q8_k"] > 2 * error["q8_0"]


def test_rows_that_do_not_split_into_blocks_are_refused():
    with pytest.raises(ValueError, match="blocks of 256"):
        rounded_activations(torch.randn(4, 576), "q8_k")


def test_every_writable_type_names_the_rounding_its_input_gets():
    x = _activations(2, 256)
    for name in WRITABLE:
        out = engine_activations(x, name)
        assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(engine_activations(x, "f32"), x)
    assert torch.equal(engine_activations(x, "f16"), x.half().float())
    assert torch.equal(engine_activations(x, "q4_1"), rounded_activations(x, "q8_1"))
    assert TYPES["q6_k"].activations == "q8_k" and TYPES["q5_0"].activations == "q8_0"


def _inputs(model, ids, name: str) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for row in ids:
            model(row[None], use_cache=False)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def test_statistics_measure_each_inputs_rounding_noise():
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (3, 32), generator=torch.Generator().manual_seed(0))
    statistics = collect_statistics(model, ids, progress=False, activation_kinds=("q8_0", "f16", "q8_k"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        x = _inputs(model, ids, name)
        noise = statistics.activation_noise[name]
        assert set(noise) == {"q8_0", "f16"}  # 64- and 128-wide rows: no 256-blocks
        expected = (rounded_activations(x, "q8_0") - x).pow(2).mean(0)
        assert torch.allclose(noise["q8_0"], expected, rtol=1e-4, atol=1e-12)
        assert float(noise["f16"].sum()) < float(noise["q8_0"].sum()) / 100
    assert collect_statistics(model, ids, progress=False).activation_noise == {}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rounding_proxy_against_the_measured_kl_of_rounding_one_input(arch):
    """The noise is drawn anew at every position, as the shaped form assumes: no rescaling, within 2x."""
    model = tiny_model(arch)
    ids = torch.randint(3, 300, (32, 32), generator=torch.Generator().manual_seed(1))
    statistics = collect_statistics(model, ids, progress=False, activation_kinds=("q8_0",))
    model.double()  # a KL this small is below float32's floor
    with torch.no_grad():
        base = torch.log_softmax(model(ids, use_cache=False).logits, dim=-1)
    name = "model.layers.1.mlp.down_proj"
    module = model.get_submodule(name)
    predicted = rounding_proxy(
        module.weight.detach().float(), statistics.activation_noise[name]["q8_0"], statistics.output_fisher[name]
    )
    handle = module.register_forward_pre_hook(lambda _m, args: (rounded_activations(args[0], "q8_0"),))
    with torch.no_grad():
        rounded = torch.log_softmax(model(ids, use_cache=False).logits, dim=-1)
    handle.remove()
    measured = float((base.exp() * (base - rounded)).sum(-1).mean())
    assert measured > 0 and 0.5 < predicted / measured < 2.0


def test_live_model_rounds_each_input_for_the_type_its_weight_holds(tmp_path):
    from slimlm.search.database import build_database
    from slimlm.search.driver import uniform_configuration
    from slimlm.search.rerank import live_copy
    from slimlm.search.space import Option, gguf_search_space

    model = tiny_model("llama")  # tied: the head reads the embedding's type
    space = gguf_search_space(model, linear_types=("q4_0", "f16"), methods=("ref",))
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    database = build_database(
        tmp_path / "db",
        model,
        space,
        lambda: collect_statistics(model, ids, progress=False, activation_kinds=space.activation_kinds()),
        "calib",
    )
    assert {"f16", "q8_0"} <= set(space.activation_kinds())
    live = live_copy(model, database)
    live.apply(uniform_configuration(database, Option("q4_0", "ref"), Option("f16", "ref")))
    seen: dict[str, list] = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"):
        module = live.model.get_submodule(name)
        module.register_forward_pre_hook(lambda _m, a, n=name: seen.setdefault(n, []).append(a[0]), prepend=True)
        module.register_forward_pre_hook(lambda _m, a, n=name: seen[n].append(a[0]))
    with torch.no_grad():
        live.model(ids[:1], use_cache=False)
    for name, kind in (("model.layers.0.self_attn.q_proj", "q8_0"), ("model.layers.0.mlp.up_proj", "q8_0")):
        raw, rounded = seen[name]
        assert torch.equal(rounded, rounded_activations(raw, kind))
    raw, rounded = seen["lm_head"]
    assert torch.equal(rounded, raw.half().float())

    from safetensors import safe_open

    from slimlm.search.database import input_rounding_proxy

    # the proxy counts the rounding beside the weights' own error: what F16 buys over Q8_0 at exact weights
    knob = space.knob("blk.0.attn_q.weight")
    with safe_open(str(tmp_path / "db" / "tensors" / f"{knob.tensor}.safetensors"), "np") as f:
        meta = json.loads(f.metadata()["variants"])
    weight = model.get_submodule(knob.module).weight.detach().float()
    statistics = collect_statistics(model, ids, progress=False, activation_kinds=space.activation_kinds())
    for label in ("q4_0/ref", "f16/ref"):
        expected = input_rounding_proxy(knob, weight, label.split("/")[0], statistics, "lm_head")
        assert meta[label]["input_rounding"] == pytest.approx(expected, rel=1e-5)
    assert meta["q4_0/ref"]["input_rounding"] > 100 * meta["f16/ref"]["input_rounding"] > 0
    assert meta["q4_0/ref"]["proxy"] > meta["q4_0/ref"]["input_rounding"]
