"""What llama.cpp expects of each architecture it runs: one row per Hugging Face `model_type`.

Read from llama.cpp's own converter (convert_hf_to_gguf.py, conversion/*.py) and model graphs (src/models/*.cpp):

    HF model_type   llama.cpp arch  RoPE           norms                          block layout
    llama, mistral  llama           adjacent pairs RMSNorm w                      q, k, v, o; gate, up, down
    qwen2           qwen2           NeoX (halves)  RMSNorm w                      + q/k/v biases
    qwen3           qwen3           NeoX           RMSNorm w, + per-head q/k norm
    gemma           gemma           NeoX           RMSNorm (1 + w)                output = token_embd (always tied)
    gemma2          gemma2          NeoX           (1 + w), post-attention and    + soft-capping, sliding window on
                                                   post-FFN norms                   alternate layers (always tied)
    gemma3_text     gemma3          NeoX           (1 + w), post norms, q/k norm  + sliding window per layer, local
                                                                                    RoPE base
    phi3            phi3            NeoX           RMSNorm w                      fused qkv, fused gate_up (= ffn_up)
    gpt2            gpt2            none (learned) LayerNorm w, b                 fused qkv, biases, Conv1D (in, out)

- RoPE: HF rotates the two halves of each head; llama.cpp's LLAMA rope type rotates adjacent pairs, so for those
  architectures the rows of q/k (with their codes, scales, zero points, biases) are permuted per head
  (`permute_rope_rows`). NeoX-type architectures rotate halves as HF does: rows kept.
- Gemma's RMSNorm computes x̂·(1 + w); llama.cpp's computes x̂·w, so every Gemma norm is written as w + 1
  (convert_hf_to_gguf adds 1 to every `*norm.weight`, q/k norms included).
- Gemma 2/3: llama.cpp scales queries by 1/√head_dim (1/√(hidden/heads) for the 27B, told apart by its layer
  count), HF by 1/√query_pre_attn_scalar. Where they differ the ratio is folded into the query: Gemma 3's q-norm
  weight, Gemma 2's q_proj rows (so llama.cpp computes HF's attention exactly).
- GPT-2's Conv1D stores (in, out); GGUF wants (out, in) rows like nn.Linear (`linear_weight`).
OPT is refused: llama.cpp has no OPT graph (learned positions offset by 2, ReLU MLP, its own projection sizes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slimlm.errors import SlimlmError

_LLAMA = (
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)
_QK_NORM = (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"))
_GEMMA2 = (
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
)
_PHI3 = (
    ("input_layernorm", "attn_norm"),
    ("self_attn.qkv_proj", "attn_qkv"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_up_proj", "ffn_up"),  # llama.cpp splits [gate; up] itself (LLM_FFN_SWIGLU on the fused tensor)
    ("mlp.down_proj", "ffn_down"),
)
_GPT2 = (
    ("ln_1", "attn_norm"),
    ("attn.c_attn", "attn_qkv"),
    ("attn.c_proj", "attn_output"),
    ("ln_2", "ffn_norm"),
    ("mlp.c_fc", "ffn_up"),
    ("mlp.c_proj", "ffn_down"),
)


@dataclass(frozen=True)
class GGUFArch:
    """How one HF architecture is laid out as the llama.cpp architecture `name`."""

    name: str  # general.architecture
    block: tuple[tuple[str, str], ...]  # (module path inside a decoder block, GGUF base name), in llama.cpp's order
    permute_qk: bool = False  # llama.cpp rotates adjacent pairs (LLAMA rope type): permute q/k rows per head
    norm_shift: float = 0.0  # added to every norm weight (Gemma's x̂·(1 + w))
    tied_only: bool = False  # llama.cpp reads token_embd as the output projection; no output.weight exists
    activations: tuple[str, ...] = ("silu",)  # HF activation names llama.cpp's graph computes for this arch
    query_scale_into: str | None = None  # where HF's and llama.cpp's query scales are reconciled (Gemma 2/3)
    layernorm: bool = False  # LayerNorm (weight, bias, layer_norm_epsilon) instead of RMSNorm
    query_is_hidden: bool = False  # llama.cpp sizes q and o hidden × hidden: heads × head_dim must be the hidden size
    attention_bias: bool = True  # llama.cpp loads an attention output bias (config.attention_bias may be set)
    extra_keys: Callable | None = field(default=None, compare=False)  # writer, config, model -> arch-only keys

    def rope_rows(self, rel: str, config) -> int | None:
        """Heads whose rows `rel` holds, when its rows must be permuted for llama.cpp's RoPE (else None)."""
        if not self.permute_qk:
            return None
        heads = config.num_attention_heads
        return {"self_attn.q_proj": heads, "self_attn.k_proj": _kv_heads(config)}.get(rel)


# --- hyperparameters ----------------------------------------------------------------------------------------


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """RoPE settings (rope_theta, rope_type, factor); transformers 5 keeps them in `rope_parameters`, nested per
    layer type for Gemma 3; older configs use rope_theta / rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return params.get(layer_type, params) if layer_type in params else params
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


def _sliding_pattern(config) -> list[bool] | None:
    """Per layer: does it use sliding-window attention (from `layer_types`, which depth pruning keeps exact)."""
    types = getattr(config, "layer_types", None)
    return None if types is None else [t == "sliding_attention" for t in types]


def _gemma2_keys(writer, config, model) -> None:
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    writer.add_sliding_window(int(config.sliding_window))
    if (pattern := _sliding_pattern(config)) is not None:
        writer.add_sliding_window_pattern(pattern)


def _gemma3_keys(writer, config, model) -> None:
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    pattern = _sliding_pattern(config)
    if pattern and any(pattern) and config.sliding_window:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern(pattern)
        writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention").get("rope_theta", 10000.0)))


def _phi3_keys(writer, config, model) -> None:
    original = rope_parameters(config).get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    if original:
        writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))  # llama.cpp runs Phi-3 without SWA


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", _LLAMA, permute_qk=True),
    "mistral": GGUFArch("llama", _LLAMA, permute_qk=True),
    "qwen2": GGUFArch("qwen2", _LLAMA, query_is_hidden=True),
    "qwen3": GGUFArch("qwen3", _LLAMA + _QK_NORM, attention_bias=False),
    "gemma": GGUFArch(
        "gemma", _LLAMA, norm_shift=1.0, tied_only=True, activations=("gelu_pytorch_tanh", "gelu"), attention_bias=False
    ),
    "gemma2": GGUFArch(
        "gemma2",
        _GEMMA2,
        norm_shift=1.0,
        tied_only=True,
        activations=("gelu_pytorch_tanh",),
        query_scale_into="self_attn.q_proj",
        attention_bias=False,
        extra_keys=_gemma2_keys,
    ),
    "gemma3_text": GGUFArch(
        "gemma3",
        _GEMMA2 + _QK_NORM,
        norm_shift=1.0,
        activations=("gelu_pytorch_tanh",),
        query_scale_into="self_attn.q_norm",
        attention_bias=False,
        extra_keys=_gemma3_keys,
    ),
    "phi3": GGUFArch("phi3", _PHI3, query_is_hidden=True, extra_keys=_phi3_keys),
    "gpt2": GGUFArch("gpt2", _GPT2, activations=("gelu_new", "gelu_pytorch_tanh"), layernorm=True),
}

# Architectures slimlm compresses that llama.cpp has no graph for, and why.
NOT_IN_LLAMA_CPP = {
    "opt": "llama.cpp has no OPT architecture (learned positions offset by 2, ReLU MLP, optional projection of the "
    "embedding width); convert_hf_to_gguf.py does not convert it",
}


# RoPE scalings llama.cpp reads as per-frequency factor tensors, by the architectures whose graphs read them.
EXTRA_ROPE = {"llama": ("llama3",), "phi3": ("longrope",)}


def arch_for(config) -> GGUFArch:
    """The row for this config, or a one-line refusal naming why llama.cpp cannot run it (config only)."""
    model_type = config.model_type
    fix = "export it with --format compressed-tensors or hf"
    if model_type in NOT_IN_LLAMA_CPP:
        raise SlimlmError(f"GGUF export cannot write '{model_type}': {NOT_IN_LLAMA_CPP[model_type]}", fix)
    if model_type not in ARCHITECTURES:
        raise SlimlmError(
            f"GGUF export does not support the architecture '{model_type}'",
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; {fix}",
        )
    arch = ARCHITECTURES[model_type]
    problem = _unrunnable(arch, config)
    if problem:
        raise SlimlmError(f"this {model_type} model cannot run in llama.cpp's '{arch.name}' graph: {problem}", fix)
    return arch


def _unrunnable(arch: GGUFArch, config) -> str | None:
    """What in this config llama.cpp's graph for `arch` does not compute (None if it computes all of it)."""
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    act = getattr(config, "activation_function", act)
    if act not in arch.activations:
        return f"its activation is '{act}', llama.cpp's {arch.name} computes {' / '.join(arch.activations)}"
    if arch.tied_only and not getattr(config, "tie_word_embeddings", True):
        return "its output projection is not tied to the embedding, and llama.cpp always reads token_embd as the output"
    if (
        config.model_type == "mistral"
        and (getattr(config, "sliding_window", None) or 1 << 62) < config.max_position_embeddings
    ):
        return "it uses sliding-window attention, which llama.cpp's llama architecture does not"
    if config.model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        return "it uses sliding-window attention, which llama.cpp's qwen2/qwen3 graphs do not"
    if config.model_type == "gpt2":
        for flag, wanted in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
        ):
            if bool(getattr(config, flag, wanted)) != wanted:
                return f"{flag}={not wanted}, which llama.cpp's gpt2 graph does not compute"
        return None
    layer_kinds = ("full_attention", "sliding_attention") if config.model_type == "gemma3_text" else ("full_attention",)
    known = ("default", "linear", *EXTRA_ROPE.get(config.model_type, ()))
    for kind in layer_kinds:
        rope = rope_parameters(config, kind)
        rope_type = rope.get("rope_type", "default")
        if rope_type not in known or (kind == "sliding_attention" and rope_type != "default"):
            return f"RoPE scaling '{rope_type}' ({kind}) is not one slimlm's GGUF writer describes for it ({', '.join(known)})"
    if arch.query_is_hidden and config.num_attention_heads * head_dim(config) != config.hidden_size:
        return (
            f"{config.num_attention_heads} heads × {head_dim(config)} ≠ hidden size {config.hidden_size} (heads pruned?), and "
            f"llama.cpp's {arch.name} graph sizes the query and output projections hidden × hidden"
        )
    if not arch.attention_bias and getattr(config, "attention_bias", False):
        return f"attention_bias=True, and llama.cpp's {arch.name} graph has no attention output bias"
    if config.model_type == "phi3" and rope_parameters(config).get("partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings are not written by slimlm's GGUF exporter"
    return None


def add_arch_keys(writer, model, config, n_blocks: int) -> None:
    """The `{arch}.*` hyperparameters llama.cpp reads for this architecture (from the model: pruned shapes count)."""
    from gguf import RopeScalingType

    arch = ARCHITECTURES[config.model_type]
    writer.add_block_count(n_blocks)
    if arch.layernorm:  # GPT-2
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.n_head)
        writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
        writer.add_vocab_size(config.vocab_size)
        return
    heads = config.num_attention_heads
    dim = head_dim(config)
    rope = rope_parameters(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // heads or arch.name.startswith("gemma") or arch.name == "qwen3":
        writer.add_key_length(dim)  # llama.cpp would derive hidden / heads
        writer.add_value_length(dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope.get("rope_type") == "longrope":
        writer.add_rope_scaling_type(RopeScalingType.LONGROPE)
        writer.add_rope_scaling_attn_factors(_longrope_attention_factor(config, rope))
    if arch.extra_keys is not None:
        arch.extra_keys(writer, config, model)


# --- tensor data the architecture changes ----------------------------------------------------------------------


def query_scale(config, n_blocks: int) -> float:
    """Gemma 2/3: HF's query scale over llama.cpp's (1 when they agree). llama.cpp picks 1/√(hidden/heads) for the
    27B models (46 / 62 layers) and 1/√head_dim otherwise; HF uses 1/√query_pre_attn_scalar."""
    big = {"gemma2": 46, "gemma3_text": 62}.get(config.model_type)
    if big is None:
        return 1.0
    llama_cpp = config.hidden_size // config.num_attention_heads if n_blocks == big else head_dim(config)
    return math.sqrt(llama_cpp / config.query_pre_attn_scalar)


def norm_data(arch: GGUFArch, rel: str, weight: torch.Tensor, q_scale: float) -> torch.Tensor:
    """A norm weight as llama.cpp multiplies it: Gemma's 1 + w; Gemma 3's q-norm also carries the query scale."""
    data = weight.detach().float() + arch.norm_shift
    return data * q_scale if rel == arch.query_scale_into else data


def _longrope_attention_factor(config, rope: dict) -> float:
    """LongRoPE's cos/sin scale, as transformers computes it (`_compute_longrope_parameters`)."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_tensors(config) -> list[tuple[str, torch.Tensor]]:
    """Per-frequency RoPE factors llama.cpp divides its frequencies by (head_dim / 2 each): Llama 3's smoothed
    wavelength scaling as `rope_freqs`, Phi-3's LongRoPE short / long factors (llama.cpp picks long when the context
    exceeds original_max_position_embeddings, transformers when the sequence does)."""
    rope = rope_parameters(config)
    kind = rope.get("rope_type", "default")
    if kind == "longrope":
        return [
            (f"rope_factors_{length}.weight", torch.tensor(rope[f"{length}_factor"], dtype=torch.float32))
            for length in ("long", "short")
        ]
    if kind != "llama3":
        return []
    dim = head_dim(config)
    inv_freq = 1.0 / (rope.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)  # between the two wavelengths: the smoothed blend
    factors = torch.where(wavelen < original / high, torch.ones_like(factors), factors)  # short waves: unscaled
    factors = torch.where(wavelen > original / low, torch.full_like(factors, factor), factors)  # long waves: ÷ factor
    return [("rope_freqs.weight", factors)]
