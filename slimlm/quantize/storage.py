"""Quantized linears on disk in compressed-tensors' pack-quantized layout (read by transformers and vLLM).

Per quantized module `m`: `m.weight_packed` (int32, codes packed densely along the input dim),
`m.weight_scale` (float16, (out, groups)), `m.weight_shape` ((2,) int64), and for asymmetric grids
`m.weight_zero_point` (int32, zero points packed along the output dim). `config.json` carries a
`quantization_config` with one config group per distinct grid, targeting modules by exact name.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.quantize.grid import QuantGrid
from slimlm.quantize.linear import QuantizedLinear


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


def unpack_quantized_linear(name: str, tensors: dict[str, torch.Tensor], grid: QuantGrid, compute_dtype: torch.dtype) -> QuantizedLinear:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
    codes = unpack_from_int32(tensors[f"{name}.weight_packed"], grid.bits, shape)
    scale = tensors[f"{name}.weight_scale"]
    zero_point = None
    if not grid.symmetric:
        zp_shape = torch.Size([shape[0], scale.shape[1]])
        zero_point = unpack_from_int32(tensors[f"{name}.weight_zero_point"], grid.bits, zp_shape, packed_dim=0)
    return QuantizedLinear(codes.to(torch.int8), scale, None if zero_point is None else zero_point.to(torch.int8), grid, tensors.get(f"{name}.bias"), compute_dtype)


def quantization_config(model: nn.Module) -> dict | None:
    """compressed-tensors `quantization_config` for every QuantizedLinear in `model` (None if there are none)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_grid: dict[QuantGrid, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            by_grid.setdefault(module.grid, []).append(name)
    if not by_grid:
        return None
    groups = {}
    for index, (grid, names) in enumerate(by_grid.items()):
        args = QuantizationArgs(
            num_bits=grid.bits,
            type="int",
            symmetric=grid.symmetric,
            strategy="channel" if grid.group_size is None else "group",
            group_size=grid.group_size,
        )
        groups[f"group_{index}"] = QuantizationScheme(targets=names, weights=args)
    config = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed")
    return config.model_dump()


def grids_by_module(quant_config: dict) -> dict[str, QuantGrid]:
    """Invert a quantization_config written by `quantization_config`: module name -> grid."""
    grids = {}
    for group in quant_config["config_groups"].values():
        weights = group["weights"]
        grid = QuantGrid(weights["num_bits"], weights.get("group_size") if weights["strategy"] == "group" else None, weights["symmetric"])
        for target in group["targets"]:
            grids[target] = grid
    return grids
