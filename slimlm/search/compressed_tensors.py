"""The compressed-tensors target of `slimlm search`: a checkpoint that loads in transformers + compressed-tensors
and in vLLM, searched per block linear under a byte budget by the machinery of the GGUF target (database of
variants, knapsack, re-ranking by true KL, front, report, recipe.yaml).

    types   int{4,8}-g{32,64,128} / int{4,8}-channel, symmetric, or with "-asym" an int zero point per group:
            compressed-tensors' `pack-quantized` W4A16 / W8A16 (codes packed in int32 along the input, fp16 scales
            (out, groups), int32-packed zero points, an int64 weight_shape); "dense": the linear kept in bfloat16.
            Asymmetric types are searched only when --types names them: vLLM reads their zero points, but
            transformers 5.23 + compressed-tensors 0.20 refuse them (vllm-project/llm-compressor#1618)
    method  gptq  GPTQ's error feedback on the type's grid (the search's Hessians, act-order, clipped ranges)
            rtn   min/max round-to-nearest: what llm-compressor's QuantizationModifier writes; always encoded
                  (the uniform baselines), and searchable
            ref   for "dense" only: the weight as it is

The token embedding and an untied output head stay dense (bfloat16): compressed-tensors quantizes linears, and
neither vLLM nor transformers reads a quantized embedding from it. So do norms and biases. Blocks may be removed
whole (depth pruning) as for GGUF.

The budget counts the weights file, model.safetensors, exactly: 8 bytes of length, the JSON header (one entry per
tensor, padded with spaces to 8 bytes) and every tensor's data; config.json and the tokenizer files beside it are
reported, not budgeted. The file's dense tensors are bfloat16, so the live model the search scores holds every
dense tensor rounded to bfloat16 (SmolLM2's weights are bfloat16: nothing changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.checkpoint.layout import packed_entries
from slimlm.checkpoint.sizes import (
    DTYPE_NAMES,
    Entry,
    data_bytes,
    header_base_bytes,
    safetensors_bytes,
    widest_header_bytes,
)
from slimlm.errors import SlimlmError
from slimlm.quantize.grid import QuantGrid
from slimlm.search.space import Knob, Option, SearchSpace
from slimlm.settings import CT_SEARCH_TYPES as CT_TYPES

TARGET = "compressed-tensors"
DENSE = "dense"
STORAGE_DTYPE = torch.bfloat16  # of every dense tensor in the written checkpoint
CT_METHODS = ("gptq", "rtn")


def is_ct_type(type_: str) -> bool:
    return type_ == DENSE or type_.startswith("int")


def ct_grid(type_: str) -> QuantGrid | None:
    """'int4-g32-asym' -> QuantGrid(4, 32, False); 'dense' -> None."""
    if type_ == DENSE:
        return None
    parts = type_.split("-")
    try:
        bits = int(parts[0].removeprefix("int"))
        group = None if parts[1] == "channel" else int(parts[1].removeprefix("g"))
    except (ValueError, IndexError):
        raise SlimlmError(
            f"'{type_}' is not a compressed-tensors type", f"use some of: {', '.join(CT_TYPES)}"
        ) from None
    if bits not in (4, 8) or parts[2:] not in ([], ["asym"]):
        raise SlimlmError(f"'{type_}' is not a compressed-tensors type", f"use some of: {', '.join(CT_TYPES)}")
    return QuantGrid(bits, group, symmetric=parts[2:] != ["asym"])


def ct_options(shape: tuple[int, int], types: tuple[str, ...], methods: tuple[str, ...]) -> tuple[Option, ...]:
    """Every (type, method) with a group size dividing the rows; RTN always (the baselines), dense as `ref`."""
    options = []
    for type_ in types:
        grid = ct_grid(type_)
        if grid is None:
            options.append(Option(DENSE, "ref"))
        elif grid.group_size is None or shape[1] % grid.group_size == 0:
            options.extend(Option(type_, m) for m in CT_METHODS if m in methods or m == "rtn")
    return tuple(options)


def ct_search_space(
    model: nn.Module, types: tuple[str, ...] | None = None, methods: tuple[str, ...] = CT_METHODS
) -> SearchSpace:
    """One knob per decoder-block linear (named by its HF module); the embedding and head are not searched."""
    from slimlm.models.adapters import adapter_for, decoder_blocks, linear_weight

    types = types or CT_TYPES
    for type_ in types:
        ct_grid(type_)  # refuse an unknown type up front
    adapter = adapter_for(model)
    knobs = []
    for index in range(len(decoder_blocks(model))):
        for rel in adapter.linears():
            module = f"{adapter.blocks}.{index}.{rel}"
            shape = tuple(linear_weight(model.get_submodule(module)).shape)
            options = ct_options(shape, types, methods)
            if not options:
                raise SlimlmError(
                    f"{module} {shape}: no searched type's group size divides {shape[1]}",
                    f"search other --types, e.g. {DENSE} or int4-channel",
                )
            shared = next((group[0] for group in adapter.shared_inputs if rel in group), rel)
            knobs.append(Knob(module, module, index, shape, options, shared=shared))
    return SearchSpace(TARGET, tuple(knobs))


# --- one tensor: codes in the database, entries in the file --------------------------------------------------------


def ct_encode(weight: torch.Tensor, option: Option, hessian: torch.Tensor | None) -> np.ndarray:
    """weight (out, in) -> uint8 payload: codes int8 (out·in) | scale fp16 (out·groups) | zero point int8 (asym);
    for dense, the bfloat16 weight's bytes."""
    grid = ct_grid(option.type)
    w = weight.detach().float().cpu()
    if grid is None:
        return w.to(STORAGE_DTYPE).view(torch.int16).numpy().view(np.uint8).reshape(-1).copy()
    if option.method == "gptq":
        from slimlm.export.gguf_types import GGUF_GPTQ_DAMP
        from slimlm.quantize.gptq import gptq_quantize
        from slimlm.quantize.grid import shrink_ratios

        codes, scale, zero_point = gptq_quantize(
            w, hessian, grid, dampening=GGUF_GPTQ_DAMP, clip_ratios=shrink_ratios()
        )
    else:
        from slimlm.quantize.rtn import rtn_quantize

        codes, scale, zero_point = rtn_quantize(w, grid)
    parts = [
        codes.to(torch.int8).numpy().view(np.uint8).reshape(-1),
        scale.to(torch.float16).numpy().view(np.uint8).reshape(-1),
    ]
    if zero_point is not None:
        parts.append(zero_point.to(torch.int8).numpy().view(np.uint8).reshape(-1))
    return np.concatenate(parts)


def ct_unpack(
    data: np.ndarray, option: Option, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The payload of `ct_encode` -> (codes int8 (out, in), scale fp16 (out, groups), zero point int8 | None)."""
    grid = ct_grid(option.type)
    out_features, in_features = shape
    groups = grid.group_count(in_features)
    data = np.ascontiguousarray(data).reshape(-1)
    n, s = out_features * in_features, out_features * groups * 2
    codes = torch.from_numpy(data[:n].view(np.int8).copy()).reshape(shape)
    scale = torch.from_numpy(data[n : n + s].view(np.float16).copy()).reshape(out_features, groups)
    zero_point = (
        None
        if grid.symmetric
        else torch.from_numpy(data[n + s : n + s + out_features * groups].view(np.int8).copy()).reshape(
            out_features, groups
        )
    )
    return codes, scale, zero_point


def ct_decode(data: np.ndarray, option: Option, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 weight the checkpoint's layer computes with: (q − z)·s, or the bfloat16 weight."""
    from slimlm.quantize.grid import dequantize

    if option.type == DENSE:
        return (
            torch.from_numpy(np.ascontiguousarray(data).view(np.int16).copy())
            .view(STORAGE_DTYPE)
            .reshape(shape)
            .float()
        )
    codes, scale, zero_point = ct_unpack(data, option, shape)
    return dequantize(codes, scale, zero_point, torch.float32)


def tensor_entries(module: str, option: Option, shape: tuple[int, int]) -> list[Entry]:
    """(name, safetensors dtype, shape) of what the file holds for one linear's weight (its bias is fixed)."""
    grid = ct_grid(option.type)
    if grid is None:
        return [(f"{module}.weight", DTYPE_NAMES[STORAGE_DTYPE], shape)]
    return packed_entries(module, grid, shape)


def variant_bytes(module: str, option: Option, shape: tuple[int, int]) -> int:
    """Data bytes plus the header entries at the widest offsets: ≥ what the variant adds to any file."""
    return sum(data_bytes(entry) + widest_header_bytes(entry) for entry in tensor_entries(module, option, shape))


# --- file bytes of a configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CTLayout:
    """What a checkpoint with `removed` blocks holds beside the searched weights (the `artifact.Layout` contract)."""

    removed: tuple[int, ...]
    header_bytes: int  # length + metadata + the fixed tensors' header entries at the widest offsets + padding
    fixed_bytes: int  # data of the fixed tensors (embedding, norms, biases, untied head) in the file's dtypes
    fixed: tuple[Entry, ...]  # their entries, at the file's names


def renamed(module: str, removed: tuple[int, ...], blocks: str) -> str:
    """An HF module name at the base's block numbering -> its name in a model without the `removed` blocks."""
    if not module.startswith(blocks + "."):
        return module
    index, _, rest = module.removeprefix(blocks + ".").partition(".")
    index = int(index)
    return f"{blocks}.{index - sum(r < index for r in removed)}.{rest}"


class CTSizer:
    """Exact model.safetensors bytes of any configuration (the driver's `Sizer` contract)."""

    def __init__(self, model: nn.Module, database):
        from slimlm.models.adapters import adapter_for

        self.model, self.database = model, database
        self.blocks = adapter_for(model).blocks
        self.layouts: dict[tuple[int, ...], CTLayout] = {}
        self.entries: dict[tuple[str, int, tuple[int, ...]], list] = {}

    def layout(self, removed: tuple[int, ...]) -> CTLayout:
        if removed not in self.layouts:
            from slimlm.checkpoint.save import weight_tensors

            searched = {k.module + ".weight" for k in self.database.space.knobs}
            fixed = []
            for name, tensor in weight_tensors(self.model).items():
                if name in searched or name.startswith(tuple(f"{self.blocks}.{b}." for b in removed)):
                    continue
                dtype = DTYPE_NAMES[STORAGE_DTYPE] if tensor.is_floating_point() else DTYPE_NAMES[tensor.dtype]
                fixed.append((renamed(name, removed, self.blocks), dtype, tuple(tensor.shape)))
            header = header_base_bytes() + sum(map(widest_header_bytes, fixed))
            self.layouts[removed] = CTLayout(removed, header, sum(map(data_bytes, fixed)), tuple(fixed))
        return self.layouts[removed]

    def _entries(self, knob: Knob, index: int, removed: tuple[int, ...]) -> list:
        key = (knob.tensor, index, removed)
        if key not in self.entries:
            option = self.database.variants[knob.tensor][index].option
            self.entries[key] = tensor_entries(renamed(knob.module, removed, self.blocks), option, knob.shape)
        return self.entries[key]

    def __call__(self, configuration) -> int:
        entries = list(self.layout(configuration.removed).fixed)
        for knob, index in zip(self.database.space.knobs, configuration.choice):
            if knob.block not in configuration.removed:
                entries.extend(self._entries(knob, index, configuration.removed))
        return safetensors_bytes(entries)


# --- the live model and the written checkpoint ---------------------------------------------------------------------


def checkpoint_model(
    model: nn.Module, removed: tuple[int, ...], payloads: dict[str, tuple[Option, np.ndarray]]
) -> nn.Module:
    """The model the checkpoint holds: `removed` blocks gone, dense tensors bfloat16, each searched linear (HF module
    at the base's numbering -> option, payload) a QuantizedLinear of those codes (the file holds what was scored)."""
    from slimlm.models.adapters import adapter_for, linear_weight, set_linear_weight_
    from slimlm.models.swap import replace_module_
    from slimlm.quantize.linear import QuantizedLinear
    from slimlm.search.artifact import pruned_copy

    blocks = adapter_for(model).blocks
    pruned = pruned_copy(model, removed).to(STORAGE_DTYPE).eval()
    for module_name, (option, data) in payloads.items():
        name = renamed(module_name, removed, blocks)
        module = pruned.get_submodule(name)
        shape = tuple(linear_weight(module).shape)
        if option.type == DENSE:
            set_linear_weight_(module, ct_decode(data, option, shape).to(linear_weight(module).dtype))
            continue
        codes, scale, zero_point = ct_unpack(data, option, shape)
        bias = module.bias.detach() if module.bias is not None else None
        replace_module_(
            pruned, name, QuantizedLinear(codes, scale, zero_point, ct_grid(option.type), bias, STORAGE_DTYPE)
        )
    return pruned


def write_ct_checkpoint(
    model: nn.Module,
    tokenizer,
    removed: tuple[int, ...],
    payloads: dict[str, tuple[Option, np.ndarray]],
    out: Path,
    manifest: dict,
    overwrite: bool = False,
) -> Path:
    from slimlm.checkpoint.save import save_model

    return save_model(checkpoint_model(model, removed, payloads), tokenizer, out, manifest, overwrite=overwrite).path


def write_ct_configuration(
    model: nn.Module, tokenizer, configuration, database, out: Path, manifest: dict, overwrite: bool = False
) -> Path:
    return write_ct_checkpoint(
        model, tokenizer, configuration.removed, database.chosen(configuration), out, manifest, overwrite
    )
