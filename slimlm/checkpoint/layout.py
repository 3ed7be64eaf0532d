"""Quantized linears on disk in compressed-tensors' layouts (read by transformers + compressed-tensors and vLLM).

Per quantized module `m` (`pack-quantized`, W4A16 / W8A16):
    m.weight_packed      int32 (out, ceil(in * bits / 32))   codes packed densely along the input dim
    m.weight_scale       float16 (out, groups)
    m.weight_shape       int64 (2,)
    m.weight_zero_point  int32 (ceil(out * bits / 32), groups)   asymmetric grids only, packed along the output dim
W8A8 linears (`Int8Linear`, `int-quantized`): `m.weight` int8 (out, in) and `m.weight_scale` float16 (out, 1);
their config group also quantizes `input_activations` (int8 per token, dynamic, symmetric).
`config.json` carries a `quantization_config` with one config group per distinct grid, targeting modules by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimlm.checkpoint.sizes import Entry
from slimlm.quantize.grid import QuantGrid
from slimlm.quantize.linear import QuantizedLinear
from slimlm.quantize.w8a8 import Int8Linear


def packed_entries(module: str, grid: QuantGrid, shape: tuple[int, int]) -> list[Entry]:
    """(name, dtype, shape) of what the file holds for one pack-quantized linear's weight (its bias is separate):
    the layout's one declaration, which the writer follows and the search's sizer counts."""
    out_features, in_features = shape
    groups = grid.group_count(in_features)
    entries = [
        (f"{module}.weight_packed", "I32", (out_features, math.ceil(in_features * grid.bits / 32))),
        (f"{module}.weight_scale", "F16", (out_features, groups)),
        (f"{module}.weight_shape", "I64", (2,)),
    ]
    if not grid.symmetric:
        entries.append((f"{module}.weight_zero_point", "I32", (math.ceil(out_features * grid.bits / 32), groups)))
    return entries


def pack_quantized_linear(name: str, module: QuantizedLinear) -> dict[str, torch.Tensor]:
    """State-dict entries of one quantized linear in the pack-quantized layout."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    grid = module.grid
    tensors = {
        f"{name}.weight_packed": pack_to_int32(module.weight_q.cpu(), grid.bits),
        f"{name}.weight_scale": module.weight_scale.cpu(),
        f"{name}.weight_shape": torch.tensor([module.out_features, module.in_features]),
    }
    if module.weight_zero_point is not None:
        tensors[f"{name}.weight_zero_point"] = pack_to_int32(module.weight_zero_point.cpu(), grid.bits, packed_dim=0)
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().cpu()
    return tensors


def int_quantized_linear(name: str, module: Int8Linear) -> dict[str, torch.Tensor]:
    """State-dict entries of one W8A8 linear in the int-quantized layout (codes stored as int8, unpacked)."""
    tensors = {
        f"{name}.weight": module.weight_q.cpu().contiguous(),
        f"{name}.weight_scale": module.weight_scale.cpu().contiguous(),
    }
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().cpu()
    return tensors


def quantized_linear_tensors(name: str, module: QuantizedLinear) -> dict[str, torch.Tensor]:
    """State-dict entries of any quantized linear, in its compressed-tensors layout."""
    return int_quantized_linear(name, module) if isinstance(module, Int8Linear) else pack_quantized_linear(name, module)


def rebuild_quantized_linear(
    name: str, tensors: dict[str, torch.Tensor], grid: QuantGrid, w8a8: bool, compute_dtype: torch.dtype
) -> QuantizedLinear:
    """The module `quantized_linear_tensors` saved: an Int8Linear for W8A8 groups, else a QuantizedLinear."""
    if w8a8:
        return Int8Linear(
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"], tensors.get(f"{name}.bias"), compute_dtype
        )
    return unpack_quantized_linear(name, tensors, grid, compute_dtype)


def unpack_quantized_linear(
    name: str, tensors: dict[str, torch.Tensor], grid: QuantGrid, compute_dtype: torch.dtype
) -> QuantizedLinear:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
    codes = unpack_from_int32(tensors[f"{name}.weight_packed"], grid.bits, shape)
    scale = tensors[f"{name}.weight_scale"]
    zero_point = None
    if not grid.symmetric:
        zp_shape = torch.Size([shape[0], scale.shape[1]])
        zero_point = unpack_from_int32(tensors[f"{name}.weight_zero_point"], grid.bits, zp_shape, packed_dim=0)
    return QuantizedLinear(
        codes.to(torch.int8),
        scale,
        None if zero_point is None else zero_point.to(torch.int8),
        grid,
        tensors.get(f"{name}.bias"),
        compute_dtype,
    )


def quantization_config(model: nn.Module) -> dict | None:
    """compressed-tensors `quantization_config` for every QuantizedLinear in `model` (None if there are none)."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    by_grid: dict[tuple[QuantGrid, bool], list[str]] = {}  # (grid, activations quantized too) -> module names
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            by_grid.setdefault((module.grid, isinstance(module, Int8Linear)), []).append(name)
    if not by_grid:
        return None
    groups = {}
    for index, ((grid, w8a8), names) in enumerate(by_grid.items()):
        args = QuantizationArgs(
            num_bits=grid.bits,
            type="int",
            symmetric=grid.symmetric,
            strategy="channel" if grid.group_size is None else "group",
            group_size=grid.group_size,
        )
        activations = (
            QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True) if w8a8 else None
        )
        groups[f"group_{index}"] = QuantizationScheme(
            targets=names,
            weights=args,
            input_activations=activations,
            format="int-quantized" if w8a8 else "pack-quantized",
        )
    formats = {group.format for group in groups.values()}
    config = QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
    )
    return config.model_dump()


def w8a8_modules(quant_config: dict) -> set[str]:
    """Names of the modules whose config group quantizes their input activations too (Int8Linear)."""
    return {
        target
        for group in quant_config["config_groups"].values()
        if group.get("input_activations")
        for target in group["targets"]
    }


def grids_by_module(quant_config: dict) -> dict[str, QuantGrid]:
    """Invert a quantization_config written by `quantization_config`: module name -> grid."""
    grids = {}
    for group in quant_config["config_groups"].values():
        weights = group["weights"]
        grid = QuantGrid(
            weights["num_bits"],
            weights.get("group_size") if weights["strategy"] == "group" else None,
            weights["symmetric"],
        )
        for target in group["targets"]:
            grids[target] = grid
    return grids
