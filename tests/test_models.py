"""Adapter table, save -> load round trips across architectures, and what plain transformers can read back."""

import json

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from slimlm.checkpoint.manifest import MANIFEST
from slimlm.checkpoint.save import save_model
from slimlm.errors import SlimlmError
from slimlm.models.adapters import ADAPTERS, adapter_for, block_linears, decoder_blocks, linear_weight
from slimlm.models.load import load_model
from slimlm.pipeline import compress_
from slimlm.quantize.linear import QuantizedLinear
from slimlm.recipes import load_recipe

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 64]])


def _logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_adapter_finds_every_part(arch):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    assert len(decoder_blocks(model)) == 2
    for path in (adapter.embed, adapter.final_norm, adapter.lm_head):
        assert model.get_submodule(path) is not None
    linears = block_linears(model, 1)
    assert len(linears) == len(adapter.linears())
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    first = linear_weight(next(iter(linears.values())))
    assert first.shape[1] == hidden  # the first projection reads the residual stream: (out, in) layout for Conv1D too
    block = decoder_blocks(model)[1]
    for norm, readers in adapter.input_norms:
        weight = block.get_submodule(norm).weight
        assert weight.shape == (hidden,)
        assert set(readers) <= set(adapter.linears())


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(
        SlimlmError, match="unsupported architecture 'mamba'.*gemma3_text.*gpt2.*llama.*opt.*phi3.*qwen2"
    ):
        adapter_for("mamba")
    assert {"llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "opt"} <= ADAPTERS.keys()


@pytest.mark.parametrize("recipe", ["magnitude-2of4", "rtn-w4-g64", "rtn-w8", "magnitude-2of4-w8"])
def test_save_and_reload_gives_identical_logits(arch, recipe, tmp_path):
    model = tiny_model(arch)
    compress_(model, load_recipe(recipe))
    expected = _logits(model)
    out = tmp_path / "out"
    save_model(model, tiny_tokenizer(), out, {"recipe": recipe})
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", MANIFEST):
        assert (out / name).is_file(), name
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["recipe"] == recipe and manifest["versions"]["torch"] == torch.__version__
    loaded = load_model(str(out))
    assert loaded.kind == "slimlm-dir"
    torch.testing.assert_close(_logits(loaded.model), expected, rtol=0, atol=1e-5)  # bit-exact but for kernel choice
    quantized = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == (14 if arch != "gpt2" else 8) * any(s.method == "rtn" for s in load_recipe(recipe).stages)
    assert not list(tmp_path.glob(".*partial*"))


def test_dense_result_loads_in_plain_transformers(arch, tmp_path):
    model = tiny_model(arch)
    compress_(model, load_recipe("magnitude-50"))
    save_model(model, tiny_tokenizer(), tmp_path / "out", {})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(_logits(plain), _logits(model))


@pytest.mark.parametrize("recipe", ["rtn-w8", "rtn-w4-g64-sym"])
def test_symmetric_quantized_result_loads_in_transformers_with_compressed_tensors(recipe, tmp_path):
    """transformers + compressed-tensors decompress our pack-quantized files to the same weights.

    (Asymmetric pack-quantized checkpoints are valid compressed-tensors — see test_quantize — but transformers
    5.x cannot load them yet: llm-compressor issue #1618.)"""
    model = tiny_model("llama")
    compress_(model, load_recipe(recipe))
    save_model(model, tiny_tokenizer(), tmp_path / "out", {})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "pack-quantized"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=1e-3, atol=1e-3)


def test_int4_packed_bytes_are_a_quarter_of_fp16_plus_scales(tmp_path):
    from slimlm.checkpoint.sizes import tensor_bytes_by_module

    model = tiny_model("llama")
    compress_(model, load_recipe("rtn-w4-g64"))
    save_model(model, tiny_tokenizer(), tmp_path / "out", {})
    by_module = tensor_bytes_by_module(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    for name, (out_features, in_features) in manifest["quantized_linears"].items():
        codes = out_features * in_features // 2
        scales_and_zeros = out_features * (in_features // 64) * 2 + out_features * (in_features // 64) // 2
        assert by_module[name] == codes + scales_and_zeros + 16  # + weight_shape (2 x int64)
    assert manifest["storage"]["quantized_share_of_fp16"] < 0.30


def _tiny_alias(tmp_path, monkeypatch) -> torch.nn.Module:
    """A tiny llama written as GGUF and registered as the alias 'tiny-alias', the cache under tmp_path."""
    from slimlm.export.gguf import write_gguf
    from slimlm.models import load

    model = tiny_model("llama").eval()
    package = tmp_path / "pkg"
    package.mkdir()
    write_gguf(model, tiny_tokenizer(), package / "tiny.gguf", "f32")
    monkeypatch.setitem(load.ALIASES, "tiny-alias", ("unused", "tiny.gguf"))
    monkeypatch.setattr(load, "resolve_alias", lambda name: package / "tiny.gguf")
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    return model


def test_embedded_model_loads_from_its_dense_copy_with_the_same_logits(tmp_path, monkeypatch):
    _tiny_alias(tmp_path, monkeypatch)
    first = load_model("tiny-alias")
    copies = list((tmp_path / "cache" / "models").iterdir())
    assert len(copies) == 1 and (copies[0] / "model.safetensors").is_file()
    again = load_model("tiny-alias")
    assert torch.equal(_logits(first.model), _logits(again.model))
    assert again.tokenizer("small models") == first.tokenizer("small models")
    assert again.kind == "alias-gguf" and again.resolved == first.resolved  # still the GGUF, for the GGUF writers
    (copies[0] / "model.safetensors").write_bytes(b"")  # a copy that no longer matches would fail loudly ...
    (tmp_path / "pkg" / "tiny.gguf").touch()  # ... but a changed file gets a new key, so the stale copy is unused
    assert torch.equal(_logits(load_model("tiny-alias").model), _logits(first.model))


def test_embedded_model_loads_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    _tiny_alias(tmp_path, monkeypatch)
    (tmp_path / "cache").write_text("a file where the cache directory would go")
    assert torch.equal(_logits(load_model("tiny-alias").model), _logits(load_model("tiny-alias").model))
