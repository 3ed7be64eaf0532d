"""GGUF for llama.cpp: F32/F16/BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, laid out as llama.cpp's convert_hf_to_gguf.py
lays out each architecture llama.cpp runs (the per-architecture layout, norms, RoPE order and hyperparameters are
one table in `gguf_arch.py`; the tokenizer keys are `gguf_vocab.py`'s).

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

llama.cpp applies RoPE to adjacent pairs (GPT-J style) for its llama architecture while HF rotates halves, so for
Llama / Mistral the rows of q_proj and k_proj are permuted per head (`permute_rope_rows`, llama.cpp's
`LlamaModel.permute`); the NeoX-style architectures (Qwen, Gemma, Phi-3) keep HF's order. Rows carry their codes,
scales and zero points with them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.checkpoint.atomic import check_writable, disk_error, remove_stale_partials
from slimlm.errors import SlimlmError
from slimlm.export.gguf_arch import ARCHITECTURES, add_arch_keys, arch_for, norm_data, query_scale, rope_tensors
from slimlm.export.gguf_types import (
    SUPER,
    TYPES,
    WRITABLE,
    ggml_type,
    pack_blocks,
    quantize_tensor,
    tensor_bytes,
    types_for_shape,
)
from slimlm.export.gguf_vocab import copy_tokenizer_metadata, hf_tokenizer_metadata
from slimlm.models.adapters import adapter_for, decoder_blocks, linear_weight
from slimlm.quantize.grid import QuantGrid
from slimlm.quantize.linear import QuantizedLinear

GGUF_TYPES = WRITABLE  # f32 f16 bf16, the 32-weight block types and the k-quants q2_k .. q6_k
BLOCK = 32  # QK4_0 = QK4_1 = QK8_0
CODE_BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5}  # the code width each block format stores
K_QUANTS = tuple(
    t for t in WRITABLE if TYPES[t].block == SUPER
)  # slimlm's packers; a QuantizedLinear's own scales do not fit their grids


def linear_tensor_name(model: nn.Module, index: int, rel: str) -> str:
    """The GGUF name of block `index`'s linear at `rel` (relative to the block, e.g. "mlp.down_proj")."""
    return f"blk.{index}.{dict(arch_for(model.config).block)[rel]}.weight"


def _ggml(name: str):
    return ggml_type(name)


def _file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    return {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        "q4_0": LlamaFileType.MOSTLY_Q4_0,
        "q4_1": LlamaFileType.MOSTLY_Q4_1,
        "q5_0": LlamaFileType.MOSTLY_Q5_0,
        "q5_1": LlamaFileType.MOSTLY_Q5_1,
        "q4_k": LlamaFileType.MOSTLY_Q4_K_M,
        "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
        "q5_k": LlamaFileType.MOSTLY_Q5_K_M,
        "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
        "q6_k": LlamaFileType.MOSTLY_Q6_K,
        "q2_k": LlamaFileType.MOSTLY_Q2_K,
        "q3_k": LlamaFileType.MOSTLY_Q3_K_M,
    }[gguf_type]


# --- pure kernels -------------------------------------------------------------------------------------------


def permute_rope_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the output rows of q_proj/k_proj (and anything indexed by them: codes, scales, zero points,
    biases) from HF's rotate-half RoPE layout to llama.cpp's adjacent-pair layout. rows: (n_head·head_dim, ...)."""
    head_dim = rows.shape[0] // n_head
    return rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def unpermute_rope_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rope_rows`: llama.cpp's adjacent-pair rows back to HF's rotate-half layout."""
    head_dim = rows.shape[0] // n_head
    return rows.reshape(n_head, head_dim // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def code_layout_problem(grid: QuantGrid, in_features: int, gguf_type: str) -> str | None:
    """Why GGUF `gguf_type` cannot hold these codes exactly (None if it can)."""
    if gguf_type in K_QUANTS:
        return f"{gguf_type.upper()} stores 4/6/8-bit sub-block scales of one fp16 scale per 256 weights, not these fp16 group scales"
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
        z = (
            torch.zeros_like(d)
            if zero_point is None
            else zero_point.float().repeat_interleave(repeat, dim=1).reshape(-1)
        )
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


def check_gguf_model(
    model: nn.Module, gguf_type: str, tensor_types: Mapping[str, str] | None = None
) -> tuple[str, bool]:
    """Refuse what GGUF cannot hold before writing anything: returns (llama.cpp architecture, permute q/k).

    A quantized linear is checked against its own type (`tensor_types` by GGUF name, else `gguf_type`)."""
    tensor_types = tensor_types or {}
    if gguf_type not in GGUF_TYPES:
        raise SlimlmError(f"unknown GGUF type '{gguf_type}'", f"use one of: {', '.join(GGUF_TYPES)}")
    arch = arch_for(model.config)
    adapter = adapter_for(model)
    config = model.config
    layout = {rel for rel, _ in arch.block}
    for index, block in enumerate(decoder_blocks(model)):
        for name, _ in block.named_parameters():
            if name.rpartition(".")[0] not in layout:
                raise SlimlmError(
                    f"block {index} has a tensor '{name}' that has no GGUF name in slimlm's {config.model_type} layout",
                    "export with --format compressed-tensors or hf",
                )
    if (
        arch.tied_only
        and model.get_submodule(adapter.lm_head).weight.data_ptr()
        != model.get_submodule(adapter.embed).weight.data_ptr()
    ):
        raise SlimlmError(
            f"this {config.model_type} model's output projection is not tied to its embedding, and llama.cpp's {arch.name} graph always reads token_embd as the output",
            "export with --format compressed-tensors or hf",
        )
    problems = []
    for index, block in enumerate(decoder_blocks(model)):
        for rel in adapter.linears():
            module = block.get_submodule(rel)
            if isinstance(module, QuantizedLinear):
                wanted = tensor_types.get(f"blk.{index}.{dict(arch.block)[rel]}.weight", gguf_type)
                problem = code_layout_problem(module.grid, module.in_features, wanted)
                if problem:
                    problems.append((f"{adapter.blocks}.{index}.{rel}", module, problem, wanted))
    if problems:
        name, module, problem, wanted = problems[0]
        grid = module.grid
        layout = "per channel" if grid.group_size is None else f"group {grid.group_size}"
        holders = [
            t
            for t in CODE_BITS
            if all(code_layout_problem(m.grid, m.in_features, t) is None for _, m, _, _ in problems)
        ]
        raise SlimlmError(
            f"{len(problems)} quantized linears (e.g. {name}: int{grid.bits} {'sym' if grid.symmetric else 'asym'} {layout}) cannot be written as GGUF {wanted} without re-quantizing: {problem}",
            f"formats that hold them: {', '.join(f'--gguf-type {t} (codes kept)' for t in holders) + ', ' if holders else ''}"
            "--gguf-type f16/bf16 (dequantized), --format compressed-tensors (codes kept) or --format hf (dequantized)",
        )
    return arch.name, arch.permute_qk


def check_gguf_config(config) -> None:
    """Refuse, from the config alone (before any weight loads), what llama.cpp cannot run, naming why."""
    arch_for(config)


def _tensor_plan(model: nn.Module, permute: bool):
    """Yield (gguf name, payload, row order) for every tensor, in llama.cpp's order. payload: a tensor already in
    llama.cpp's row order (2-D dense or 1-D), or a QuantizedLinear written from its codes; `order` maps HF rows
    (of weights, codes, scales or packed blocks) to llama.cpp's."""
    config = model.config
    adapter = adapter_for(model)
    arch = ARCHITECTURES[config.model_type]
    q_scale = query_scale(config, len(decoder_blocks(model))) if arch.query_scale_into else 1.0
    same = lambda t: t  # noqa: E731

    embed = model.get_submodule(adapter.embed).weight
    yield "token_embd.weight", embed.detach(), same
    for rope_name, factors in rope_tensors(config):  # Llama 3 / LongRoPE frequency factors, F32
        yield rope_name, factors, same
    if adapter.position_embed is not None:  # GPT-2's learned positions: llama-quantize never quantizes them
        yield "position_embd.weight", model.get_submodule(adapter.position_embed).weight.detach(), same
    for index, block in enumerate(decoder_blocks(model)):
        for rel, base in arch.block:
            module = block.get_submodule(rel)
            rows = arch.rope_rows(rel, config) if permute else None
            order = (lambda t, n=rows: permute_rope_rows(t, n)) if rows else (lambda t: t)
            scale = q_scale if rel == arch.query_scale_into else 1.0
            name = f"blk.{index}.{base}.weight"
            if isinstance(module, QuantizedLinear):
                if scale != 1.0:  # Gemma 2's query-scale fold rides on the block scales: the codes are unchanged
                    module = QuantizedLinear(
                        module.weight_q,
                        (module.weight_scale.float() * scale).to(module.weight_scale.dtype),
                        module.weight_zero_point,
                        module.grid,
                        module.bias,
                        module.compute_dtype,
                    )
                yield name, module, order
            elif module.weight.dim() == 1:
                yield name, norm_data(arch, rel, module.weight, q_scale), same
            else:
                yield name, order(linear_weight(module).detach()) * scale, order
            bias = getattr(module, "bias", None)
            if bias is not None:
                yield f"blk.{index}.{base}.bias", order(bias.detach()).float() * scale, order
    final_norm = model.get_submodule(adapter.final_norm)
    yield "output_norm.weight", norm_data(arch, "", final_norm.weight, 1.0), same
    if getattr(final_norm, "bias", None) is not None:
        yield "output_norm.bias", final_norm.bias.detach(), same
    head = model.get_submodule(adapter.lm_head).weight
    if head.data_ptr() != embed.data_ptr():  # tied: llama.cpp reads token_embd for the output
        yield "output.weight", head.detach(), same


def tensor_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{GGUF tensor name: torch shape (rows last)} of every tensor the file will hold, nothing quantized."""
    return {
        name: tuple(payload.weight_q.shape if isinstance(payload, QuantizedLinear) else payload.shape)
        for name, payload, _ in _tensor_plan(model, permute=False)
    }


def default_tensor_types(layout: Mapping[str, tuple[int, ...]], gguf_type: str) -> dict[str, str]:
    """`gguf_type` for every 2-D tensor; 4/5-bit files keep the (tied) embedding / output projection at Q8_0 as
    llama-quantize does for rows that are not a multiple of 256."""
    io_type = "q8_0" if gguf_type in ("q4_0", "q4_1", "q5_0", "q5_1") else gguf_type
    position_type = "f32" if gguf_type == "f32" else "f16"  # learned positions (GPT-2) are never quantized
    return {
        name: position_type
        if name == "position_embd.weight"
        else io_type
        if name in ("token_embd.weight", "output.weight")
        else gguf_type
        for name, shape in layout.items()
        if len(shape) == 2
    }


def _check_overrides(layout: Mapping[str, tuple[int, ...]], *named: Mapping) -> None:
    """Every override names a 2-D tensor the file has."""
    for key in (key for mapping in named for key in mapping):
        if key not in layout or len(layout[key]) != 2:
            raise SlimlmError(
                f"GGUF tensor '{key}' does not exist in this model",
                "name tensors as llama.cpp does, e.g. blk.0.ffn_down.weight, token_embd.weight",
            )


def _encode(name: str, payload, order, gguf_type: str | None, summary: GGUFSummary, importance=None, packed=None):
    """One tensor's (data, raw GGML type or None) at `gguf_type` (None: 1-D, F32)."""
    if gguf_type is None:
        return payload.float().cpu().numpy(), None
    if isinstance(payload, QuantizedLinear):
        return _quantized(name, payload, order, gguf_type, summary)
    return _dense_2d(name, payload, gguf_type, summary, importance, packed)


def _dense_2d(name: str, weight: torch.Tensor, gguf_type: str, summary: GGUFSummary, importance=None, packed=None):
    if gguf_type not in GGUF_TYPES:
        raise SlimlmError(
            f"GGUF type '{gguf_type}' for {name} is not one slimlm writes", f"use one of: {', '.join(GGUF_TYPES)}"
        )
    block = TYPES[gguf_type].block
    if weight.shape[1] % block:
        summary.fallbacks.append(name)
        gguf_type = "f16"
    elif block > 1:
        summary.requantized += 1
    raw = None if gguf_type == "f16" else _ggml(gguf_type)
    if packed is not None and gguf_type != "f16":
        if packed.shape != (weight.shape[0], tensor_bytes(gguf_type, weight.shape) // weight.shape[0]):
            raise SlimlmError(
                f"pre-quantized data for {name} does not match its shape {tuple(weight.shape)} as {gguf_type}",
                "quantize it again for this model",
            )
        return np.ascontiguousarray(packed), raw
    return requantize(weight, gguf_type, importance), raw


def _quantized(name: str, module: QuantizedLinear, order, gguf_type: str, summary: GGUFSummary):
    problem = (
        code_layout_problem(module.grid, module.in_features, gguf_type) if gguf_type in GGUF_TYPES else "unknown type"
    )
    if problem:
        raise SlimlmError(
            f"{name} ({tuple(module.weight_q.shape)}) cannot be GGUF {gguf_type}: {problem}",
            f"types its codes or shape allow: {', '.join(t for t in types_for_shape(module.weight_q.shape) if t in GGUF_TYPES and code_layout_problem(module.grid, module.in_features, t) is None)}",
        )
    if gguf_type not in CODE_BITS:
        summary.dequantized += 1
        return requantize(order(module.dequantized_weight().float()), gguf_type), None if gguf_type == "f16" else _ggml(
            gguf_type
        )
    zero_point = getattr(module, "weight_zero_point", None)
    codes = order(module.weight_q.cpu())
    scale = order(module.weight_scale.cpu())
    zero_point = None if zero_point is None else order(zero_point.cpu())
    summary.codes_kept += 1
    return pack_codes(codes, scale, zero_point, gguf_type), _ggml(gguf_type)


# --- metadata -------------------------------------------------------------------------------------------------


def _add_hparams(writer, model: nn.Module, arch: str, gguf_type: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION

    writer.add_type("model")
    writer.add_name(name)
    add_arch_keys(writer, model, model.config, len(decoder_blocks(model)))  # from the model: pruned blocks are gone
    writer.add_file_type(_file_type(gguf_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)


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
        raise SlimlmError(
            f"output '{out}' already exists", "choose another --out, or pass --overwrite to replace the file"
        )
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
            data, raw = _encode(
                tensor_name,
                payload,
                order,
                types.get(tensor_name),
                summary,
                (importance or {}).get(tensor_name),
                prepacked,
            )
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
            kind = raw.name if raw is not None else ("F16" if data.dtype == np.float16 else "F32")
            summary.tensor_types[kind] = summary.tensor_types.get(kind, 0) + 1
            shape = list(writer.tensors[-1][tensor_name].shape)
            summary.tensors.append(
                {"name": tensor_name, "shape": shape, "type": kind.lower(), "bytes": tensor_bytes(kind.lower(), shape)}
            )
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
