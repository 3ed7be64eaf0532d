"""Per-input-channel rescaling that leaves the model's function unchanged: x·Wᵀ = (x / s)·(W·diag(s))ᵀ.

AWQ and SmoothQuant both move magnitude between a linear layer's inputs and its weights with a scale s (in,).
The division of x by s is folded into whatever produced x, so nothing extra runs at inference:
- a norm right before the readers (RMSNorm / LayerNorm gain and bias, Gemma's (1 + w) gain included), or
- the output rows of a linear whose output the reader reads through an elementwise step that commutes with a
  positive scale (v→o through attention's weighted sum, up→down through the gated product, fc1→fc2 through ReLU).
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.models.adapters import linear_weight, set_linear_weight_


def _is_one_plus_gain(norm: nn.Module) -> bool:
    """Gemma's RMSNorm multiplies by (1 + weight), not by weight."""
    return "Gemma" in type(norm).__name__


@torch.no_grad()
def scale_norm_output_(norm: nn.Module, scales: torch.Tensor) -> None:
    """Make `norm` output y / s instead of y: gain (and bias) divided by s (hidden,)."""
    scales = scales.to(norm.weight.device, torch.float32)
    gain = norm.weight.float() + 1 if _is_one_plus_gain(norm) else norm.weight.float()
    gain = gain / scales
    norm.weight.copy_((gain - 1 if _is_one_plus_gain(norm) else gain).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / scales).to(norm.bias.dtype))


@torch.no_grad()
def scale_linear_rows_(producer: nn.Module, scales: torch.Tensor, rows: slice = slice(None)) -> None:
    """Divide output rows `rows` of a linear (and their bias) by s: its output channels come out as y / s."""
    weight = linear_weight(producer).float().clone()  # (out, in)
    scales = scales.to(weight.device, torch.float32)
    weight[rows] /= scales.unsqueeze(1)
    set_linear_weight_(producer, weight)
    if producer.bias is not None:
        bias = producer.bias.float().clone()
        bias[rows] /= scales
        producer.bias.copy_(bias.to(producer.bias.dtype))


@torch.no_grad()
def scale_linear_columns_(reader: nn.Module, scales: torch.Tensor) -> None:
    """Multiply the input columns of a linear by s (in,): it reads x / s and still computes x·Wᵀ."""
    weight = linear_weight(reader).float()  # (out, in)
    set_linear_weight_(reader, weight * scales.to(weight.device, torch.float32).unsqueeze(0))
