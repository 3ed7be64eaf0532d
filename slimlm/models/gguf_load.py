"""A llama-family GGUF read as a dense checkpoint (config + float32 state dict) in one parse.

transformers' GGUF loader parses the file once for the config and again for the weights, and rebuilds the `gguf`
package's tensor-name map for every tensor: 13 s for SmolLM2-135M on 2 cores, of which one parse is 2-4 s. For the
architectures whose layout is the plain inverse of slimlm's writer (`export.gguf_arch`: llama, qwen2, qwen3 — norms
as they are, q/k rows permuted back for llama's RoPE), slimlm reads the file itself: `read_gguf`'s one parse (shared
with the search's sizer), the `gguf` package's dequantizers, the writer's names inverted. A file that uses
anything this reader does not know (another architecture, RoPE scaling, a tensor with no HF name) goes through
transformers as before: `dense_checkpoint` answers None.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimlm.export.gguf_arch import ARCHITECTURES
from slimlm.models.gguf_check import read_gguf

READABLE = ("llama", "qwen2", "qwen3")  # general.architecture == HF model_type for these three
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def dense_checkpoint(path: Path) -> tuple[object, dict[str, torch.Tensor]] | None:
    """(transformers config, float32 state dict) of the GGUF at `path`, or None where transformers must read it."""
    from transformers import AutoConfig

    from slimlm.export.gguf import unpermute_rope_rows

    reader = read_gguf(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.")}
    arch = fields.get("general.architecture")
    if arch not in READABLE or any(key.startswith(f"{arch}.rope.scaling") for key in fields):
        return None
    names = _hf_names(arch, fields[f"{arch}.block_count"])
    if any(tensor.name not in names for tensor in reader.tensors):
        return None
    config = AutoConfig.for_model(arch, **_config_kwargs(reader, fields, arch))
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    state = {}
    for tensor in reader.tensors:
        name = names[tensor.name]
        values = _dequantized(tensor)
        kind = name.split(".")[-2]
        if arch == "llama" and kind in heads:  # llama.cpp's adjacent-pair RoPE rows back to HF's halves
            values = unpermute_rope_rows(values, heads[kind])
        state[name] = values
    return config, state


def _hf_names(arch: str, blocks: int) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, the inverse of `export.gguf`'s names for this architecture."""
    names = {f"{gguf}.weight": f"{hf}.weight" for gguf, hf in GLOBAL_TENSORS.items()}
    for i in range(blocks):
        for rel, base in ARCHITECTURES[arch].block:
            for part in ("weight", "bias"):
                names[f"blk.{i}.{base}.{part}"] = f"model.layers.{i}.{rel}.{part}"
    return names


def _config_kwargs(reader, fields: dict, arch: str) -> dict:
    def key(name: str, default=None):
        return fields.get(f"{arch}.{name}", default)

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    tensors = {tensor.name for tensor in reader.tensors}
    kwargs = {
        "vocab_size": key("vocab_size") or len(tokens.data),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length") or hidden // heads,
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
        "_model_name_or_path": fields.get("general.name"),  # as transformers' GGUF loader names it
    }
    if arch != "qwen2":  # qwen2's q/k/v biases are part of its architecture
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensors
    for token, field in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        value = reader.fields.get(f"tokenizer.ggml.{field}_token_id")
        if value is not None:
            kwargs[f"{token}_token_id"] = int(value.contents())
    return kwargs


def _dequantized(tensor) -> torch.Tensor:
    from gguf import quants

    shape = tuple(int(n) for n in reversed(tensor.shape))
    values = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return torch.from_numpy(values.reshape(shape).copy())
