"""W8A8: int8 weights per output channel, int8 activations per token computed at run time (dynamic).

The setting of SmoothQuant (Xiao et al., 2023, arXiv:2211.10438) and of vLLM's int8 W8A8 kernels:

    weight  W (out, in):  W_q = round(W / s_w),  s_w (out, 1) = max_j |W_ij| / 127.5   (`quantize/grid.py`, fp16)
    input   x (N, in):    x_q = round(x / s_x),  s_x (N, 1)   = max_j |x_nj| / 127.5   (per token, every call)
    output  y (N, out) =  (x_q · W_qᵀ) ⊙ s_x ⊙ s_wᵀ + b                           codes clamped to [-128, 127]

x_q · W_qᵀ is exact in int32 (|x_q|, |W_q| ≤ 128, so up to 2^17 terms never overflow). Two execution paths
give the same values up to float rounding of the rescale:
- simulated (default): dequantize both sides and multiply in float32, op for op what compressed-tensors'
  fake quantization runs when transformers loads the saved model;
- int8 (`int8_matmul`, CPU): a real int8 matmul with int32 accumulation, `torch._int_mm`. On CPUs without
  VNNI (AVX2 only) torch runs it as plain loops, ~30x slower than the float path, hence opt-in.

Weights are rounded to nearest (`w8a8`) or chosen by GPTQ on the calibration Hessian (`gptq-w8a8`, what
llm-compressor's W8A8 recipe does after SmoothQuant).

Activation scales follow compressed-tensors (max/127.5, as our weight grid), so transformers running a saved
model computes what slimlm computes. The paper's code and vLLM's dynamic int8 kernel divide by 127 instead (a
0.4% coarser grid that never clips the largest entry): outputs differ by occasional one-step rounding flips.
Run SmoothQuant (`quantize/smoothquant.py`) first to move activation outliers into the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from slimlm.calibration.stats import InputStats
from slimlm.models.adapters import linear_weight
from slimlm.models.swap import replace_module_
from slimlm.quantize.gptq import GPTQConfig, gptq_by_input
from slimlm.quantize.grid import QuantGrid, dequantize
from slimlm.quantize.linear import QuantizedLinear
from slimlm.quantize.rtn import rtn_quantize
from slimlm.stage import Stage, StageConfig, check_dampening, check_range

INT8 = QuantGrid(bits=8, group_size=None, symmetric=True)  # weights: one scale per output row; inputs: per token row
MIN_ACTIVATION_SCALE = torch.finfo(torch.float32).tiny  # an all-zero token must not divide by zero


@dataclass(frozen=True)
class W8A8Config(StageConfig):
    """int8 weights per output channel (round-to-nearest) and int8 activations per token, dynamic."""

    method: ClassVar[str] = "w8a8"

    int8_matmul: bool = False  # run the linears as real int8 matmuls (torch._int_mm, CPU) instead of dequantize + float32 matmul; same values, slower on CPUs without VNNI


@dataclass(frozen=True)
class GPTQW8A8Config(W8A8Config):
    """W8A8 with the int8 weights chosen by GPTQ (`quantize/gptq.py`) on each layer's calibration Hessian."""

    method: ClassVar[str] = "gptq-w8a8"

    act_order: bool = GPTQConfig.act_order  # visit columns by descending Hessian diagonal
    block_size: int = GPTQConfig.block_size  # columns per lazy-update block (speed only)
    dampening: float = GPTQConfig.dampening  # share of mean(diag H) added to H's diagonal before inverting it
    true_sequential: bool = (
        GPTQConfig.true_sequential
    )  # quantize q/k/v, o, gate/up, down in turn, each on inputs from the earlier quantized ones

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "block_size", self.block_size, 1, math.inf)
        check_dampening(self)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, in) -> codes (N, in) int8 in [-128, 127] and scales (N, 1) float32, s = max|x_n| / 127.5.

    The scale stays in float32 (it is never stored); otherwise the same rule as the weight grid.
    """
    rows = x.float()
    levels = INT8.qmax - INT8.qmin  # 255
    scale = (rows.abs().amax(dim=-1, keepdim=True) / (levels / 2)).clamp(min=MIN_ACTIVATION_SCALE)
    codes = torch.round(rows / scale).clamp(INT8.qmin, INT8.qmax).to(torch.int8)
    return codes, scale


class Int8Linear(QuantizedLinear):
    """y = (x_q · W_qᵀ) ⊙ s_x ⊙ s_wᵀ + b: a QuantizedLinear (int8, per channel) whose inputs are quantized too.

    `int8_matmul` asks for the integer matmul where torch offers one (CPU); `matmul` says which path a call
    takes on the module's current device. Not saved: a reloaded model runs the simulated path.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        int8_matmul: bool = False,
    ):
        super().__init__(codes, scale, None, INT8, bias, compute_dtype)
        self.int8_matmul = int8_matmul

    @property
    def matmul(self) -> str:
        """'int8' (torch._int_mm, int32 accumulation: CPU) or 'simulated' (dequantize, float32 matmul)."""
        return (
            "int8"
            if self.int8_matmul and self.weight_q.device.type == "cpu" and hasattr(torch, "_int_mm")
            else "simulated"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        codes, scale = quantize_per_token(rows)  # (N, in) int8, (N, 1)
        bias = None if self.bias is None else self.bias.float()
        if self.matmul == "int8":
            accumulated = torch._int_mm(codes, self.weight_q.t())  # (N, out) int32, exact
            out = accumulated.float() * scale * self.weight_scale.float().t()
            out = out if bias is None else out + bias
        else:  # op for op what compressed-tensors' fake quantization runs in transformers
            out = F.linear(codes.float() * scale, dequantize(self.weight_q, self.weight_scale, None), bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 sym channel weights, int8 per-token dynamic inputs, matmul={self.matmul}"


def w8a8_linear(module: nn.Module, int8_matmul: bool = False) -> Int8Linear:
    """An Int8Linear from a float linear (nn.Linear or GPT-2's Conv1D), weights rounded to nearest."""
    weight = (
        linear_weight(module).detach().contiguous()
    )  # (out, in) rows contiguous for the int8 matmul (Conv1D stores Wᵀ)
    codes, scale, _ = rtn_quantize(weight, INT8)
    bias = module.bias.detach() if module.bias is not None else None
    return Int8Linear(codes, scale, bias, weight.dtype, int8_matmul)


def quantize_w8a8_(model: nn.Module, linears: dict[str, nn.Module], config: W8A8Config) -> None:
    for name, module in linears.items():
        replace_module_(model, name, w8a8_linear(module, config.int8_matmul))


def quantize_gptq_w8a8_(
    model: nn.Module, linears: dict[str, nn.Module], config: GPTQW8A8Config, stats: dict[str, InputStats]
) -> None:
    """Int8Linears whose codes GPTQ chose on the per-channel int8 grid (`gptq_by_input`: linears reading one input
    are quantized in one call)."""
    for name, linear, codes, scale, _ in gptq_by_input(
        linears, stats, INT8, config.block_size, config.dampening, config.act_order
    ):
        bias = linear.bias.detach() if linear.bias is not None else None
        replace_module_(model, name, Int8Linear(codes, scale, bias, linear.weight.dtype, config.int8_matmul))


W8A8 = Stage(config=W8A8Config, apply=quantize_w8a8_, quantizes=True)
GPTQ_W8A8 = Stage(config=GPTQW8A8Config, apply=quantize_gptq_w8a8_, needs=("hessian",), quantizes=True)
