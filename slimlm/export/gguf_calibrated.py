"""GGUF codes chosen with calibration data: GPTQ on each tensor's own GGUF grid, importance-weighted rounding
(llama.cpp's imatrix statistic) for the rest, the output head included.

    method "imatrix": every 2-D tensor rounded by `gguf_types.quantize_tensor` with importance = mean x_j² of the
                      inputs it sees (the diagonal of the calibration Hessian / 2, what llama-imatrix collects);
                      the (tied) embedding/output's input is the final normed hidden state.
    method "gptq":    block linears by `gguf_types.gptq_for_type` on their type's grid, sequentially (each block
                      calibrated on the outputs of the blocks before it, already quantized; true-sequential
                      within a block); the embedding/output as "imatrix", from the quantized model's hidden states.

The model's dense linears are overwritten with the weights the file holds (the calibration driver's contract:
later blocks must see the quantized ones); pass a model you no longer need.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.export.gguf_types import GGUF_GPTQ_DAMP

METHODS = ("rtn", "imatrix", "gptq")


class _StopAtHead(Exception):
    """Raised by the head's pre-hook once its input is recorded; private, never escapes this module."""


def head_importance(model: nn.Module, calibration_ids: torch.Tensor) -> torch.Tensor:
    """Mean x_j² (in,) of the output head's input (the final normed hidden state) over the calibration windows."""
    from slimlm.models.adapters import adapter_for

    head = model.get_submodule(adapter_for(model).lm_head)
    total = torch.zeros(head.weight.shape[1])
    count = 0

    def record(_module, args):
        nonlocal count
        rows = args[0].reshape(-1, args[0].shape[-1]).float()
        total.add_(rows.pow(2).sum(0).cpu())
        count += rows.shape[0]
        raise _StopAtHead

    handle = head.register_forward_pre_hook(record)
    device = head.weight.device
    try:
        with torch.no_grad():
            for window in calibration_ids:
                try:
                    model(window[None].to(device))
                except _StopAtHead:
                    pass
    finally:
        handle.remove()
    return total / max(count, 1)


def collect_statistics(model: nn.Module, calibration_ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(Hessian by GGUF name, head importance) of the model as it is, in one calibration pass, for writing several
    files of one model (e.g. every preset) with `calibrated_codes(..., statistics=...)` without re-calibrating.
    Unlike the sequential default, every block's statistics then come from the unquantized model."""
    from slimlm.calibration.sequential import calibrate_sequentially
    from slimlm.export.gguf import linear_tensor_name
    from slimlm.models.adapters import adapter_for

    adapter = adapter_for(model)
    hessians: dict[str, torch.Tensor] = {}

    def keep(index: int, linears: dict[str, nn.Module], stats) -> None:
        for path in linears:
            hessians[linear_tensor_name(model, index, path[len(f"{adapter.blocks}.{index}.") :])] = stats[
                path
            ].hessian.cpu()

    calibrate_sequentially(model, calibration_ids, ("hessian",), keep, description="GGUF calibration statistics")
    return hessians, head_importance(model, calibration_ids)


def calibrated_codes(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    tensor_types: Mapping[str, str],
    method: str = "gptq",
    damp: float = GGUF_GPTQ_DAMP,
    statistics: tuple[Mapping[str, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """(packed bytes by GGUF name, importance by GGUF name) for `write_gguf(packed=..., importance=...)`.

    `tensor_types` maps GGUF names to types (the resolved mixture); f16/bf16 tensors and quantized linears
    (their codes are kept) are left alone. `statistics` (from `collect_statistics`): use those Hessians and head
    importance instead of calibrating sequentially (`calibration_ids` unused)."""
    from slimlm.calibration.sequential import calibrate_sequentially
    from slimlm.export.gguf import linear_tensor_name
    from slimlm.export.gguf_types import TYPES, dequantize_tensor, gptq_for_type
    from slimlm.models.adapters import adapter_for, block_linears, decoder_blocks

    if method not in ("imatrix", "gptq"):
        raise SlimlmError(f"unknown calibrated GGUF method '{method}'", f"use one of: {', '.join(METHODS)}")
    adapter = adapter_for(model)
    packed: dict[str, np.ndarray] = {}
    importance: dict[str, torch.Tensor] = {}

    def compress_block(index: int, linears: dict[str, nn.Module], stats) -> None:
        for path, linear in linears.items():
            name = linear_tensor_name(model, index, path[len(f"{adapter.blocks}.{index}.") :])
            kind = tensor_types.get(name, "f16")
            if not isinstance(linear, nn.Linear) or TYPES[kind].block == 1:
                continue
            hessian = stats[path].hessian if statistics is None else statistics[0][name]
            if method == "imatrix":
                importance[name] = (hessian.diagonal() / 2).cpu()  # H = 2·mean x xᵀ
                continue
            raw = gptq_for_type(linear.weight, hessian, kind, damp)
            packed[name] = raw
            linear.weight.data.copy_(dequantize_tensor(raw, kind, linear.weight.shape).to(linear.weight.dtype))

    if statistics is None:
        calibrate_sequentially(
            model,
            calibration_ids,
            ("hessian",),
            compress_block,
            description=f"GGUF {method} codes",
            true_sequential=method == "gptq",
        )
        head = head_importance(model, calibration_ids)
    else:
        for index in range(len(decoder_blocks(model))):
            compress_block(index, block_linears(model, index), None)
        head = statistics[1]
    for name in ("token_embd.weight", "output.weight"):
        if name in tensor_types and TYPES[tensor_types[name]].block > 1:
            importance[name] = head
    return packed, importance
