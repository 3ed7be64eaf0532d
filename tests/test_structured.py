"""Structured pruning that shrinks the architecture: depth (ShortGPT) and width (Minitron).

The pruned model must compute exactly what skipping / slicing predicts, save as a plain Hugging Face
checkpoint with a smaller config, reload in plain transformers with identical logits, and generate with a KV cache.
"""

import copy
import functools

import pytest
import torch
import transformers
from conftest import TINY_CONFIGS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from slimlm.checkpoint.save import save_model
from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.models.adapters import adapter_for, decoder_blocks, linear_weight
from slimlm.pipeline import compress_
from slimlm.prune.depth import (
    DepthConfig,
    block_influence,
    block_influences,
    blocks_to_remove,
    prune_depth_,
    remove_blocks_,
    skip_losses,
)
from slimlm.prune.width import WidthConfig, config_changes, group_importance, prune_width_, width_importance, width_plan
from slimlm.recipes import load_recipe, parse_recipe

ALL_ARCHS = sorted(TINY_CONFIGS)
HEAD_ARCHS = ["gemma3_text", "llama", "mistral", "phi3", "qwen2"]  # GPT-2 / OPT: head pruning is refused
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 64]])


def calibration_ids(n: int = 2, seqlen: int = 12) -> torch.Tensor:
    return torch.randint(3, 300, (n, seqlen), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def deep_model(arch: str, layers: int = 4) -> torch.nn.Module:
    """A tiny model with more blocks, mixing sliding and full attention where the architecture has layer types."""
    config = TINY_CONFIGS[arch]()
    values = config.to_dict()
    values["n_layer" if arch == "gpt2" else "num_hidden_layers"] = layers
    if arch == "gemma3_text":  # per-type rotary bases: a wrong layer_types after pruning changes the logits
        values["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2)
    if arch == "qwen2":  # blocks >= max_window_layers use the sliding window
        values.update(use_sliding_window=True, sliding_window=64, max_window_layers=layers // 2)
        values.pop("layer_types")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(type(config).from_dict(values), dtype=torch.float32).eval()


def greedy_without_cache(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        next_id = logits(model, ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def assert_generate_matches_no_cache_loop(model: torch.nn.Module) -> None:
    """`generate` (KV cache indexed by layer_idx) agrees with re-running the whole prefix at every step."""
    with torch.no_grad():
        generated = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False)
    steps = generated.shape[1] - IDS.shape[1]
    assert steps >= 1
    assert torch.equal(generated, greedy_without_cache(model, IDS, steps))


@functools.cache
def tokenizer():
    return tiny_tokenizer()  # trained in memory: once per test session is enough


def save_and_reload_plain(model: torch.nn.Module, directory) -> torch.nn.Module:
    save_model(model, tokenizer(), directory, {})
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# --- depth (ShortGPT) -------------------------------------------------------------------------------------------


def test_block_influence_matches_naive():
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cosines = [torch.dot(x[n, t], y[n, t]) / (x[n, t].norm() * y[n, t].norm()) for n in range(2) for t in range(5)]
    assert block_influence(x, y) == pytest.approx(1 - float(sum(cosines)) / len(cosines), abs=1e-6)
    assert block_influence(x, x) == pytest.approx(0.0, abs=1e-12)
    assert block_influence(x, 3 * x) == pytest.approx(0.0, abs=1e-12)  # a rescaled stream counts as unchanged
    assert block_influence(x, -x) == pytest.approx(2.0)


def test_blocks_removed_round_half_up_and_keep_at_least_one():
    assert blocks_to_remove(30, DepthConfig()) == 8  # 25% of SmolLM2's 30 blocks = 7.5 -> 8
    assert blocks_to_remove(4, DepthConfig(fraction=0.25)) == 1
    assert blocks_to_remove(4, DepthConfig(fraction=0.05)) == 1  # at least one
    assert blocks_to_remove(4, DepthConfig(fraction=0.95)) == 3  # at most all but one
    assert blocks_to_remove(4, DepthConfig(blocks=2)) == 2
    with pytest.raises(SlimlmError, match="'blocks' is 4, but the model has only 4 blocks"):
        blocks_to_remove(4, DepthConfig(blocks=4))


@pytest.mark.parametrize(
    "arch",
    [
        "llama",
        "gpt2",
        "gemma3_text",  # sliding and full-attention blocks get different masks and rotary tables
        "qwen2",
    ],
)
def test_block_influences_match_full_forward_hidden_states(arch):
    """The driver-based scores equal 1 − cos between consecutive hidden states of one plain forward pass."""
    model = deep_model(arch)
    ids = calibration_ids()
    scores = block_influences(model, ids)
    with torch.no_grad():
        hidden = model(
            ids, output_hidden_states=True, use_cache=False
        ).hidden_states  # inputs of blocks 0..n-1, then the normed output
    for i in range(len(scores) - 1):
        assert scores[i] == pytest.approx(block_influence(hidden[i], hidden[i + 1]), abs=1e-5)


def _make_block_identity_(model: torch.nn.Module, index: int) -> None:
    """Zero the block's two residual writers (attention output and MLP output projections, with biases)."""
    adapter = adapter_for(model)
    block = decoder_blocks(model)[index]
    with torch.no_grad():
        for path in (adapter.attention[-1], adapter.mlp[-1]):
            block.get_submodule(path).weight.zero_()
            if block.get_submodule(path).bias is not None:
                block.get_submodule(path).bias.zero_()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_identity_block_has_zero_influence_and_is_the_one_removed(arch):
    assert block_influences(deep_model(arch), calibration_ids())[2] > 0.01  # untouched, block 2 changes the stream
    model = deep_model(arch)
    _make_block_identity_(model, 2)
    assert block_influences(model, calibration_ids())[2] == pytest.approx(0.0, abs=1e-9)
    assert prune_depth_(model, DepthConfig(blocks=1), calibration_ids()) == [2]


def _mean_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(float(model(w.unsqueeze(0), labels=w.unsqueeze(0), use_cache=False).loss) for w in ids) / len(ids)


def test_perplexity_metric_is_the_loss_of_the_model_without_that_block():
    model = deep_model("llama")
    _make_block_identity_(model, 2)
    ids = calibration_ids()
    losses = skip_losses(model, ids)
    for i in (0, 2):  # naive: really remove block i from a copy and measure the loss
        without = copy.deepcopy(model)
        remove_blocks_(without, [i])
        assert losses[i] == pytest.approx(_mean_loss(without, ids), abs=1e-5)
    assert losses[2] == pytest.approx(_mean_loss(model, ids), abs=1e-5)  # skipping an identity block changes nothing
    expected = min(range(4), key=lambda i: losses[i])
    assert prune_depth_(model, DepthConfig(blocks=1, metric="perplexity"), ids) == [expected]


def _skip_blocks_hook(_module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@pytest.mark.parametrize("removed", [[0, 2], [1]])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_depth_pruned_model_equals_skipping_the_blocks_and_reloads_in_plain_transformers(arch, removed, tmp_path):
    model = deep_model(arch)
    reference = copy.deepcopy(model)
    remove_blocks_(model, removed)
    kept = [i for i in range(4) if i not in removed]
    assert len(decoder_blocks(model)) == model.config.num_hidden_layers == len(kept)

    # Expected: the original model with the removed blocks turned into the identity by forward hooks.
    handles = [decoder_blocks(reference)[i].register_forward_hook(_skip_blocks_hook, with_kwargs=True) for i in removed]
    expected = logits(reference)
    for handle in handles:
        handle.remove()
    assert torch.equal(logits(model), expected)

    if getattr(reference.config, "layer_types", None) is not None:  # Gemma 3: [s, f, s, f]; Qwen2: [f, f, s, s]
        assert model.config.layer_types == [reference.config.layer_types[i] for i in kept]
    if arch == "qwen2":
        assert model.config.max_window_layers == sum(i < 2 for i in kept)
    plain = save_and_reload_plain(model, tmp_path / "out")
    assert plain.config.num_hidden_layers == len(decoder_blocks(plain)) == len(kept)
    assert torch.equal(logits(plain), expected)
    assert_generate_matches_no_cache_loop(model)
    assert_generate_matches_no_cache_loop(plain)


def test_depth_refusals():
    with pytest.raises(SlimlmError, match="'blocks' and 'fraction' are both set"):
        DepthConfig(fraction=0.25, blocks=2)
    with pytest.raises(SlimlmError, match="'metric' is 'cosine'"):
        DepthConfig(metric="cosine")
    with pytest.raises(SlimlmError, match="'fraction' is 1.0, outside"):
        DepthConfig(fraction=1.0)
    with pytest.raises(SlimlmError, match="'targets' does not apply"):
        DepthConfig(targets="mlp")
    model = tiny_model("llama")
    with pytest.raises(SlimlmError, match="'blocks' is 2, but the model has only 2 blocks"):
        compress_(
            model,
            parse_recipe([{"method": "depth", "blocks": 2}], "inline"),
            CalibrationSet(calibration_ids(), "x", "t", 0),
        )
    assert len(decoder_blocks(model)) == 2
    gpt2 = AutoModelForCausalLM.from_config(
        transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=320, scale_attn_by_inverse_layer_idx=True)
    )
    with pytest.raises(SlimlmError, match="scales attention by 1/\\(layer_idx\\+1\\)"):
        prune_depth_(gpt2, DepthConfig(blocks=1), calibration_ids())


# --- width (Minitron) ---------------------------------------------------------------------------------------------


def _width(arch: str, **overrides) -> WidthConfig:
    """mlp 25% everywhere; also half of the KV groups (1 of 2) where heads can be pruned."""
    return WidthConfig(**{"mlp": 0.25, "heads": 0.5 if arch in HEAD_ARCHS else 0.0, **overrides})


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_width_pruned_config_shapes_and_parameters(arch):
    model = tiny_model(arch)
    before = n_params(model)
    adapter = adapter_for(model)
    channels = mlp_channels(model)  # 128; GPT-2: 4 × 64
    prune_width_(model, _width(arch), calibration_ids())
    assert getattr(model.config, adapter.mlp_width) == channels * 3 // 4
    for block in decoder_blocks(model):
        assert linear_weight(block.get_submodule(adapter.mlp_consumer)).shape[1] == channels * 3 // 4
        for path, layout in adapter.mlp_producers:
            assert linear_weight(block.get_submodule(path)).shape[0] == channels * 3 // 4 * len(layout)
    if arch in HEAD_ARCHS:
        assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)
        for block in decoder_blocks(model):
            assert linear_weight(block.get_submodule(adapter.head_consumer)).shape == (64, 32)
            rows = {"q": 32, "k": 16, "v": 16}
            for path, layout in adapter.head_producers:
                assert linear_weight(block.get_submodule(path)).shape[0] == sum(rows[letter] for letter in layout)
    # A model built from the new config has exactly these parameters, and fewer than before.
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    assert n_params(model) == n_params(fresh) < before


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_width_pruned_model_reloads_in_plain_transformers_and_generates(arch, tmp_path):
    model = tiny_model(arch)
    prune_width_(model, _width(arch), calibration_ids())
    plain = save_and_reload_plain(model, tmp_path / "out")
    assert torch.equal(logits(plain), logits(model))
    assert_generate_matches_no_cache_loop(model)
    assert_generate_matches_no_cache_loop(plain)


def mlp_channels(model: torch.nn.Module) -> int:
    return linear_weight(decoder_blocks(model)[0].get_submodule(adapter_for(model).mlp_consumer)).shape[1]


def _zero_rows_(module: torch.nn.Module, rows: torch.Tensor) -> None:
    with torch.no_grad():
        if type(module).__name__ == "Conv1D":
            module.weight[:, rows] = 0
        else:
            module.weight[rows] = 0
        if module.bias is not None:
            module.bias[rows] = 0


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_dead_mlp_channels_go_first_and_removing_them_changes_nothing(arch):
    """Channels whose up-projection rows are zero never activate: they are pruned, and the logits stay the same."""
    model = tiny_model(arch)
    adapter = adapter_for(model)
    channels = mlp_channels(model)
    dead = torch.randperm(channels, generator=torch.Generator().manual_seed(2))[: channels // 4].sort().values
    alive = torch.tensor([c for c in range(channels) if c not in set(dead.tolist())])
    path, layout = adapter.mlp_producers[-1]  # up_proj; GPT-2 c_fc, OPT fc1; Phi-3: the up half of gate_up_proj
    for block in decoder_blocks(model):
        _zero_rows_(block.get_submodule(path), dead + channels * (len(layout) - 1))
        if arch == "opt":  # ReLU leaves a few channels naturally silent on 24 tokens: keep the live ones surely live
            with torch.no_grad():
                block.get_submodule(path).bias[alive] = 1.0
    expected = logits(model)
    pruned = prune_width_(model, WidthConfig(mlp=0.25), calibration_ids())
    assert all(torch.equal(kept, alive) for kept in pruned.mlp_kept)
    torch.testing.assert_close(
        logits(model), expected, rtol=0, atol=1e-6
    )  # bit-exact but for GPT-2 Conv1D summation order


@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_dead_kv_group_goes_first_and_removing_it_changes_nothing(arch):
    """Zero value rows of group 0 make its query heads output zero (o_proj reads nothing from them): removed, same logits."""
    model = tiny_model(arch)
    adapter = adapter_for(model)
    path, layout = adapter.head_producers[
        -1
    ]  # v_proj; Phi-3: qkv_proj, whose v segment comes after q (4 heads) and k (2)
    v_offset = {"v": 0, "qkv": (4 + 2) * 16}[layout]
    for block in decoder_blocks(model):
        _zero_rows_(block.get_submodule(path), v_offset + torch.arange(16))
    expected = logits(model)
    pruned = prune_width_(model, WidthConfig(heads=0.5), calibration_ids())
    assert all(kept.tolist() == [1] for kept in pruned.groups_kept)
    assert torch.equal(logits(model), expected)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_only_the_requested_axis_changes(arch):
    for config, untouched in ((WidthConfig(mlp=0.25), "attn"), (WidthConfig(heads=0.5), "mlp")):
        model = tiny_model(arch)
        before = {k: v.clone() for k, v in model.state_dict().items() if untouched in k}
        prune_width_(model, config, calibration_ids())
        after = {k: v for k, v in model.state_dict().items() if untouched in k}
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.intermediate_size == 128 and model.config.num_attention_heads == 2


def test_group_importance_matches_naive():
    torch.manual_seed(0)
    norms = torch.rand(6 * 4)  # 6 heads of 4 channels, 3 groups of 2 heads
    naive = [sum(float(norms[h * 4 : (h + 1) * 4].pow(2).sum().sqrt()) for h in (2 * g, 2 * g + 1)) for g in range(3)]
    torch.testing.assert_close(group_importance(norms, 3, 4), torch.tensor(naive))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_importance_matches_activations_captured_by_hand(arch):
    """Channel importance = ‖down_proj input‖₂ over all tokens; group importance = Σ over its heads ‖head output‖₂."""
    model = tiny_model(arch)
    adapter = adapter_for(model)
    ids = calibration_ids()
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for index, block in enumerate(decoder_blocks(model)):
        for path in filter(None, (adapter.mlp_consumer, adapter.head_consumer)):
            key = f"{index}.{path}"
            handles.append(
                block.get_submodule(path).register_forward_hook(
                    lambda _m, args, _o, key=key: seen.setdefault(key, []).append(args[0])
                )
            )
    with torch.no_grad():
        for window in ids:
            model(window.unsqueeze(0), use_cache=False)
    for handle in handles:
        handle.remove()
    config = WidthConfig(mlp=0.25, heads=0.5 if arch in HEAD_ARCHS else 0.0)
    importance = width_importance(model, width_plan(model, config), ids)
    for index in range(2):
        down_input = torch.cat(seen[f"{index}.{adapter.mlp_consumer}"]).reshape(
            -1, mlp_channels(model)
        )  # (tokens, channels)
        torch.testing.assert_close(importance["mlp"][index], down_input.pow(2).sum(0).sqrt())
        if arch in HEAD_ARCHS:
            heads = torch.cat(seen[f"{index}.{adapter.head_consumer}"]).reshape(-1, 4, 16)  # (tokens, heads, head_dim)
            per_head = heads.pow(2).sum(dim=(0, 2)).sqrt()  # (heads,)
            torch.testing.assert_close(importance["heads"][index], per_head.reshape(2, 2).sum(1))


@pytest.mark.parametrize(
    "arch, config, message",
    [
        (
            "gpt2",
            WidthConfig(heads=0.5),
            "head pruning is not supported for 'gpt2'.*supports gemma, gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3",
        ),
        ("opt", WidthConfig(heads=0.5), "head pruning is not supported for 'opt'"),
        ("llama", WidthConfig(mlp=0.99), "would remove all 128 MLP channels"),
        ("llama", WidthConfig(mlp=0.01), "removes none of the 128 MLP channels"),
        ("llama", WidthConfig(heads=0.9), "would remove all 2 key/value groups"),
        ("llama", WidthConfig(heads=0.2), "removes none of the 2 key/value groups"),
    ],
)
def test_width_refusals_change_nothing(arch, config, message):
    model = tiny_model(arch)
    before = logits(model)
    with pytest.raises(SlimlmError, match=message):
        prune_width_(model, config, calibration_ids())
    assert torch.equal(logits(model), before)


def test_width_config_refusals():
    with pytest.raises(SlimlmError, match="'hidden' pruning .* is not yet supported"):
        WidthConfig(hidden=0.25)
    with pytest.raises(SlimlmError, match="'mlp' and 'heads' are both 0"):
        WidthConfig()
    with pytest.raises(SlimlmError, match="'mlp' is 1.0, outside"):
        WidthConfig(mlp=1.0)
    with pytest.raises(SlimlmError, match="'multiple_of' is 0"):
        WidthConfig(mlp=0.5, multiple_of=0)


def test_head_count_that_llama_config_cannot_load_is_refused_up_front():
    """transformers' LlamaConfig insists on hidden_size % num_attention_heads == 0, even with an explicit head_dim."""
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=6,
        head_dim=16,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(SlimlmError, match="would not load in transformers .*num_attention_heads=5.*not a multiple"):
        prune_width_(model, WidthConfig(heads=1 / 6), calibration_ids())
    prune_width_(model, WidthConfig(heads=2 / 6), calibration_ids())  # 4 heads: 96 % 4 == 0
    assert model.config.num_attention_heads == 4


# --- recipes and pipeline ----------------------------------------------------------------------------------------


def _smollm2_on_meta() -> torch.nn.Module:
    """SmolLM2-135M's architecture, without weights: enough to count what the shipped recipes remove."""
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _count_with(config) -> int:
    with torch.device("meta"):
        return n_params(AutoModelForCausalLM.from_config(config))


def test_shipped_recipes_cut_smollm2_by_at_least_20_percent():
    smol = _smollm2_on_meta()
    total = n_params(smol)
    assert total == 134_515_008
    (depth,) = load_recipe("depth-25pct").stages
    kept_blocks = 30 - blocks_to_remove(30, depth)
    after_depth = _count_with(type(smol.config).from_dict({**smol.config.to_dict(), "num_hidden_layers": kept_blocks}))
    (width,) = load_recipe("width-25pct").stages
    after_width = _count_with(
        type(smol.config).from_dict({**smol.config.to_dict(), **config_changes(smol, width_plan(smol, width))})
    )
    assert (kept_blocks, after_depth) == (22, 106_194_240)  # -21.1%
    assert after_width == 99_678_528  # -25.9%; MLP 1536 -> 864
    assert after_depth <= 0.8 * total and after_width <= 0.75 * total


@pytest.mark.parametrize("recipe", ["depth-25pct", "width-25pct"])
def test_shipped_structured_recipes_run_in_the_pipeline(recipe, tmp_path):
    model = deep_model("qwen2")
    before = n_params(model)
    logs = compress_(model, load_recipe(recipe), CalibrationSet(calibration_ids(), "x", "test ids", 0))
    assert [log.method for log in logs] == [recipe.split("-")[0]]
    assert n_params(model) < before
    plain = save_and_reload_plain(model, tmp_path / "out")
    assert torch.equal(logits(plain), logits(model))


def test_structured_then_unstructured_stages_work_on_the_narrowed_model():
    model = deep_model("llama")
    recipe = parse_recipe(
        [{"method": "depth", "blocks": 1}, {"method": "width", "mlp": 0.5}, {"method": "magnitude", "sparsity": 0.5}],
        "inline",
    )
    compress_(model, recipe, CalibrationSet(calibration_ids(), "x", "test ids", 0))
    assert len(decoder_blocks(model)) == 3 and model.config.intermediate_size == 64
    down = decoder_blocks(model)[0].mlp.down_proj.weight
    assert down.shape == (64, 64) and float((down == 0).float().mean()) == pytest.approx(0.5)
