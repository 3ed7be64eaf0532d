"""GGUF for llama.cpp: F16/BF16, Q8_0, Q4_0, Q4_1, laid out as llama.cpp's convert_hf_to_gguf.py lays out a
LlamaForCausalLM (and Qwen2ForCausalLM).

Block formats (ggml, 32 weights per block along the input dim, block scale fp16, `gguf.quants` has the reference
quantizers and dequantizers):

    Q8_0: d, q[32] int8                   w = d·q
    Q4_0: d, q[32] 4-bit (two per byte)   w = d·(u − 8),  u ∈ 0..15   (nibble j: element j, high nibble: j + 16)
    Q4_1: d, m, q[32] 4-bit               w = d·u + m,   u ∈ 0..15

A slimlm QuantizedLinear (codes q ∈ [−2^(b−1), 2^(b−1)−1], w = (q − z)·s per group, s fp16) is written *as its
codes* when the block format holds its grid, so what a GPTQ/AWQ/RTN run chose survives into llama.cpp:

    int4 sym, group 32k or per channel  -> Q4_0: u = q + 8, d = s (repeated over the k blocks of a group)
    int4 any, group 32k or per channel  -> Q4_1: u = q + 8, d = s, m = −(z + 8)·s (rounded to fp16: ≤ 2⁻¹¹·|m|)
    int8 sym, group 32k or per channel  -> Q8_0: q as is, d = s

Anything else (3-bit codes, int8 to a 4-bit block, group sizes that straddle blocks) is refused with the formats
that do hold it; F16/BF16 always hold a quantized layer, dequantized. Dense (unquantized) 2-D weights are
re-quantized with llama.cpp's reference algorithm (`gguf.quants`, bit-exact with ggml's `quantize_row_*_ref`,
what `llama-quantize` does without an importance matrix). As `llama-quantize` keeps the output projection at
higher precision (Q6_K, or Q8_0 when rows are not a multiple of 256 as in SmolLM2), the 4-bit types write the
token embedding / output as Q8_0. 1-D tensors (norms, biases) are F32.

llama.cpp applies RoPE to adjacent pairs (GPT-J style) while HF Llama rotates halves, so the rows of q_proj and
k_proj are permuted per head (`permute_rope_rows`, llama.cpp's `LlamaModel.permute`); Qwen2 uses NeoX RoPE in
llama.cpp and keeps HF's order. Rows carry their codes, scales and zero points with them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.export.gguf_types import (
    TYPES,
    ggml_type,
    pack_blocks,
    quantize_tensor,
    tensor_bytes,
    types_for_shape,
)
from slimlm.models.adapters import adapter_for, decoder_blocks
from slimlm.models.save import check_writable, disk_error, remove_stale_partials
from slimlm.quantize.grid import QuantGrid
from slimlm.quantize.linear import QuantizedLinear

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
BLOCK = 32  # QK4_0 = QK4_1 = QK8_0
CODE_BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5}  # the code width each block format stores
K_QUANTS = ("q4_k", "q5_k", "q6_k")  # slimlm's packers; a QuantizedLinear's own scales do not fit their grids

# HF model_type -> (llama.cpp architecture, permute q/k rows for llama.cpp's RoPE)
ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# Parts of one decoder block, relative to the block -> GGUF tensor base name (llama.cpp's LLM_TENSOR_* names).
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def linear_tensor_name(index: int, rel: str) -> str:
    """The GGUF name of block `index`'s linear at `rel` (relative to the block, e.g. "mlp.down_proj")."""
    return f"blk.{index}.{BLOCK_TENSORS[rel]}.weight"

def _ggml(name: str):
    return ggml_type(name)


def _file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    return {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
            "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1, "q5_0": LlamaFileType.MOSTLY_Q5_0,
            "q5_1": LlamaFileType.MOSTLY_Q5_1, "q4_k": LlamaFileType.MOSTLY_Q4_K_M, "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
            "q5_k": LlamaFileType.MOSTLY_Q5_K_M, "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
            "q6_k": LlamaFileType.MOSTLY_Q6_K}[gguf_type]


# --- pure kernels -------------------------------------------------------------------------------------------


def permute_rope_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the output rows of q_proj/k_proj (and anything indexed by them: codes, scales, zero points,
    biases) from HF's rotate-half RoPE layout to llama.cpp's adjacent-pair layout. rows: (n_head·head_dim, ...)."""
    head_dim = rows.shape[0] // n_head
    return rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def code_layout_problem(grid: QuantGrid, in_features: int, gguf_type: str) -> str | None:
    """Why GGUF `gguf_type` cannot hold these codes exactly (None if it can)."""
    if gguf_type in K_QUANTS:
        return f"{gguf_type.upper()} stores 6/8-bit sub-block scales of one fp16 scale per 256 weights, not these fp16 group scales"
    if gguf_type not in CODE_BITS:
        return None  # f16/bf16 hold the dequantized weights
    if grid.bits != CODE_BITS[gguf_type]:
        return f"{gguf_type.upper()} stores {CODE_BITS[gguf_type]}-bit codes, these are {grid.bits}-bit"
    if gguf_type in ("q4_0", "q5_0", "q8_0") and not grid.symmetric:
        return f"{gguf_type.upper()} has no zero point (symmetric blocks only)"
    span = in_features if grid.group_size is None else grid.group_size
    if span % BLOCK or in_features % BLOCK:
        what = "rows" if grid.group_size is None else f"groups of {grid.group_size}"
        return f"{what} do not split into whole {BLOCK}-weight blocks (one fp16 scale per block)"
    return None


def pack_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, gguf_type: str) -> np.ndarray:
    """Existing integer codes as GGUF blocks, without re-quantizing.

    codes (out, in) int8; scale (out, groups) fp16; zero_point (out, groups) int8 or None. A group spans
    in/groups ≥ 32 input columns, so each 32-block repeats its group's scale. Returns (out, in/32 · block bytes) uint8.
    """
    out_features, in_features = codes.shape
    n_blocks = in_features // BLOCK
    repeat = n_blocks // scale.shape[1]
    d = scale.float().repeat_interleave(repeat, dim=1).reshape(-1)  # (out·n_blocks,)
    q = codes.reshape(-1, BLOCK).to(torch.int16)
    if gguf_type == "q8_0":
        return pack_blocks(gguf_type, q, d).reshape(out_features, -1).numpy()
    centre = 2 ** (CODE_BITS[gguf_type] - 1)  # signed grid −c..c−1 -> unsigned 0..2c−1
    m = None
    if gguf_type in ("q4_1", "q5_1"):
        z = torch.zeros_like(d) if zero_point is None else zero_point.float().repeat_interleave(repeat, dim=1).reshape(-1)
        m = -(z + centre) * d  # w = s·(q − z) = s·u − s·(z + c)
    return pack_blocks(gguf_type, q + centre, d, m).reshape(out_features, -1).numpy()


def requantize(weight: torch.Tensor, gguf_type: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """Dense weight (out, in) -> GGUF data. Without `importance`: llama.cpp's reference quantizer (what
    llama-quantize does without an imatrix; F16 as float16). With it: slimlm's importance-weighted block search
    (`gguf_types.quantize_tensor`)."""
    from gguf import quants

    if (importance is not None and gguf_type not in ("f16", "bf16")) or gguf_type in K_QUANTS:
        return quantize_tensor(weight, gguf_type, importance)  # k-quants: gguf.quants cannot write them
    data = weight.detach().float().cpu().numpy()
    if gguf_type == "f16":
        return data.astype(np.float16)
    return quants.quantize(data, _ggml(gguf_type))


# --- the model -> tensor plan -----------------------------------------------------------------------------------


@dataclass
class GGUFSummary:
    path: Path
    gguf_type: str
    bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count
    codes_kept: int = 0  # quantized linears written as their own codes
    requantized: int = 0  # dense 2-D weights quantized by the reference algorithm
    dequantized: int = 0  # quantized linears written as F16/BF16
    fallbacks: list[str] = field(default_factory=list)  # tensors written as F16 because rows do not fit blocks
    tensors: list[dict] = field(default_factory=list)  # per tensor: name, shape (GGUF order: rows last), type, bytes


def check_gguf_model(model: nn.Module, gguf_type: str, tensor_types: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """Refuse what GGUF cannot hold before writing anything: returns (llama.cpp architecture, permute q/k).

    A quantized linear is checked against its own type (`tensor_types` by GGUF name, else `gguf_type`)."""
    tensor_types = tensor_types or {}
    if gguf_type not in GGUF_TYPES:
        raise SlimlmError(f"unknown GGUF type '{gguf_type}'", f"use one of: {', '.join(GGUF_TYPES)}")
    check_gguf_config(model.config)
    adapter = adapter_for(model)
    config = model.config
    for index, block in enumerate(decoder_blocks(model)):
        for name, _ in block.named_parameters():
            if name.rpartition(".")[0] not in BLOCK_TENSORS:
                raise SlimlmError(f"block {index} has a tensor '{name}' that has no GGUF name in slimlm's {config.model_type} layout", "export with --format compressed-tensors or hf")
    problems = []
    for index, block in enumerate(decoder_blocks(model)):
        for rel in adapter.linears():
            module = block.get_submodule(rel)
            if isinstance(module, QuantizedLinear):
                wanted = tensor_types.get(f"blk.{index}.{BLOCK_TENSORS[rel]}.weight", gguf_type)
                problem = code_layout_problem(module.grid, module.in_features, wanted)
                if problem:
                    problems.append((f"{adapter.blocks}.{index}.{rel}", module, problem, wanted))
    if problems:
        name, module, problem, wanted = problems[0]
        grid = module.grid
        layout = "per channel" if grid.group_size is None else f"group {grid.group_size}"
        holders = [t for t in CODE_BITS if all(code_layout_problem(m.grid, m.in_features, t) is None for _, m, _, _ in problems)]
        raise SlimlmError(
            f"{len(problems)} quantized linears (e.g. {name}: int{grid.bits} {'sym' if grid.symmetric else 'asym'} {layout}) cannot be written as GGUF {wanted} without re-quantizing: {problem}",
            f"formats that hold them: {', '.join(f'--gguf-type {t} (codes kept)' for t in holders) + ', ' if holders else ''}"
            "--gguf-type f16/bf16 (dequantized), --format compressed-tensors (codes kept) or --format hf (dequantized)",
        )
    return ARCHITECTURES[config.model_type]


def check_gguf_config(config) -> None:
    """Refuse, from the config alone (before any weight loads), an architecture slimlm's GGUF writer cannot hold."""
    if config.model_type not in ARCHITECTURES:
        raise SlimlmError(
            f"GGUF export does not support the architecture '{config.model_type}'",
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; export this model with --format compressed-tensors or hf",
        )
    if config.model_type == "mistral" and (getattr(config, "sliding_window", None) or 1 << 62) < config.max_position_embeddings:
        raise SlimlmError("this Mistral model uses sliding-window attention, which llama.cpp's llama architecture does not", "export it with --format compressed-tensors or hf")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise SlimlmError(f"RoPE scaling '{rope['rope_type']}' is not written by slimlm's GGUF exporter", "export with --format compressed-tensors or hf")


def _rope(config) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters`; older configs use rope_theta / rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return params
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


def _tensor_plan(model: nn.Module, permute: bool):
    """Yield (gguf name, payload, row order) for every tensor, in llama.cpp's order. payload: a tensor already in
    llama.cpp's row order (2-D dense or 1-D), or a QuantizedLinear written from its codes; `order` maps HF rows
    (of weights, codes, scales or packed blocks) to llama.cpp's."""
    config = model.config
    adapter = adapter_for(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads

    embed = model.get_submodule(adapter.embed).weight
    same = lambda t: t  # noqa: E731
    yield "token_embd.weight", embed.detach(), same
    for index, block in enumerate(decoder_blocks(model)):
        for rel, base in BLOCK_TENSORS.items():
            module = block.get_submodule(rel)
            rows = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}.get(rel) if permute else None
            order = (lambda t, n=rows: permute_rope_rows(t, n)) if rows else (lambda t: t)
            name = f"blk.{index}.{base}.weight"
            if isinstance(module, QuantizedLinear):
                yield name, module, order
            else:
                yield name, order(module.weight.detach()), order
            bias = getattr(module, "bias", None)
            if bias is not None:
                yield f"blk.{index}.{base}.bias", order(bias.detach()), order
    yield "output_norm.weight", model.get_submodule(adapter.final_norm).weight.detach(), same
    head = model.get_submodule(adapter.lm_head).weight
    if head.data_ptr() != embed.data_ptr():  # tied: llama.cpp reads token_embd for the output
        yield "output.weight", head.detach(), same


def tensor_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{GGUF tensor name: torch shape (rows last)} of every tensor the file will hold, nothing quantized."""
    return {name: tuple(payload.weight_q.shape if isinstance(payload, QuantizedLinear) else payload.shape)
            for name, payload, _ in _tensor_plan(model, permute=False)}


def default_tensor_types(layout: Mapping[str, tuple[int, ...]], gguf_type: str) -> dict[str, str]:
    """`gguf_type` for every 2-D tensor; 4/5-bit files keep the (tied) embedding / output projection at Q8_0 as
    llama-quantize does for rows that are not a multiple of 256."""
    io_type = "q8_0" if gguf_type in ("q4_0", "q4_1", "q5_0", "q5_1") else gguf_type
    return {name: io_type if name in ("token_embd.weight", "output.weight") else gguf_type
            for name, shape in layout.items() if len(shape) == 2}


def _check_overrides(layout: Mapping[str, tuple[int, ...]], *named: Mapping) -> None:
    """Every override names a 2-D tensor the file has."""
    for key in (key for mapping in named for key in mapping):
        if key not in layout or len(layout[key]) != 2:
            raise SlimlmError(f"GGUF tensor '{key}' does not exist in this model", "name tensors as llama.cpp does, e.g. blk.0.ffn_down.weight, token_embd.weight")


def _encode(name: str, payload, order, gguf_type: str | None, summary: GGUFSummary, importance=None, packed=None):
    """One tensor's (data, raw GGML type or None) at `gguf_type` (None: 1-D, F32)."""
    if gguf_type is None:
        return payload.float().cpu().numpy(), None
    if isinstance(payload, QuantizedLinear):
        return _quantized(name, payload, order, gguf_type, summary)
    return _dense_2d(name, payload, gguf_type, summary, importance, packed)


def _dense_2d(name: str, weight: torch.Tensor, gguf_type: str, summary: GGUFSummary, importance=None, packed=None):
    if gguf_type not in GGUF_TYPES:
        raise SlimlmError(f"GGUF type '{gguf_type}' for {name} is not one slimlm writes", f"use one of: {', '.join(GGUF_TYPES)}")
    block = TYPES[gguf_type].block
    if weight.shape[1] % block:
        summary.fallbacks.append(name)
        gguf_type = "f16"
    elif block > 1:
        summary.requantized += 1
    raw = None if gguf_type == "f16" else _ggml(gguf_type)
    if packed is not None and gguf_type != "f16":
        if packed.shape != (weight.shape[0], tensor_bytes(gguf_type, weight.shape) // weight.shape[0]):
            raise SlimlmError(f"pre-quantized data for {name} does not match its shape {tuple(weight.shape)} as {gguf_type}", "quantize it again for this model")
        return np.ascontiguousarray(packed), raw
    return requantize(weight, gguf_type, importance), raw


def _quantized(name: str, module: QuantizedLinear, order, gguf_type: str, summary: GGUFSummary):
    problem = code_layout_problem(module.grid, module.in_features, gguf_type) if gguf_type in GGUF_TYPES else "unknown type"
    if problem:
        raise SlimlmError(f"{name} ({tuple(module.weight_q.shape)}) cannot be GGUF {gguf_type}: {problem}",
                          f"types its codes or shape allow: {', '.join(t for t in types_for_shape(module.weight_q.shape) if t in GGUF_TYPES and code_layout_problem(module.grid, module.in_features, t) is None)}")
    if gguf_type not in CODE_BITS:
        summary.dequantized += 1
        return requantize(order(module.dequantized_weight().float()), gguf_type), None if gguf_type == "f16" else _ggml(gguf_type)
    zero_point = getattr(module, "weight_zero_point", None)
    codes = order(module.weight_q.cpu())
    scale = order(module.weight_scale.cpu())
    zero_point = None if zero_point is None else order(zero_point.cpu())
    summary.codes_kept += 1
    return pack_codes(codes, scale, zero_point, gguf_type), _ggml(gguf_type)


# --- metadata -------------------------------------------------------------------------------------------------


def _add_hparams(writer, model: nn.Module, arch: str, gguf_type: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION, RopeScalingType

    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope(config)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(len(decoder_blocks(model)))  # from the model: depth-pruned blocks are gone
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # width-pruned heads: llama.cpp would derive hidden/heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(_file_type(gguf_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)


def copy_tokenizer_metadata(writer, source: Path, vocab_size: int) -> bool:
    """Copy every `tokenizer.*` key of the GGUF the model came from (same vocabulary); False if it does not fit."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        return False
    for key, entry in reader.fields.items():
        if key.startswith("tokenizer."):
            main = entry.types[0]
            sub = entry.types[-1] if main == GGUFValueType.ARRAY else None
            writer.add_key_value(key, entry.contents(), main, sub_type=sub)
    return True


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
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT:
        return "qwen2"
    return None


def hf_tokenizer_metadata(writer, tokenizer, config) -> None:
    """gpt2-style BPE vocabulary, types, merges, special ids and chat template, as convert_hf_to_gguf writes them."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model", {})
    pre = _pre_tokenizer_name(backend.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise SlimlmError(
            "GGUF export can only describe byte-level BPE tokenizers (GPT-2, SmolLM, Qwen2 pre-tokenizers) to llama.cpp",
            "export from a model that came from a GGUF (its tokenizer is copied), or use --format compressed-tensors / hf",
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= config.vocab_size:
        raise SlimlmError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size {config.vocab_size}", "resize the embeddings or fix the tokenizer")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(config.vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL if index not in added else TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        token_id = token_id if token_id is not None else getattr(config, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < config.vocab_size:
            getattr(writer, f"add_{'unk' if kind == 'unk' else kind}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


# --- writing --------------------------------------------------------------------------------------------------


def write_gguf(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    gguf_type: str = "f16",
    source_gguf: Path | None = None,
    name: str = "slimlm model",
    overwrite: bool = False,
    tensor_types: Mapping[str, str] | None = None,
    importance: Mapping[str, torch.Tensor] | None = None,
    packed: Mapping[str, np.ndarray] | None = None,
    file_type: str | None = None,
) -> GGUFSummary:
    """Write `model` as one GGUF file at `out`, atomically (a hidden partial file renamed into place at the end).

    The tokenizer metadata is copied from `source_gguf` (the file the model was loaded from) when its vocabulary
    has the model's size, else built from the HF `tokenizer`. `tensor_types` overrides the type per GGUF tensor
    name ("blk.3.ffn_down.weight", "token_embd.weight", "output.weight"); `importance` gives per-input-column
    importance (in,) for dense tensors re-quantized, by the same names; `packed` their raw bytes already quantized
    (e.g. by `gguf_types.gptq_for_type`, rows in HF order: q/k rows are permuted here), at `tensor_types`' type.
    `file_type`: the general.file_type to record (a preset such as q4_k_m; default `gguf_type`).
    `summary.tensors` lists every tensor.
    """
    import gguf

    out = Path(out).expanduser()
    if out.exists() and (not overwrite or out.is_dir()):
        raise SlimlmError(f"output '{out}' already exists", "choose another --out, or pass --overwrite to replace the file")
    check_writable(out)
    arch, permute = check_gguf_model(model, gguf_type, tensor_types)
    layout = tensor_layout(model)
    _check_overrides(layout, tensor_types or {}, importance or {}, packed or {})
    types = {**default_tensor_types(layout, gguf_type), **(tensor_types or {})}
    summary = GGUFSummary(out, gguf_type, 0)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    _add_hparams(writer, model, arch, file_type or gguf_type, name)
    if source_gguf is None or not copy_tokenizer_metadata(writer, source_gguf, model.config.vocab_size):
        hf_tokenizer_metadata(writer, tokenizer, model.config)
    with torch.no_grad():
        for tensor_name, payload, order in _tensor_plan(model, permute):
            prepacked = (packed or {}).get(tensor_name)
            if prepacked is not None:  # bytes rows are weight rows: the same permutation
                prepacked = order(torch.from_numpy(np.ascontiguousarray(prepacked))).numpy()
            data, raw = _encode(tensor_name, payload, order, types.get(tensor_name), summary, (importance or {}).get(tensor_name), prepacked)
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
            kind = raw.name if raw is not None else ("F16" if data.dtype == np.float16 else "F32")
            summary.tensor_types[kind] = summary.tensor_types.get(kind, 0) + 1
            shape = list(writer.tensors[-1][tensor_name].shape)
            summary.tensors.append({"name": tensor_name, "shape": shape, "type": kind.lower(), "bytes": tensor_bytes(kind.lower(), shape)})
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    except BaseException as err:
        writer.close()
        partial.unlink(missing_ok=True)
        refused = disk_error(err, out, sum(t["bytes"] for t in summary.tensors)) if isinstance(err, OSError) else None
        if refused is None:
            raise
        raise refused from None
    summary.bytes = out.stat().st_size
    return summary
