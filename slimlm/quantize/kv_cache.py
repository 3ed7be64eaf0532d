"""KV-cache quantization, KIVI-style (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
KV Cache"): keys per channel, values per token, the newest tokens kept in full precision.

Keys have a few outlier *channels* (fixed across tokens), values have no such structure; so KIVI quantizes

    keys   (B, H, T, D): per channel, one scale/min per group of G consecutive tokens  -> (B, H, T/G, D)
    values (B, H, T, D): per token,   one scale/min per group of Gv channels           -> (B, H, T, D/Gv)

with Gv = min(G, head_dim), asymmetric min/max: scale = (max - min) / (2^b - 1), code = round((x - min) / scale)
clamped to [0, 2^b - 1] (unsigned b-bit), x̂ = code · scale + min. Scale and min are stored in float16 and rounded
*before* the codes are chosen, so what attention reads is exactly what the format holds.

Residual window: the newest R tokens of every layer stay in full precision. A layer holds `q` quantized tokens
(a whole number of G-token groups, oldest first) and `r` full-precision ones; after each update the oldest
⌊(r - R) / G⌋ whole groups move from the residual to the quantized part, so r ∈ [R, R + G) once R tokens were
seen and the last R tokens are always exact. q depends only on the tokens seen, not on how they were chunked.
R must be a multiple of G (KIVI's layout: the residual flushes in whole key groups), R = 0 is allowed.

Attention reads dequantize(quantized past) ++ residual ++ the tokens being added: the tokens of the current
forward attend to each other in full precision and are quantized only once they grow old, as in KIVI's prefill.
This is a *simulation* of the memory format: the codes are kept one per uint8 (not bit-packed) and dequantized on
every read, and the residual stays in the model's dtype; `kv_cache_bytes` counts what the packed format takes
(codes at b bits, float16 scale and min, float16 residual) against a float16 cache.

Perplexity with the cache in the loop (`forward_in_chunks`, used by `evaluate_quality`): each window is fed C
tokens at a time (default 128); a token reads its own chunk and the residual in full precision and every older
token through the codes. With a plain `DynamicCache` the same protocol equals one forward over the window.
Defaults G = 32, R = 128 are KIVI's.

Sliding-window attention layers (Gemma 2/3, Mistral v0.1) keep transformers' `DynamicSlidingWindowLayer` in full
precision: their memory is bounded by the window. Layer types other than full / sliding attention (linear
attention, chunked, hybrid) are refused.

Use: the `kv-cache` recipe stage records the setting in `model.config.slimlm_kv_cache` (saved in config.json and
the manifest); evaluation then feeds each window in chunks through the quantized cache, and

    model.generate(ids, past_key_values=kv_cache_for(model), max_new_tokens=32)

generates with it (transformers' `cache_implementation` names only its built-in caches, so the cache is passed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from slimlm.errors import SlimlmError
from slimlm.quantize.grid import MIN_SCALE, SCALE_DTYPE
from slimlm.stage import Stage, StageConfig, check_range

BITS = (2, 4, 8)  # codes pack whole into bytes
CONFIG_KEY = "slimlm_kv_cache"  # attribute of model.config (and key of config.json) holding the setting
DEFAULT_CHUNK = 128  # tokens per forward when a perplexity window is fed through a cache
FP16_BYTES = 2


@dataclass(frozen=True)
class KVCacheConfig(StageConfig):
    """Quantize the KV cache KIVI-style at inference (no calibration; the weights are not touched)."""

    method: ClassVar[str] = "kv-cache"

    bits: int = 4  # 2, 4 or 8, keys and values alike
    group_size: int = 32  # tokens per key group (per channel); channels per value group (per token), at most head_dim
    residual: int = 128  # newest tokens kept in full precision; a multiple of group_size (0 allowed)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("targets", "exclude"):
            if getattr(self, key) is not None:
                self.fail(
                    key,
                    "does not apply: the KV cache of every attention layer is quantized",
                    f"remove '{key}' from the stage",
                )
        if self.bits not in BITS:
            self.fail("bits", f"is {self.bits}, not one of 2, 4, 8", "use 2, 4 or 8 bits (KIVI: 2 and 4)")
        check_range(self, "group_size", self.group_size, 1, 2**16)
        check_range(self, "residual", self.residual, 0, 2**20)
        if self.residual % self.group_size:
            self.fail(
                "residual",
                f"is {self.residual}, not a multiple of group_size {self.group_size}",
                f"use a multiple of {self.group_size}, e.g. {self.group_size * max(1, round(self.residual / self.group_size))}",
            )

    def setting(self) -> dict[str, int]:
        """What a model records and a report shows: bits, group_size, residual."""
        return {"bits": self.bits, "group_size": self.group_size, "residual": self.residual}

    def describe(self) -> str:
        return f"KIVI {self.bits}-bit KV cache (keys per channel over {self.group_size} tokens, values per token, residual {self.residual} tokens in full precision)"


# --- kernels: (B, H, T, D) tensors in, codes and float16 qparams out --------------------------------------------


def _minmax_quantize(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max over `dim` (kept, size 1): codes uint8 like x, scale and min float16."""
    x = x.float()
    low = x.amin(dim, keepdim=True)
    high = x.amax(dim, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).to(SCALE_DTYPE).clamp(min=MIN_SCALE)  # a constant group must not divide by 0
    minimum = low.to(SCALE_DTYPE)
    codes = torch.round((x - minimum.float()) / scale.float()).clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, minimum


def quantize_keys(keys: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel over groups of `group_size` tokens. keys (B, H, T, D), T a multiple of the group ->
    codes (B, H, T, D) uint8, scale and min (B, H, T/G, D) float16."""
    b, h, t, d = keys.shape
    codes, scale, minimum = _minmax_quantize(keys.reshape(b, h, t // group_size, group_size, d), 3, bits)
    return codes.reshape(b, h, t, d), scale.squeeze(3), minimum.squeeze(3)


def dequantize_keys(
    codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """codes (B, H, T, D), scale/min (B, H, T/G, D) -> (B, H, T, D) in `dtype`."""
    b, h, t, d = codes.shape
    groups = scale.shape[2]
    x = codes.float().reshape(b, h, groups, t // groups, d) * scale.float().unsqueeze(3) + minimum.float().unsqueeze(3)
    return x.reshape(b, h, t, d).to(dtype)


def quantize_values(
    values: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token over groups of `group_size` channels. values (B, H, T, D), D a multiple of the group ->
    codes (B, H, T, D) uint8, scale and min (B, H, T, D/G) float16."""
    b, h, t, d = values.shape
    codes, scale, minimum = _minmax_quantize(values.reshape(b, h, t, d // group_size, group_size), 4, bits)
    return codes.reshape(b, h, t, d), scale.squeeze(4), minimum.squeeze(4)


def dequantize_values(
    codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """codes (B, H, T, D), scale/min (B, H, T, D/G) -> (B, H, T, D) in `dtype`."""
    b, h, t, d = codes.shape
    groups = scale.shape[3]
    x = codes.float().reshape(b, h, t, groups, d // groups) * scale.float().unsqueeze(4) + minimum.float().unsqueeze(4)
    return x.reshape(b, h, t, d).to(dtype)


def value_group(config: KVCacheConfig, head_dim: int) -> int:
    """Channels per value group: group_size, or the whole head when that is smaller."""
    return min(config.group_size, head_dim)


# --- the cache -----------------------------------------------------------------------------------------------------


class KIVILayer(DynamicLayer):
    """One full-attention layer: quantized old tokens plus a full-precision residual.

    `keys` / `values` (inherited names) hold the residual (B, H, r, D) in the model's dtype; `quantized` holds the
    six tensors of the q older tokens: key codes (B, H, q, D), key scale/min (B, H, q/G, D), value codes (B, H, q, D),
    value scale/min (B, H, q, D/Gv).
    """

    is_croppable = False

    def __init__(self, config: KVCacheConfig):
        super().__init__()
        self.config = config
        self.quantized: list[torch.Tensor] | None = None

    def quantized_length(self) -> int:
        return 0 if self.quantized is None else self.quantized[0].shape[-2]

    def get_seq_length(self) -> int:
        residual = self.keys.shape[-2] if self.is_initialized else 0
        return self.quantized_length() + residual

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, t, D) new states; return what attention reads: dequantized past ++ residual ++ new."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            head_dim = key_states.shape[-1]
            if head_dim % value_group(self.config, head_dim):
                raise SlimlmError(
                    f"kv-cache: group_size {self.config.group_size} does not divide head_dim {head_dim}",
                    f"use a group_size that divides {head_dim}",
                )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.keys, self.values
        if self.quantized is not None:
            # The new states carry the model's dtype; transformers' own layer attributes differ between releases.
            dtype = key_states.dtype
            key_codes, key_scale, key_min, value_codes, value_scale, value_min = self.quantized
            keys = torch.cat([dequantize_keys(key_codes, key_scale, key_min, dtype), keys], dim=-2)
            values = torch.cat([dequantize_values(value_codes, value_scale, value_min, dtype), values], dim=-2)
        self._flush()
        return keys, values

    def _flush(self) -> None:
        """Move the oldest whole groups beyond the residual window into the quantized part."""
        group = self.config.group_size
        moved = (self.keys.shape[-2] - self.config.residual) // group * group
        if moved <= 0:
            return
        value_groups = value_group(self.config, self.keys.shape[-1])
        block = [
            *quantize_keys(self.keys[..., :moved, :], self.config.bits, group),
            *quantize_values(self.values[..., :moved, :], self.config.bits, value_groups),
        ]
        self.quantized = (
            block
            if self.quantized is None
            else [torch.cat([old, new], dim=2) for old, new in zip(self.quantized, block)]
        )
        self.keys = self.keys[..., moved:, :].clone()
        self.values = self.values[..., moved:, :].clone()

    def reset(self) -> None:
        super().reset()
        self.quantized = None

    def crop(self, tokens_to_remove: int) -> None:
        raise SlimlmError(
            "the quantized KV cache cannot be rolled back (assisted / speculative decoding crops the cache)",
            "generate without an assistant model, or without the kv-cache setting",
        )

    def _on_batch(self, select) -> None:
        """Apply a batch-dimension selection to the residual and every quantized tensor."""
        if not self.is_initialized:
            return
        self.keys, self.values = select(self.keys), select(self.values)
        if self.quantized is not None:
            self.quantized = [select(t) for t in self.quantized]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._on_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._on_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._on_batch(lambda t: t[indices, ...])


def cache_layer_types(model_config) -> tuple[list[str], list[dict]]:
    """transformers' layer types of the decoder (and their kwargs); refuses a cache this module cannot quantize."""
    text_config = model_config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(text_config)
    unsupported = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unsupported:
        raise SlimlmError(
            f"kv-cache: this model's cache has {', '.join(unsupported)} layers, not only standard attention",
            "use the kv-cache stage on models whose layers are full or sliding-window attention",
        )
    if "full_attention" not in layer_types:
        raise SlimlmError(
            "kv-cache: every attention layer of this model uses a sliding window, whose cache stays in full precision: nothing to quantize",
            "drop the kv-cache stage for this model",
        )
    return layer_types, kwargs


class KIVICache(Cache):
    """A transformers `Cache`: `KIVILayer` for full-attention layers, full-precision sliding-window layers."""

    def __init__(self, model_config, config: KVCacheConfig):
        layer_types, kwargs = cache_layer_types(model_config)
        layers = [
            KIVILayer(config) if kind == "full_attention" else DynamicSlidingWindowLayer(**kw)
            for kind, kw in zip(layer_types, kwargs)
        ]
        super().__init__(layers=layers)
        self.config = config


# --- the recipe stage and the setting a model carries -----------------------------------------------------------


def _geometry(model_config) -> tuple[int, int]:
    """(key/value heads, head_dim) of the decoder, from the config (GPT-2/OPT have no num_key_value_heads)."""
    text_config = model_config.get_text_config(decoder=True)
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return kv_heads, head_dim


def check_kv_cache(model: nn.Module, config: KVCacheConfig) -> None:
    """Refuse, before anything changes, a model whose cache or head size the setting does not fit."""
    cache_layer_types(model.config)
    _, head_dim = _geometry(model.config)
    if head_dim % value_group(config, head_dim):
        divisors = [g for g in (8, 16, 32, 64, 128) if head_dim % g == 0]
        raise SlimlmError(
            f"kv-cache: group_size {config.group_size} does not divide head_dim {head_dim} (value groups)",
            f"use a group_size that divides {head_dim}, e.g. {', '.join(map(str, divisors))}",
        )


def set_kv_cache_(model: nn.Module, config: KVCacheConfig) -> None:
    """Record the setting on the model (`model.config.slimlm_kv_cache`, saved in config.json); weights untouched."""
    check_kv_cache(model, config)
    setattr(model.config, CONFIG_KEY, config.setting())


def kv_cache_setting(model: nn.Module) -> KVCacheConfig | None:
    """The setting a model carries (recorded by the kv-cache stage, or read back from config.json), or None."""
    raw = getattr(model.config, CONFIG_KEY, None)
    return None if raw is None else KVCacheConfig(**raw)


def make_cache(model: nn.Module, config: KVCacheConfig | None) -> Cache:
    """A fresh cache for one batch of sequences: KIVI with `config`, a plain `DynamicCache` with None."""
    if config is None:
        return DynamicCache(config=model.config)
    check_kv_cache(model, config)
    return KIVICache(model.config, config)


def kv_cache_for(model: nn.Module) -> Cache:
    """A fresh cache as the model's own setting asks (a `DynamicCache` without one), for
    `model.generate(ids, past_key_values=kv_cache_for(model))`."""
    return make_cache(model, kv_cache_setting(model))


# --- evaluation with the cache in the loop, and memory accounting ------------------------------------------------


def forward_in_chunks(model: nn.Module, input_ids: torch.Tensor, chunk_size: int, cache: Cache) -> torch.Tensor:
    """Logits (L, V) of one window (1, L) fed `chunk_size` tokens at a time through `cache`: later chunks attend to
    what the cache holds of the earlier ones. With a `DynamicCache` this equals one full forward (up to float
    rounding of the different matmul shapes)."""
    if chunk_size < 1:
        raise SlimlmError(
            f"chunk_size must be at least 1, got {chunk_size}", f"pass a positive chunk size (default {DEFAULT_CHUNK})"
        )
    length = input_ids.shape[1]
    logits = None
    for start in range(0, length, chunk_size):
        out = model(input_ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True).logits[0]  # (c, V)
        if logits is None:
            logits = out.new_empty(length, out.shape[-1])
        logits[start : start + out.shape[0]] = out
    return logits


def chunked_protocol(config: KVCacheConfig | None, chunk_size: int) -> str:
    """What a chunked evaluation did, for the protocol line of reports."""
    cache = config.describe() if config else "full-precision DynamicCache"
    return f"each window fed in chunks of {chunk_size} tokens through a {cache}"


def _layer_bytes(config: KVCacheConfig | None, kv_heads: int, head_dim: int, tokens: int) -> float:
    """Bytes of one full-attention layer's cache holding `tokens` tokens (batch 1)."""
    if config is None:
        return 2 * kv_heads * tokens * head_dim * FP16_BYTES
    quantized = max(tokens - config.residual, 0) // config.group_size * config.group_size
    residual = tokens - quantized
    codes = 2 * quantized * head_dim * config.bits / 8  # keys and values
    key_qparams = 2 * (quantized // config.group_size) * head_dim * FP16_BYTES  # scale and min
    value_qparams = 2 * quantized * (head_dim // value_group(config, head_dim)) * FP16_BYTES
    return kv_heads * (codes + key_qparams + value_qparams + 2 * residual * head_dim * FP16_BYTES)


def kv_cache_bytes(config: KVCacheConfig | None, model_config, context_len: int) -> int:
    """Bytes of the KV cache of one sequence after `context_len` tokens: packed b-bit codes, float16 scale and min
    per group, float16 residual; sliding-window layers hold min(context, window - 1) float16 tokens. `config` None:
    the plain float16 cache."""
    layer_types, kwargs = cache_layer_types(model_config)
    kv_heads, head_dim = _geometry(model_config)
    total = 0.0
    for kind, kw in zip(layer_types, kwargs):
        if kind == "sliding_attention":
            total += _layer_bytes(None, kv_heads, head_dim, min(context_len, kw["sliding_window"] - 1))
        else:
            total += _layer_bytes(config, kv_heads, head_dim, context_len)
    return math.ceil(total)


def kv_cache_summary(config: KVCacheConfig, model_config, context_len: int) -> dict:
    """The setting and its memory at `context_len`, against the float16 cache."""
    quantized = kv_cache_bytes(config, model_config, context_len)
    fp16 = kv_cache_bytes(None, model_config, context_len)
    return {
        "setting": config.setting(),
        "context_len": context_len,
        "bytes": quantized,
        "fp16_bytes": fp16,
        "share_of_fp16": quantized / fp16,
    }


KV_CACHE = Stage(config=KVCacheConfig, apply=set_kv_cache_, scope="model", check=check_kv_cache, edits_weights=False)
