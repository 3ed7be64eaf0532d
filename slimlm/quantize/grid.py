"""The integer grid every weight quantizer targets (RTN, and later GPTQ/AWQ), in compressed-tensors' convention.

A weight row is split into groups of `group_size` input channels (or one group per row: per-channel). Each
group has a scale and, when asymmetric, an integer zero point; codes are signed ints in
[-2^(b-1), 2^(b-1) - 1] and dequantize as (q - zero_point) * scale. Scales are stored in float16, so they
are rounded to float16 *before* the codes are chosen: what is evaluated is exactly what is saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
MIN_SCALE = torch.finfo(SCALE_DTYPE).tiny  # an all-zero group (e.g. after pruning) must not divide by zero


@dataclass(frozen=True)
class QuantGrid:
    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group_count(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size


def _grouped(weight: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """(out, in) -> (out, groups, group_size) float32 view."""
    out_features, in_features = weight.shape
    groups = grid.group_count(in_features)
    return weight.float().reshape(out_features, groups, in_features // groups)


def choose_qparams(weight: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scale (and zero point) per group: (out, groups) float16 scale, (out, groups) int8 zero point."""
    groups = _grouped(weight, grid)
    levels = grid.qmax - grid.qmin  # 2^b - 1 steps
    if grid.symmetric:
        scale = 2 * groups.abs().amax(dim=2) / levels
        return scale.to(SCALE_DTYPE).clamp(min=MIN_SCALE), None
    low = groups.amin(dim=2).clamp(max=0)  # the grid always holds 0 exactly, as in GPTQ's reference code
    high = groups.amax(dim=2).clamp(min=0)
    scale = ((high - low) / levels).to(SCALE_DTYPE).clamp(min=MIN_SCALE)
    zero_point = (grid.qmin - torch.round(low / scale.float())).clamp(grid.qmin, grid.qmax)
    return scale, zero_point.to(torch.int8)


def quantize_with(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, grid: QuantGrid) -> torch.Tensor:
    """Codes (out, in) int8 for given qparams (scale/zero_point (out, groups))."""
    groups = _grouped(weight, grid)
    codes = torch.round(groups / scale.float().unsqueeze(2))
    if zero_point is not None:
        codes = codes + zero_point.float().unsqueeze(2)
    return codes.clamp(grid.qmin, grid.qmax).to(torch.int8).reshape(weight.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - zero_point) * scale, broadcast per group. codes (out, in); scale/zero_point (out, groups)."""
    out_features, in_features = codes.shape
    groups = scale.shape[1]
    values = codes.float().reshape(out_features, groups, in_features // groups)
    if zero_point is not None:
        values = values - zero_point.float().unsqueeze(2)
    return (values * scale.float().unsqueeze(2)).reshape(out_features, in_features).to(dtype)
