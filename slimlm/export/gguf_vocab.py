"""The tokenizer as llama.cpp reads it: `tokenizer.ggml.*` keys, from the GGUF a model came from or its HF tokenizer.

Two vocabulary kinds cover the architectures slimlm exports (llama.cpp's llama-vocab.cpp, convert_hf_to_gguf.py):

    gpt2   byte-level BPE (GPT-2, SmolLM, Qwen, Llama 3): tokens in the byte alphabet, merges, and the name of the
           pre-tokenizer regex llama.cpp applies before merging ("gpt-2", "smollm", "qwen2", "llama-bpe").
    llama  SentencePiece BPE (Gemma, Llama 2, Mistral v0.1, Phi-3): tokens spelt with "▁" for a space, a score per
           token — llama.cpp merges the adjacent pair whose concatenation scores highest — and a type per token
           (NORMAL, BYTE for the <0xXX> fallback pieces, CONTROL, USER_DEFINED, UNKNOWN, UNUSED), plus whether a
           space is prepended to the text (add_space_prefix).

A HF tokenizer converted from SentencePiece is a `tokenizers` BPE with byte_fallback whose merges are listed
best-first; the score of a token is minus the rank of the merge that makes it, so llama.cpp's highest-score-first
merging replays HF's lowest-rank-first merging.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from slimlm.errors import SlimlmError

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# Llama 3's split regex (its tokenizer.json); llama.cpp applies it for the pre-tokenizer "llama-bpe"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
UNUSED_SCORE = -10000.0  # convert_hf_to_gguf's scores for padding ids and added tokens
ADDED_SCORE = -1000.0


def copy_tokenizer_metadata(writer, source: Path, vocab_size: int) -> bool:
    """Copy every `tokenizer.*` key of the GGUF the model came from (same vocabulary); False if it does not fit."""
    stat = Path(source).stat()
    tokens, fields = _tokenizer_fields(str(source), stat.st_size, stat.st_mtime_ns)
    if tokens != vocab_size:
        return False
    for key, contents, main, sub in fields:
        writer.add_key_value(key, contents, main, sub_type=sub)
    return True


@functools.lru_cache(maxsize=2)
def _tokenizer_fields(path: str, size: int, mtime_ns: int) -> tuple[int | None, tuple]:
    """(token count, each `tokenizer.*` key as (key, contents, type, array type)) of a GGUF file, read once per
    process and file version (a search writes several headers; the parse is `read_gguf`'s, shared with the loader)."""
    from gguf import GGUFValueType

    from slimlm.models.gguf_check import read_gguf

    reader = read_gguf(Path(path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    fields = []
    for key, entry in reader.fields.items():
        if key.startswith("tokenizer."):
            main = entry.types[0]
            fields.append((key, entry.contents(), main, entry.types[-1] if main == GGUFValueType.ARRAY else None))
    return (len(tokens.data) if tokens is not None else None), tuple(fields)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a HF byte-level pre-tokenizer (the regex llama.cpp must apply), None if unknown."""
    from transformers.models.qwen2.tokenization_qwen2 import (
        PRETOKENIZE_REGEX as QWEN2_SPLIT,
    )

    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def _steps(node: dict | None) -> list[dict]:
    if node is None:
        return []
    key = {"Sequence": "normalizers" if "normalizers" in node else "pretokenizers"}.get(node["type"])
    return node[key] if key else [node]


def sentencepiece_prefix(backend: dict) -> bool | None:
    """For a SentencePiece-style BPE (spaces spelt "▁", byte fallback): whether a space is prepended to the text;
    None when the tokenizer is not SentencePiece-style."""
    model = backend.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    normalizers = _steps(backend.get("normalizer"))
    metaspace = [s for s in _steps(backend.get("pre_tokenizer")) if s["type"] == "Metaspace"]
    spelt = any(s["type"] == "Replace" and s.get("content") == "▁" for s in normalizers) or bool(metaspace)
    if not spelt:
        return None
    prepended = any(s["type"] == "Prepend" and s.get("prepend") == "▁" for s in normalizers)
    return prepended or any(s.get("prepend_scheme", "always") in ("always", "first") for s in metaspace)


def _vocab_by_id(tokenizer, config) -> dict[int, str]:
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= config.vocab_size:
        raise SlimlmError(
            f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size {config.vocab_size}",
            "resize the embeddings or fix the tokenizer",
        )
    return {index: token for token, index in vocab.items()}


def _bpe_vocab(writer, tokenizer, config, model: dict, pre: str) -> None:
    from gguf import TokenType

    by_id, added = _vocab_by_id(tokenizer, config), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(config.vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(
                TokenType.NORMAL
                if index not in added
                else TokenType.CONTROL
                if added[index].special
                else TokenType.USER_DEFINED
            )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)


def _sentencepiece_vocab(writer, tokenizer, config, model: dict, prefix: bool) -> None:
    from gguf import TokenType

    by_id, added = _vocab_by_id(tokenizer, config), tokenizer.added_tokens_decoder
    rank: dict[str, int] = {}
    for position, merge in enumerate(model.get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, position)
    unk = model.get("unk_token") or getattr(tokenizer, "unk_token", None)
    tokens, scores, types = [], [], []
    for index in range(config.vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            scores.append(UNUSED_SCORE)
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        if index in added and not BYTE_PIECE.fullmatch(token) and token != unk:
            scores.append(ADDED_SCORE)
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
            continue
        scores.append(-float(rank[token] + 1) if token in rank else 0.0)  # pieces no merge makes: single characters
        types.append(
            TokenType.BYTE if BYTE_PIECE.fullmatch(token) else TokenType.UNKNOWN if token == unk else TokenType.NORMAL
        )
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prefix)


def hf_tokenizer_metadata(writer, tokenizer, config) -> None:
    """The HF tokenizer's vocabulary (byte-level BPE or SentencePiece-style), special ids and chat template, as
    convert_hf_to_gguf writes them."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model", {})
    pre = _pre_tokenizer_name(backend.get("pre_tokenizer"))
    prefix = sentencepiece_prefix(backend)
    if model.get("type") == "BPE" and pre is not None:
        _bpe_vocab(writer, tokenizer, config, model, pre)
    elif prefix is not None:
        _sentencepiece_vocab(writer, tokenizer, config, model, prefix)
    else:
        raise SlimlmError(
            "GGUF export can describe to llama.cpp byte-level BPE tokenizers (GPT-2, SmolLM, Qwen2 pre-tokenizers) and "
            "SentencePiece-style BPE ones (byte fallback, '▁' for spaces: Gemma, Llama 2, Phi-3); this one is neither",
            "export from a model that came from a GGUF (its tokenizer is copied), or use --format compressed-tensors / hf",
        )
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        token_id = token_id if token_id is not None else getattr(config, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < config.vocab_size:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    ids = tokenizer("a").input_ids  # what the tokenizer really adds around a text (post-processor or flags)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bos is not None and ids[:1] == [bos])
    writer.add_add_eos_token(eos is not None and len(ids) > 1 and ids[-1] == eos)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
