"""Tiny random models of several architectures, built from config (never downloaded), and shared paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext-2-raw"

IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **IDS)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=64),
    "mistral": lambda: transformers.MistralConfig(**TINY),
    "phi3": lambda: transformers.Phi3Config(**TINY),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=320, **IDS, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": lambda: transformers.OPTConfig(vocab_size=320, **IDS, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
}
CORE_ARCHS = ["llama", "qwen2", "gemma3_text", "gpt2"]


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), dtype=torch.float32)
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on a little text: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog " * 4, "small language models are compressed language models"]
    tok.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(params=CORE_ARCHS)
def arch(request) -> str:
    return request.param
