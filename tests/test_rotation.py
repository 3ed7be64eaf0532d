"""Residual-stream rotation (QuaRot): Hadamard constructions, function preserved on every supported architecture,
unsupported ones refused, and the result a plain transformers checkpoint."""

import pytest
import torch
import transformers
from conftest import TINY, TINY_CONFIGS, tiny_model, tiny_tokenizer

from slimlm.errors import SlimlmError
from slimlm.models.adapters import adapter_for, decoder_blocks
from slimlm.pipeline import compress_
from slimlm.quantize.rotation import (
    RotateConfig,
    hadamard,
    hadamard_factors,
    paley,
    paley_prime,
    rotate_,
    rotation_matrix,
    sylvester,
)
from slimlm.recipes import parse_recipe

CONFIGS = {
    "llama": lambda tie: transformers.LlamaConfig(**TINY, tie_word_embeddings=tie),
    "llama-bias": lambda tie: transformers.LlamaConfig(
        **TINY, tie_word_embeddings=tie, attention_bias=True, mlp_bias=True
    ),
    "mistral": lambda tie: transformers.MistralConfig(**TINY, tie_word_embeddings=tie),
    "qwen2": lambda tie: transformers.Qwen2Config(**TINY, tie_word_embeddings=tie),
    "qwen3": lambda tie: transformers.Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=tie),
    "gemma": lambda tie: transformers.GemmaConfig(**TINY, head_dim=16, tie_word_embeddings=tie),
    "phi3": lambda tie: transformers.Phi3Config(**TINY, tie_word_embeddings=tie),
}


def build(arch: str, tie: bool, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose norm gains and biases are random, so fusing them is actually exercised."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch](tie), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.5)
    return model


@pytest.mark.parametrize("n", [2, 4, 12, 20, 28, 36, 60, 64, 72, 108, 140, 576, 896, 960, 1536])
def test_constructed_hadamard_matrices_are_orthogonal(n):
    h = hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.t(), n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)


def test_paley_orders_and_their_primes():
    assert paley_prime(12) == ("I", 11) and paley_prime(20) == ("I", 19) and paley_prime(72) == ("I", 71)
    assert paley_prime(28) == ("II", 13) and paley_prime(36) == ("II", 17)
    assert paley_prime(52) is None and paley_prime(18) is None  # 51, 25 are not prime; 18 is not a multiple of 4
    for m in (12, 20, 28, 36, 44, 60):
        torch.testing.assert_close(paley(m) @ paley(m).t(), m * torch.eye(m, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(sylvester(8) @ sylvester(8).t(), 8 * torch.eye(8, dtype=torch.float64), rtol=0, atol=0)


def test_smollm2_hidden_size_576_gets_a_hadamard_and_powers_of_two_stay_sylvester():
    assert hadamard_factors(576) == (8, 72)  # 576 = 8 · (71 + 1)
    assert hadamard_factors(64) == (64, 1)
    assert hadamard_factors(52) is None


def test_rotation_is_orthogonal_seeded_and_falls_back_to_random_orthogonal():
    q, how = rotation_matrix(576, "hadamard", torch.Generator().manual_seed(0))
    assert how.startswith("random Hadamard 576")
    torch.testing.assert_close(q @ q.t(), torch.eye(576, dtype=torch.float64), rtol=0, atol=1e-12)
    again, _ = rotation_matrix(576, "hadamard", torch.Generator().manual_seed(0))
    other, _ = rotation_matrix(576, "hadamard", torch.Generator().manual_seed(1))
    assert torch.equal(q, again) and not torch.equal(q, other)
    q, how = rotation_matrix(52, "hadamard", torch.Generator().manual_seed(0))
    assert how.startswith("random orthogonal 52×52 (no Hadamard")
    torch.testing.assert_close(q @ q.t(), torch.eye(52, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("matrix", ["hadamard", "orthogonal"])
def test_rotation_keeps_the_logits(arch, tie, matrix):
    model = build(arch, tie)
    ids = torch.randint(3, 300, (2, 12))
    embedding_before = model.get_input_embeddings().weight.clone()
    with torch.no_grad():
        before = model(ids).logits
    summary = rotate_(model, RotateConfig(matrix=matrix))
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    assert not torch.allclose(model.get_input_embeddings().weight, embedding_before, atol=1e-3)  # it did rotate
    adapter = adapter_for(model)
    one = 0.0 if arch == "gemma" else 1.0
    for block in decoder_blocks(model):
        for path, _ in adapter.input_norms:
            assert torch.all(block.get_submodule(path).weight == one)
    lm_head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (lm_head is embedding) == (summary.untied_bytes == 0 and tie)
    assert model.config.tie_word_embeddings == (lm_head is embedding)
    if tie:
        assert summary.untied_bytes == embedding.numel() * 4


def test_a_uniform_final_gain_keeps_the_embeddings_tied():
    model = build("llama", tie=True)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.7)
        before = model(torch.arange(3, 15)[None]).logits
    summary = rotate_(model, RotateConfig())
    assert summary.untied_bytes == 0 and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    assert torch.all(model.model.norm.weight == 1.7)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.arange(3, 15)[None]).logits, before, rtol=1e-4, atol=1e-4)


def test_untie_false_refuses_a_tied_model_with_a_non_uniform_final_gain():
    model = build("llama", tie=True)
    embedding = model.model.embed_tokens.weight.clone()
    with pytest.raises(SlimlmError, match="untie: true"):
        rotate_(model, RotateConfig(untie=False))
    assert torch.equal(model.model.embed_tokens.weight, embedding)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("gpt2", "LayerNorm subtracts the mean"),
        ("opt", "LayerNorm subtracts the mean"),
        ("gemma3_text", "post_attention_layernorm, post_feedforward_layernorm"),
    ],
)
def test_unsupported_architectures_are_refused_before_anything_changes(arch, message):
    model = tiny_model(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match=message) as err:
        rotate_(model, RotateConfig())
    assert "llama, mistral, qwen2, qwen3, gemma, phi3" in str(err.value)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_rotate_after_quantization_and_bad_keys_are_refused():
    recipe = parse_recipe([{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "rotate"}], "late")
    with pytest.raises(SlimlmError, match="after a quantization stage"):
        compress_(tiny_model("llama"), recipe)
    with pytest.raises(SlimlmError, match="'targets' does not apply"):
        parse_recipe([{"method": "rotate", "targets": "mlp"}], "x")
    with pytest.raises(SlimlmError, match="'matrix' is 'walsh'"):
        parse_recipe([{"method": "rotate", "matrix": "walsh"}], "x")


def test_rotate_then_rtn_runs_and_the_saved_model_loads_in_plain_transformers(tmp_path):
    from slimlm.checkpoint.save import save_model

    model = build("llama", tie=True)
    ids = torch.randint(3, 300, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    compress_(model, parse_recipe([{"method": "rotate"}], "rotate"))
    save_model(model, tiny_tokenizer(), tmp_path / "rotated", {"recipe": "rotate"})
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rotated", dtype=torch.float32).eval()
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    quantized = build("llama", tie=True)
    compress_(
        quantized, parse_recipe([{"method": "rotate"}, {"method": "rtn", "bits": 8, "group_size": 32}], "rotate-w8")
    )
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids).logits, before, rtol=0.05, atol=0.05 * before.abs().max().item())


def test_every_tiny_architecture_is_either_rotated_exactly_or_refused():
    for arch in TINY_CONFIGS:
        model = tiny_model(arch)
        ids = torch.randint(3, 300, (1, 10))
        with torch.no_grad():
            before = model(ids).logits
        try:
            rotate_(model, RotateConfig())
        except SlimlmError:
            assert arch in ("gpt2", "opt", "gemma3_text")
            continue
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
