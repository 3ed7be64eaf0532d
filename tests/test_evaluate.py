"""Perplexity (GPTQ protocol), KL / top-1 against a reference, and footprint measures."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_tokenizer
from torch import nn

from slimlm.checkpoint.sizes import directory_bytes, tensor_bytes_by_module, weight_file_bytes
from slimlm.data.text import Text, load_text
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import parameter_count, peak_memory, sparsity
from slimlm.evaluate.perplexity import evaluate_quality, make_windows

SEQLEN = 32


def tiny_llama(seed: int = 0, tie: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(vocab_size=128)


@pytest.fixture(scope="module")
def windows(tokenizer):
    return make_windows(tokenizer, load_text("default"), seqlen=SEQLEN, max_windows=3)


def naive_perplexity(model: nn.Module, input_ids: torch.Tensor) -> float:
    """The straightforward computation: HF's own shifted loss per window, exp of the mean."""
    with torch.no_grad():
        losses = [model(ids[None], labels=ids[None]).loss.item() for ids in input_ids]
    return math.exp(sum(losses) / len(losses))


def test_windows_follow_gptq_protocol(tokenizer):
    from slimlm.data.calibration import tokenize_text

    text = load_text("default")
    ids = tokenize_text(tokenizer, text.text)
    everything = make_windows(tokenizer, text, seqlen=SEQLEN)
    total = ids.numel() // SEQLEN
    assert everything.input_ids.shape == (total, SEQLEN)
    assert torch.equal(everything.input_ids.flatten(), ids[: total * SEQLEN])  # trailing tokens dropped
    assert everything.protocol() == (
        f"GPTQ protocol: {total} non-overlapping windows x {SEQLEN} tokens of {text.label}; no BOS (the tokenizer adds none); "
        "loss on tokens 2..L of each window"
    )
    first = make_windows(tokenizer, text, seqlen=SEQLEN, max_windows=3)
    assert torch.equal(first.input_ids, everything.input_ids[:3])
    assert f"the first 3 of {total} non-overlapping windows" in first.protocol()


def test_too_short_text_for_one_window(tokenizer):
    with pytest.raises(SlimlmError, match="fewer than one window of 2048"):
        make_windows(tokenizer, Text("just a few words", "tiny text"), seqlen=2048)


def test_perplexity_equals_naive_reference(windows):
    model = tiny_llama()
    result, kept = evaluate_quality(model, windows, progress=True)
    expected = naive_perplexity(model, windows.input_ids)
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-4)
    assert 50 < result.perplexity < 300  # a random 128-token model is near-uniform: ppl near 128
    assert (result.windows, result.seqlen, result.kl_windows) == (3, SEQLEN, 0)
    assert result.kl_divergence is None and result.top1_agreement is None and kept is None
    assert result.protocol == windows.protocol()


def test_kl_is_zero_against_itself_and_positive_when_perturbed(windows):
    model = tiny_llama()
    model.train()  # evaluate_quality must evaluate in eval mode and give the mode back
    base, reference = evaluate_quality(model, windows, keep_reference=2, progress=False)
    assert model.training
    assert len(reference.top_ids) == 2 and reference.top_ids[0].shape == (SEQLEN, 128)  # top-256 of 128: everything
    assert reference.top_log_probs[0].dtype == torch.float32 and reference.top_log_probs[0].device.type == "cpu"

    same, none_kept = evaluate_quality(model, windows, reference=reference, progress=False)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-7)
    assert same.top1_agreement == 1.0 and same.kl_windows == 2 and none_kept is None
    assert same.perplexity == base.perplexity

    perturbed = copy.deepcopy(model).eval()
    with torch.no_grad():
        perturbed.lm_head.weight.add_(0.5 * torch.randn_like(perturbed.lm_head.weight))
    moved, _ = evaluate_quality(perturbed, windows, reference=reference, progress=False)
    with torch.no_grad():  # naive KL(p || q) over the 2 reference windows
        q = torch.log_softmax(perturbed(windows.input_ids[:2]).logits.float(), dim=-1)  # (2, L, V)
        p = torch.log_softmax(model(windows.input_ids[:2]).logits.float(), dim=-1)  # (2, L, V)
    naive_kl = (p.exp() * (p - q)).sum(-1).mean().item()
    naive_top1 = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert moved.kl_divergence == pytest.approx(naive_kl, rel=1e-4) and moved.kl_divergence > 1e-3
    assert moved.top1_agreement == pytest.approx(naive_top1) and moved.top1_agreement < 1.0


def test_sparse_kl_is_the_kl_over_top_k_and_one_rest_bucket(windows):
    """With k < vocab the KL is taken over the partition {base's top-k tokens, the rest}: a hand computation of
    that coarse KL must match, and it can only be below the full KL (a coarser partition never raises it)."""
    model, perturbed = tiny_llama(0), tiny_llama(1)
    _, reference = evaluate_quality(model, windows, keep_reference=2, progress=False, top_k=8)
    assert reference.top_ids[0].shape == (SEQLEN, 8) and reference.rest_log_mass[0].shape == (SEQLEN,)
    sparse, _ = evaluate_quality(perturbed, windows, reference=reference, progress=False)
    with torch.no_grad():
        p = torch.log_softmax(model(windows.input_ids[:2]).logits.float(), dim=-1)  # (2, L, V)
        q = torch.log_softmax(perturbed(windows.input_ids[:2]).logits.float(), dim=-1)
    top = p.topk(8, dim=-1).indices  # (2, L, 8)
    p_top, q_top = p.exp().gather(-1, top), q.exp().gather(-1, top)
    p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    coarse = (p_top * (p_top / q_top).log()).sum(-1) + p_rest * (p_rest / q_rest).log()
    full = (p.exp() * (p - q)).sum(-1).mean().item()
    assert sparse.kl_divergence == pytest.approx(coarse.mean().item(), rel=1e-4)
    assert 0 < sparse.kl_divergence < full
    assert "top-8 tokens per position plus the rest's mass" in sparse.protocol and "vocabulary 128" in sparse.protocol


@pytest.mark.parametrize("vocab", [512, 32768])
def test_reference_memory_does_not_grow_with_the_vocabulary(tokenizer, vocab):
    """What is kept per window is O(tokens * k): the same bytes at a 512 and a 32k vocabulary (full float32
    log-probs would be 64x more at 32k)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    windows = make_windows(tokenizer, load_text("default"), seqlen=SEQLEN, max_windows=3)
    _, reference = evaluate_quality(model, windows, keep_reference=3, progress=False, top_k=16)
    assert reference.nbytes() == 3 * SEQLEN * (16 * (4 + 4) + 4)
    assert reference.nbytes() < 3 * SEQLEN * vocab * 4 / 4  # far below the full log-probs even at the small vocab
    same, _ = evaluate_quality(model, windows, reference=reference, progress=False)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0


def bos_tokenizer():
    """The tiny BPE with a post-processor that puts <bos> first, as Llama/Gemma tokenizers do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    plain = tiny_tokenizer(vocab_size=127)  # <bos> becomes id 127, inside the tiny model's 128
    backend = plain.backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def test_windows_start_with_bos_when_the_tokenizer_adds_one(tokenizer):
    from slimlm.data.calibration import tokenize_text
    from slimlm.evaluate.perplexity import bos_token_id

    text = load_text("default")
    with_bos = bos_tokenizer()
    bos = with_bos.bos_token_id
    assert bos_token_id(with_bos) == bos and bos_token_id(tokenizer) is None  # the plain tiny BPE adds none
    windows = make_windows(with_bos, text, seqlen=SEQLEN, max_windows=3)
    ids = tokenize_text(with_bos, text.text)
    assert windows.input_ids.shape == (3, SEQLEN) and (windows.input_ids[:, 0] == bos).all()
    assert torch.equal(windows.input_ids[:, 1:].flatten(), ids[: 3 * (SEQLEN - 1)])  # every text token scored once
    assert windows.total_windows == ids.numel() // (SEQLEN - 1)
    assert f"each window is the tokenizer's BOS (id {bos}" in windows.protocol()
    plain = make_windows(tokenizer, text, seqlen=SEQLEN, max_windows=3)
    assert plain.bos_token_id is None and "no BOS (the tokenizer adds none)" in plain.protocol()
    assert (plain.input_ids[:, 0] != plain.input_ids[0, 0]).any()  # text tokens, not a constant first token
    model = tiny_llama()
    result, _ = evaluate_quality(model, windows, progress=False)
    assert result.perplexity == pytest.approx(naive_perplexity(model, windows.input_ids), rel=1e-4)


def test_reference_from_other_windows_is_refused(tokenizer, windows):
    model = tiny_llama()
    _, reference = evaluate_quality(model, windows, keep_reference=10, progress=False)
    assert len(reference.top_ids) == 3  # clamped to the windows there are
    other = make_windows(tokenizer, load_text("default", "calibration"), seqlen=SEQLEN, max_windows=3)
    with pytest.raises(SlimlmError, match="other windows"):
        evaluate_quality(model, other, reference=reference, progress=False)


def test_parameter_count_and_sparsity():
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    assert parameter_count(untied) - parameter_count(tied) == 128 * 32  # lm_head shares the embedding once tied
    attention = 32 * 32 + 2 * 32 * 16 + 32 * 32  # q, k and v (2 kv heads x 8 dims), o
    layer = attention + 3 * 32 * 64 + 2 * 32  # gate, up, down, two norms
    assert parameter_count(untied) == 2 * 128 * 32 + 2 * layer + 32  # embedding, lm_head, layers, final norm

    class Codes(nn.Module):  # stands in for a quantized linear: int codes in a buffer, no weight parameter
        def __init__(self):
            super().__init__()
            self.register_buffer("weight_q", torch.zeros(4, 8, dtype=torch.uint8))
            self.scale = nn.Parameter(torch.ones(4))

    assert parameter_count(nn.Sequential(Codes(), nn.Linear(8, 2))) == 32 + 4 + 18

    model = tiny_llama()
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :32] = 0  # half of one of two equal-size weights
    assert sparsity(model, names) == 0.25
    with pytest.raises(SlimlmError, match="no module 'model.layers.9.mlp'"):
        sparsity(model, ["model.layers.9.mlp"])


def test_file_sizes_from_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    first = {
        "model.a.weight": torch.zeros(4, 3),
        "model.a.bias": torch.zeros(3),
        "lm_head.weight": torch.zeros(2, 2, dtype=torch.bfloat16),
    }
    second = {
        "model.a.weight_scale": torch.zeros(4, dtype=torch.float16),
        "model.b.weight_q": torch.zeros(5, dtype=torch.uint8),
    }
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")  # model.a spans both shards
    (tmp_path / "config.json").write_text("{}")
    assert tensor_bytes_by_module(tmp_path) == {"model.a": 48 + 12 + 8, "lm_head": 8, "model.b": 5}
    shards = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert weight_file_bytes(tmp_path) == shards
    assert directory_bytes(tmp_path) == shards + 2
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SlimlmError, match="broken.safetensors"):
        tensor_bytes_by_module(tmp_path)
    with pytest.raises(SlimlmError, match="not a directory"):
        directory_bytes(tmp_path / "config.json")


def test_peak_memory_reports_rss():
    peak = peak_memory()
    assert 10 < peak["cpu_peak_rss_mb"] < 1_000_000  # a Python process with torch is tens of MB at least
    assert (peak["cuda_max_allocated_mb"] is None) == (not torch.cuda.is_available())
