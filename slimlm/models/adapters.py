"""Where each architecture keeps its parts: one table instead of one driver per architecture.

Every algorithm in slimlm reaches the decoder blocks, embeddings, final norm and the attention / MLP
projections through `adapter_for(model)`, so supporting a new family is one table row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class ArchAdapter:
    """Attribute paths (dotted, relative to the CausalLM model) of the parts slimlm touches."""

    blocks: str  # the nn.ModuleList of decoder blocks
    embed: str  # token embedding
    final_norm: str
    lm_head: str
    position_embed: str | None  # learned absolute positions (GPT-2, OPT)
    rotary: str | None  # model-level rotary embedding module, called once per forward
    # Linear projections inside a block, relative to the block, in execution order.
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    # Projections that read the very same input tensor: their input statistics are computed once.
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    # Each norm inside a block (relative path) and the projections that read its output directly: where a
    # per-input-channel scale can be folded (AWQ, SmoothQuant) and what a norm fuses into (rotations).
    input_norms: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Structured width pruning (prune/width.py). A producer's output rows are read as consecutive segments, one
    # letter each: "c" = the MLP channels, "q" = query heads, "k" / "v" = key / value heads (Phi-3 fuses them:
    # "cc" for gate_up_proj, "qkv" for qkv_proj). The consumer is the linear whose input columns are those
    # channels / the concatenated heads. Empty producers = that axis cannot be pruned for this architecture.
    mlp_producers: tuple[tuple[str, str], ...] = ()  # (projection, row layout)
    mlp_consumer: str = ""
    mlp_width: str = "intermediate_size"  # config attribute holding the MLP width
    head_producers: tuple[tuple[str, str], ...] = ()  # (projection, row layout); () for GPT-2 / OPT, whose config
    head_consumer: str = ""  # derives the head size from hidden_size / num_heads, so fewer heads is not expressible

    def linears(self) -> tuple[str, ...]:
        return self.attention + self.mlp


_LLAMA_LIKE = ArchAdapter(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    position_embed=None,
    rotary="model.rotary_emb",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
    input_norms=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    mlp_producers=(("mlp.gate_proj", "c"), ("mlp.up_proj", "c")),
    mlp_consumer="mlp.down_proj",
    head_producers=(("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")),
    head_consumer="self_attn.o_proj",
)

# Gemma 2/3 normalise the attention output again (post_attention_layernorm) before the residual add; the MLP
# reads pre_feedforward_layernorm.
_GEMMA2_LIKE = replace(
    _LLAMA_LIKE,
    input_norms=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
)

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "phi3": ArchAdapter(
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        position_embed=None,
        rotary="model.rotary_emb",
        attention=("self_attn.qkv_proj", "self_attn.o_proj"),
        mlp=("mlp.gate_up_proj", "mlp.down_proj"),
        input_norms=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
        mlp_producers=(("mlp.gate_up_proj", "cc"),),
        mlp_consumer="mlp.down_proj",
        head_producers=(("self_attn.qkv_proj", "qkv"),),
        head_consumer="self_attn.o_proj",
    ),
    "gpt2": ArchAdapter(
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        position_embed="transformer.wpe",
        rotary=None,
        attention=("attn.c_attn", "attn.c_proj"),
        mlp=("mlp.c_fc", "mlp.c_proj"),
        input_norms=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        mlp_producers=(("mlp.c_fc", "c"),),
        mlp_consumer="mlp.c_proj",
        mlp_width="n_inner",
    ),
    "opt": ArchAdapter(
        blocks="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        position_embed="model.decoder.embed_positions",
        rotary=None,
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        mlp=("fc1", "fc2"),
        shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
        input_norms=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
        mlp_producers=(("fc1", "c"),),
        mlp_consumer="fc2",
        mlp_width="ffn_dim",
    ),
}


def adapter_for(model_or_type: nn.Module | str) -> ArchAdapter:
    """The adapter for a model (or a `config.model_type`); unknown architectures are refused by name."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type not in ADAPTERS:
        raise SlimlmError(
            f"unsupported architecture '{model_type}'",
            f"slimlm supports: {', '.join(sorted(ADAPTERS))} (add a row to slimlm/models/adapters.py)",
        )
    return ADAPTERS[model_type]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(adapter_for(model).blocks)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear with its weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def set_linear_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out_features, in_features) weight back in the module's own layout."""
    target = weight.t() if type(module).__name__ == "Conv1D" else weight
    with torch.no_grad():
        module.weight.copy_(target.to(module.weight.dtype))


def block_linears(model: nn.Module, block_index: int) -> dict[str, nn.Module]:
    """Fully-qualified name -> linear module for the projections of one decoder block."""
    adapter = adapter_for(model)
    block = decoder_blocks(model)[block_index]
    prefix = f"{adapter.blocks}.{block_index}"
    return {f"{prefix}.{rel}": block.get_submodule(rel) for rel in adapter.linears()}
