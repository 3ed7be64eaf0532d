"""The sequential calibration engine: block inputs equal a full forward's, statistics equal naive ones, hooks go away."""

import pytest
import torch
from conftest import tiny_model

from slimlm.calibration.sequential import calibrate_sequentially, capture_block_inputs, collect_input_stats
from slimlm.calibration.stats import InputStats, gram
from slimlm.errors import SlimlmError
from slimlm.models.adapters import block_linears, decoder_blocks


def _hooks(model):
    """Every hook on every module (transformers itself leaves output-capturing hooks after output_hidden_states)."""
    return {
        (name, kind, key)
        for name, m in model.named_modules()
        for kind, hooks in (("fwd", m._forward_hooks), ("pre", m._forward_pre_hooks))
        for key in hooks
    }


def _hidden_states(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True, use_cache=False).hidden_states  # (embeddings, block 1 out, ...)


def test_input_stats_match_naive():
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 8), torch.randn(1, 7, 8)]
    stats = InputStats(8, ("hessian", "input_norm"), torch.device("cpu"))
    for batch in batches:
        stats.update(batch)
    rows = torch.cat([b.reshape(-1, 8) for b in batches])
    torch.testing.assert_close(stats.hessian, 2 * rows.t() @ rows / rows.shape[0])
    torch.testing.assert_close(stats.input_norm, rows.norm(dim=0))
    torch.testing.assert_close(stats.mean_abs, rows.abs().mean(dim=0))
    assert stats.tokens == 17


@pytest.mark.parametrize("statistic", ["hessian", "input_norm", "input_absmax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_each_statistic_refuses_non_finite_activations_by_layer_name(statistic, bad):
    stats = InputStats(4, (statistic,), torch.device("cpu"), name="model.layers.3.mlp.down_proj")
    stats.update(torch.ones(2, 3, 4))
    batch = torch.ones(2, 3, 4)
    batch[1, 2, 1] = bad
    with pytest.raises(SlimlmError, match="non-finite activations \\(NaN/Inf\\) reach model.layers.3.mlp.down_proj"):
        stats.update(batch)


@pytest.mark.parametrize("width", [1, 7, 10, 64])
def test_gram_from_upper_blocks_equals_full_product(width):
    rows = torch.randn(33, width, dtype=torch.float64)
    torch.testing.assert_close(gram(rows), rows.t() @ rows)


def test_captured_block_inputs_equal_embeddings(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 300, (3, 16))
    inputs, arguments = capture_block_inputs(model, ids, torch.device("cpu"))
    assert len(arguments) == len(decoder_blocks(model))
    full = _hidden_states(model, ids)[0]
    assert len(inputs) == 3
    for i in range(3):
        torch.testing.assert_close(inputs[i][0], full[i], rtol=1e-5, atol=1e-5)


def test_engine_with_identity_compression_reproduces_full_forward(arch):
    """Each block sees the hidden states a full forward gives it, and its linears' statistics match a naive hook."""
    model = tiny_model(arch)
    ids = torch.randint(0, 300, (2, 16))
    full = _hidden_states(model, ids)
    # naive reference: hook every linear of block 1 during a full forward
    seen = {name: [] for name in block_linears(model, 1)}
    handles = [
        linear.register_forward_hook(
            lambda m, inp, out, name=name: seen[name].append(inp[0].reshape(-1, inp[0].shape[-1]))
        )
        for name, linear in block_linears(model, 1).items()
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    expected = {
        name: 2 * torch.cat(rows).t() @ torch.cat(rows) / torch.cat(rows).shape[0] for name, rows in seen.items()
    }

    observed = {}
    hooks_before = _hooks(model)

    def record(index, linears, stats):
        observed[index] = {n: s.hessian.clone() for n, s in stats.items()}

    calibrate_sequentially(model, ids, ("hessian",), record)
    assert sorted(observed) == list(range(len(decoder_blocks(model))))
    for name, hessian in expected.items():  # shared-input linears (q/k/v, gate/up) included
        torch.testing.assert_close(observed[1][name], hessian, rtol=1e-4, atol=1e-5)
    assert _hooks(model) == hooks_before  # every hook the engine added is gone
    assert len(full) == len(decoder_blocks(model)) + 1


def test_engine_feeds_compressed_block_outputs_forward():
    """After a block is compressed, the next block's statistics come from the compressed block's outputs."""
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (2, 16))
    names = list(block_linears(model, 1))
    hessians = {}

    def zero_block0(index, linears, stats):
        hessians[index] = stats[names[0].replace("layers.1", f"layers.{index}")].hessian.clone()
        if index == 0:
            for module in linears.values():
                module.weight.data.zero_()

    calibrate_sequentially(model, ids, ("hessian",), zero_block0)
    # with block 0 zeroed it is the identity on the residual stream, so block 1 sees block 0's input
    torch.testing.assert_close(hessians[1], hessians[0], rtol=1e-4, atol=1e-6)


def test_hooks_removed_when_the_method_fails():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 300, (1, 8))

    def fail(index, linears, stats):
        raise RuntimeError("method failed")

    with pytest.raises(RuntimeError, match="method failed"):
        calibrate_sequentially(model, ids, ("input_norm",), fail)
    with pytest.raises(KeyError):
        with collect_input_stats(block_linears(model, 0), ("input_norm",)):
            raise KeyError("boom")
    assert _hooks(model) == set()


def test_shared_input_linears_share_one_statistics_object():
    model = tiny_model("llama")
    linears = block_linears(model, 0)
    with collect_input_stats(
        linears, ("hessian",), (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),)
    ) as stats:
        model(torch.randint(0, 300, (1, 8)), use_cache=False)
    q, k, v, o = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkvo")
    assert q is k is v and q is not o
    assert q.tokens == 8  # updated once per forward, not three times


def _true_sequential_record(model, ids) -> dict[str, torch.Tensor]:
    """Hessians the engine hands each execution group, while each group is halved (so later groups see it)."""
    seen = {}

    def halve(index, linears, stats):
        for name, module in linears.items():
            seen[name] = stats[name].hessian.clone()
            module.weight.data.mul_(0.5)

    calibrate_sequentially(model, ids, ("hessian",), halve, true_sequential=True)
    return seen


def test_one_pass_equals_per_window_passes(arch, monkeypatch):
    """All windows in one batch with compress-on-call stand-ins gives the statistics of the per-window partial passes."""
    import slimlm.calibration.sequential as sequential

    ids = torch.randint(0, 300, (3, 16))
    one_pass_model = tiny_model(arch)
    one_pass = _true_sequential_record(one_pass_model, ids)
    monkeypatch.setattr(sequential, "one_pass_fits", lambda *args: False)
    passes_model = tiny_model(arch)
    passes = _true_sequential_record(passes_model, ids)
    assert one_pass.keys() == passes.keys() and len(passes) == sum(
        len(block_linears(passes_model, i)) for i in range(2)
    )
    for name, hessian in passes.items():
        torch.testing.assert_close(one_pass[name], hessian, rtol=1e-4, atol=1e-5)
    assert not any(type(m).__name__ == "_CompressOnCall" for m in one_pass_model.modules())
    torch.testing.assert_close(one_pass_model(ids).logits, passes_model(ids).logits, rtol=1e-4, atol=1e-5)


def test_one_pass_puts_every_layer_back_when_the_method_fails():
    model = tiny_model("llama")
    before = [type(m) for m in model.modules()]

    def fail_on_o_proj(index, linears, stats):
        if any(name.endswith("o_proj") for name in linears):
            raise RuntimeError("method failed")

    with pytest.raises(RuntimeError, match="method failed"):
        calibrate_sequentially(model, torch.randint(0, 300, (2, 8)), ("hessian",), fail_on_o_proj, true_sequential=True)
    assert [type(m) for m in model.modules()] == before


def test_one_pass_names_a_linear_the_block_never_calls_and_puts_it_back():
    model = tiny_model("llama")
    mlp = decoder_blocks(model)[0].mlp
    mlp.forward = lambda x: torch.zeros_like(x)  # a block whose MLP linears never run
    before = [type(m) for m in model.modules()]
    with pytest.raises(SlimlmError, match=r"model\.layers\.0\.mlp\.gate_proj never ran.*'targets'"):
        calibrate_sequentially(
            model, torch.randint(0, 300, (2, 8)), ("hessian",), lambda index, linears, stats: None, true_sequential=True
        )
    assert [type(m) for m in model.modules()] == before
