"""Tiny random models of several architectures, built from config (never downloaded), and shared paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext-2-raw"

IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    **IDS,
)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=64),
    "mistral": lambda: transformers.MistralConfig(**TINY),
    "phi3": lambda: transformers.Phi3Config(**TINY),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=320, **IDS, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=320,
        **IDS,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    ),
}
CORE_ARCHS = ["llama", "qwen2", "gemma3_text", "gpt2"]


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), dtype=torch.float32)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 256, model_max_length: int = 64, every_byte: bool = False):
    """A byte-level BPE trained in memory on part of the default corpus: real HF tokenizer code, no download.
    `every_byte`: all 256 bytes in the vocabulary (any text encodes without <unk>, as llama.cpp's BPE encodes it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from slimlm.data.text import load_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if every_byte else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator([load_text("default", "calibration").text[:50_000]], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", model_max_length=model_max_length
    )


TEXT = "the quick brown fox jumps over the lazy dog. small language models are compressed language models.\n" * 30


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m slimlm.cli ARGS` as a user runs it; stdout and stderr together in `.stdout` (rich prints to stderr)."""
    full_env = {**os.environ, "SLIMLM_QUIET": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "slimlm.cli", *map(str, args)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


@pytest.fixture(params=CORE_ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A plain Hugging Face directory (save_pretrained) of a tiny random Llama and its tokenizer, shared by the
    tests of one module. Copy it before changing it."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
