"""KIVI KV-cache quantization: kernels against naive loops, the residual window, the cache in the loop of
perplexity and generation, memory accounting by hand, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import TEXT, TINY, run_cli, tiny_model, tiny_tokenizer
from transformers import DynamicCache

from slimlm.checkpoint.manifest import read_manifest
from slimlm.checkpoint.save import save_model
from slimlm.errors import SlimlmError
from slimlm.evaluate.perplexity import EvalWindows, evaluate_quality
from slimlm.models.load import load_model
from slimlm.pipeline import check_recipe, compress_
from slimlm.quantize.kv_cache import (
    KIVICache,
    KIVILayer,
    KVCacheConfig,
    dequantize_keys,
    dequantize_values,
    forward_in_chunks,
    kv_cache_bytes,
    kv_cache_for,
    kv_cache_setting,
    make_cache,
    quantize_keys,
    quantize_values,
    set_kv_cache_,
)
from slimlm.quantize.linear import QuantizedLinear
from slimlm.recipes import load_recipe, parse_recipe


def naive_minmax(group: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group (any shape) by the textbook rule: float16 scale and min, codes in [0, 2^b - 1]."""
    low, high = group.min().item(), group.max().item()
    scale = torch.tensor((high - low) / (2**bits - 1)).half().clamp(min=torch.finfo(torch.float16).tiny)
    minimum = torch.tensor(low).half()
    codes = torch.round((group - minimum.float()) / scale.float()).clamp(0, 2**bits - 1)
    return codes, scale, minimum


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_keys_are_quantized_per_channel_over_token_groups(bits):
    torch.manual_seed(bits)
    keys = torch.randn(2, 3, 12, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0, 0.0])  # outlier and constant channels
    codes, scale, minimum = quantize_keys(keys, bits, group_size=4)
    assert codes.dtype == torch.uint8 and scale.shape == minimum.shape == (2, 3, 3, 5)
    restored = dequantize_keys(codes, scale, minimum, torch.float32)
    for b in range(2):
        for h in range(3):
            for g in range(3):
                for d in range(5):
                    group = keys[b, h, 4 * g : 4 * g + 4, d]  # 4 consecutive tokens of one channel
                    want_codes, want_scale, want_min = naive_minmax(group, bits)
                    assert torch.equal(codes[b, h, 4 * g : 4 * g + 4, d].float(), want_codes)
                    assert scale[b, h, g, d] == want_scale and minimum[b, h, g, d] == want_min
                    want = want_codes * want_scale.float() + want_min.float()
                    assert torch.allclose(restored[b, h, 4 * g : 4 * g + 4, d], want)
    # round to nearest: within half a step (plus float16 rounding of the min) of the input
    step = scale.float().repeat_interleave(4, dim=2)
    assert ((restored - keys).abs() <= step / 2 + keys.abs() * 1e-3 + 1e-6).all()
    assert torch.equal(restored[..., 4], keys[..., 4])  # a constant channel comes back exactly


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_values_are_quantized_per_token_over_channel_groups(bits):
    torch.manual_seed(bits)
    values = torch.randn(1, 2, 6, 8) * 3
    codes, scale, minimum = quantize_values(values, bits, group_size=4)
    assert scale.shape == minimum.shape == (1, 2, 6, 2)
    restored = dequantize_values(codes, scale, minimum, torch.float32)
    for h in range(2):
        for t in range(6):
            for g in range(2):
                group = values[0, h, t, 4 * g : 4 * g + 4]  # 4 channels of one token
                want_codes, want_scale, want_min = naive_minmax(group, bits)
                assert torch.equal(codes[0, h, t, 4 * g : 4 * g + 4].float(), want_codes)
                assert torch.allclose(
                    restored[0, h, t, 4 * g : 4 * g + 4], want_codes * want_scale.float() + want_min.float()
                )
    errors = [
        (dequantize_values(*quantize_values(values, b, 4), torch.float32) - values).abs().mean() for b in (2, 4, 8)
    ]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("residual, chunks", [(8, [5, 1, 1, 9, 3, 20, 1]), (0, [3, 4, 1, 13]), (8, [8, 4, 3, 1])])
def test_residual_window_at_group_boundaries(residual, chunks):
    group = 4
    layer = KIVILayer(KVCacheConfig(bits=2, group_size=group, residual=residual))
    torch.manual_seed(0)
    keys = torch.randn(1, 2, sum(chunks), 8)
    values = torch.randn(1, 2, sum(chunks), 8)
    seen = 0
    for size in chunks:
        out_keys, out_values = layer.update(keys[:, :, seen : seen + size], values[:, :, seen : seen + size])
        # what attention read: every token so far, with the quantized ones as they were *before* this update
        quantized_before = max(seen - residual, 0) // group * group
        seen += size
        assert out_keys.shape[2] == out_values.shape[2] == seen
        assert torch.equal(out_keys[:, :, quantized_before:], keys[:, :, quantized_before:seen])  # exact
        assert torch.equal(out_values[:, :, quantized_before:], values[:, :, quantized_before:seen])
        if quantized_before:
            want_past = dequantize_keys(*quantize_keys(keys[:, :, :quantized_before], 2, group), torch.float32)
            assert torch.equal(out_keys[:, :, :quantized_before], want_past)  # chunking does not change the groups
        # what the cache holds now: whole groups quantized, the residual in [R, R + G) once R tokens were seen
        quantized = max(seen - residual, 0) // group * group
        assert layer.quantized_length() == quantized and layer.get_seq_length() == seen
        assert residual <= layer.keys.shape[2] < residual + group or seen < residual
        assert torch.equal(layer.keys, keys[:, :, quantized:seen]) and torch.equal(
            layer.values, values[:, :, quantized:seen]
        )


def test_cache_with_nothing_quantized_equals_dynamic_cache():
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (1, 96))
    with torch.no_grad():
        plain = forward_in_chunks(model, ids, 32, DynamicCache(config=model.config))
        kivi = forward_in_chunks(
            model, ids, 32, KIVICache(model.config, KVCacheConfig(bits=2, group_size=32, residual=128))
        )
        quantized = forward_in_chunks(
            model, ids, 32, KIVICache(model.config, KVCacheConfig(bits=2, group_size=16, residual=16))
        )
    assert torch.equal(kivi, plain)
    assert torch.equal(quantized[:32], plain[:32])  # the first chunk sees only itself, in full precision
    assert not torch.allclose(quantized[32:], plain[32:], atol=1e-4)  # later ones read tokens 0..15 quantized


def random_windows(n: int = 2, seqlen: int = 128) -> EvalWindows:
    torch.manual_seed(1)
    return EvalWindows(
        input_ids=torch.randint(3, 300, (n, seqlen)), source="random ids", seqlen=seqlen, total_windows=n
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_chunked_full_precision_cache_equals_one_forward_and_8_bits_is_close(arch):
    model = tiny_model(arch)
    windows = random_windows()
    full, _ = evaluate_quality(model, windows, progress=False)
    chunked, _ = evaluate_quality(model, windows, progress=False, chunk_size=24)
    assert chunked.perplexity == pytest.approx(full.perplexity, rel=1e-6)
    assert "chunks of 24 tokens through a full-precision DynamicCache" in chunked.protocol
    kv = {
        bits: evaluate_quality(
            model, windows, progress=False, chunk_size=24, kv_cache=KVCacheConfig(bits=bits, group_size=8, residual=16)
        )[0]
        for bits in (8, 2)
    }
    assert "KIVI 8-bit KV cache" in kv[8].protocol and "residual 16 tokens" in kv[8].protocol
    assert kv[8].perplexity == pytest.approx(full.perplexity, rel=1e-4)
    assert kv[2].perplexity != kv[8].perplexity


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_fewer_bits_move_the_logits_more(arch):
    model = tiny_model(arch)
    ids = random_windows(1).input_ids
    with torch.no_grad():
        plain = forward_in_chunks(model, ids, 24, DynamicCache(config=model.config))
        error = {
            bits: (
                forward_in_chunks(
                    model, ids, 24, make_cache(model, KVCacheConfig(bits=bits, group_size=8, residual=16))
                )
                - plain
            )
            .abs()
            .mean()
            for bits in (2, 4, 8)
        }
    assert error[2] > 2 * error[4] > 4 * error[8] > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_the_models_setting_matches_fp_tokens_at_8_bits(arch):
    model = tiny_model(arch)
    prompt = torch.randint(3, 300, (1, 12))
    plain = model.generate(
        prompt, max_new_tokens=40, do_sample=False, past_key_values=DynamicCache(config=model.config)
    )
    set_kv_cache_(model, KVCacheConfig(bits=8, group_size=4, residual=0))  # quantized from the first group on
    cache = kv_cache_for(model)
    kivi = model.generate(prompt, max_new_tokens=40, do_sample=False, past_key_values=cache)
    assert isinstance(cache, KIVICache) and cache.layers[0].quantized_length() == 48  # 51 tokens cached, 12 groups
    assert torch.equal(kivi, plain)


def stored_bytes(cache: KIVICache, bits: int) -> int:
    """What the cache holds, counted as the packed format: b-bit codes, float16 qparams and residual."""
    total = 0
    for layer in cache.layers:
        total += (layer.keys.numel() + layer.values.numel()) * 2
        if isinstance(layer, KIVILayer) and layer.quantized is not None:
            key_codes, key_scale, key_min, value_codes, value_scale, value_min = layer.quantized
            total += (key_codes.numel() + value_codes.numel()) * bits // 8
            total += (key_scale.numel() + key_min.numel() + value_scale.numel() + value_min.numel()) * 2
    return total


def test_memory_accounting_by_hand():
    smollm2 = transformers.LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30
    )
    # fp16: 30 layers x 3 heads x (K and V) x 2048 tokens x 64 dims x 2 bytes
    assert kv_cache_bytes(None, smollm2, 2048) == 47_185_920
    # 4-bit, G=32, R=128: 1920 tokens quantized, 128 kept. Per layer and head: codes 2·1920·64/2 = 122880,
    # key scale+min 2·60·64·2 = 15360, value scale+min 2·1920·2·2 = 15360, residual 2·128·64·2 = 32768.
    assert kv_cache_bytes(KVCacheConfig(bits=4), smollm2, 2048) == 90 * (122_880 + 15_360 + 15_360 + 32_768)
    # 2-bit, G=32, R=128, 150 tokens: only 150 - 128 = 22 over the window, no whole group yet: all fp16
    assert kv_cache_bytes(KVCacheConfig(bits=2), smollm2, 150) == kv_cache_bytes(None, smollm2, 150)


def test_memory_accounting_matches_what_the_cache_holds_with_a_sliding_layer():
    config = transformers.Gemma3TextConfig(
        **TINY, head_dim=16, sliding_window=24, layer_types=["sliding_attention", "full_attention"]
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    setting = KVCacheConfig(bits=4, group_size=8, residual=16)
    ids = torch.randint(3, 300, (1, 77))
    cache = make_cache(model, setting)
    with torch.no_grad():
        forward_in_chunks(model, ids, 20, cache)
    assert isinstance(cache.layers[1], KIVILayer) and cache.layers[1].quantized_length() == 56
    assert stored_bytes(cache, 4) == kv_cache_bytes(setting, config, 77)
    assert cache.layers[0].keys.shape[2] == 23  # the sliding layer: window - 1 tokens, full precision
    assert kv_cache_bytes(None, config, 77) == 2 * 2 * 16 * 2 * (23 + 77)


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"bits": 3}, "'bits' is 3, not one of 2, 4, 8"),
        ({"bits": 16}, "'bits' is 16, not one of 2, 4, 8"),
        ({"residual": 100}, "'residual' is 100, not a multiple of group_size 32.*use a multiple of 32, e.g. 96"),
        ({"group_size": 0}, "'group_size' is 0, outside"),
        ({"targets": "mlp"}, "'targets' does not apply"),
    ],
)
def test_bad_settings_are_refused(stage, message):
    with pytest.raises(SlimlmError, match=message):
        parse_recipe([{"method": "kv-cache", **stage}], "bad")


def test_models_the_cache_does_not_fit_are_refused():
    with pytest.raises(SlimlmError, match="group_size 12 does not divide head_dim 16.*8, 16"):
        check_recipe(
            tiny_model("llama"), parse_recipe([{"method": "kv-cache", "group_size": 12, "residual": 120}], "r"), False
        )
    with pytest.raises(SlimlmError, match="every attention layer of this model uses a sliding window"):
        set_kv_cache_(tiny_model("gemma3_text"), KVCacheConfig())
    odd = tiny_model("llama")
    odd.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(SlimlmError, match="linear_attention layers, not only standard attention"):
        set_kv_cache_(odd, KVCacheConfig())
    with pytest.raises(SlimlmError, match="cannot be rolled back"):
        KIVILayer(KVCacheConfig()).crop(-1)


def test_weight_quantization_then_kv_cache_saves_and_reloads(tmp_path):
    model = tiny_model("llama")
    recipe = load_recipe("rtn-w4-g64-kv4")
    check_recipe(model, recipe, has_calibration=False)  # a kv-cache stage may follow a quantization stage
    compress_(model, recipe)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert kv_cache_setting(model) == KVCacheConfig(bits=4, group_size=32, residual=128)
    save_model(model, tiny_tokenizer(), tmp_path / "m", {"recipe": recipe.to_list()})
    assert json.loads((tmp_path / "m" / "config.json").read_text())["slimlm_kv_cache"] == {
        "bits": 4,
        "group_size": 32,
        "residual": 128,
    }
    manifest = read_manifest(tmp_path / "m")["kv_cache"]
    assert (
        manifest["context_len"] == 2048
        and manifest["fp16_bytes"] == kv_cache_bytes(None, model.config, 2048) > manifest["bytes"]
    )
    assert "kv_cache_for(model)" in manifest["used_by"]
    reloaded = load_model(str(tmp_path / "m"), device="cpu").model
    assert kv_cache_setting(reloaded) == kv_cache_setting(model)


def test_cli_eval_with_kv_bits_reports_protocol_memory_and_fp_cache(tmp_path):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    (tmp_path / "text.txt").write_text(TEXT)
    args = ("eval", path, "--data", tmp_path / "text.txt", "--seqlen", "64", "--windows", "2")
    result = run_cli(
        *args,
        "--kv-bits",
        "2",
        "--kv-group-size",
        "8",
        "--kv-residual",
        "16",
        "--chunk-size",
        "16",
        "--json",
        tmp_path / "r.json",
    )
    assert result.returncode == 0, result.stdout
    out = " ".join(result.stdout.split())
    assert "chunks of 16 tokens through a KIVI 2-bit KV cache" in out and "residual 16 tokens" in out
    assert "KV cache at 64 tokens" in out and "perplexity with a full-precision cache" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kv_cache"]["bytes"] == kv_cache_bytes(
        KVCacheConfig(bits=2, group_size=8, residual=16), tiny_model("llama").config, 64
    )
    bad = run_cli(*args, "--kv-bits", "3")
    assert bad.returncode == 2 and "'bits' is 3, not one of 2, 4, 8" in bad.stdout and "Traceback" not in bad.stdout
