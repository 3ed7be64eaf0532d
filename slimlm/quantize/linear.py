"""A linear layer that holds integer codes: its memory and its saved bytes are the quantized ones."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from slimlm.models.adapters import linear_weight
from slimlm.models.swap import replace_module_
from slimlm.quantize.grid import QuantGrid, dequantize


class _CodesMatmul(torch.autograd.Function):
    """x · dequant(codes)ᵀ whose backward dequantizes the codes again instead of keeping the float weight: training
    through frozen quantized layers (QLoRA, distillation after quantization) holds one layer's float weight at a
    time, not a dense copy of every layer until the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None  # (..., out) @ (out, in): dL/dx


class QuantizedLinear(nn.Module):
    """y = x · dequant(codes)ᵀ + b, with codes (out, in) int8 and per-group scales (out, groups).

    Dequantizing on every call keeps only the codes resident; it is a simulation of a W-only kernel,
    exact in value, not in speed.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        grid: QuantGrid,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ):
        super().__init__()
        self.grid = grid
        self.out_features, self.in_features = codes.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_q", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight_q, self.weight_scale, self.weight_zero_point, self.compute_dtype)

    @property
    def qweight(self) -> torch.Tensor:
        """The codes under the name peft looks for a packed layer's device by (AutoGPTQ's), when it wraps the
        layer in LoRA adapters (slimlm.finetune.qlora)."""
        return self.weight_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        y = _CodesMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        group = "channel" if self.grid.group_size is None else f"group={self.grid.group_size}"
        kind = "sym" if self.grid.symmetric else "asym"
        return f"in={self.in_features}, out={self.out_features}, int{self.grid.bits} {kind} {group}"


def replace_with_codes_(
    model: nn.Module,
    name: str,
    original: nn.Module,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    grid: QuantGrid,
) -> None:
    """The tail of every weight quantizer: swap the float linear `name` for a QuantizedLinear holding these codes,
    keeping its bias and its dtype."""
    bias = original.bias.detach() if original.bias is not None else None
    replace_module_(model, name, QuantizedLinear(codes, scale, zero_point, grid, bias, linear_weight(original).dtype))
