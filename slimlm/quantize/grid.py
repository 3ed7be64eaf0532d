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


def group_ranges(weight: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) -> groups (out, G, size) float32, and RTN's range per group: min(w, 0), max(w, 0), each (out, G, 1)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, grid.group_count(in_features), -1)
    return groups, groups.amin(dim=2, keepdim=True).clamp(max=0), groups.amax(dim=2, keepdim=True).clamp(min=0)


def fake_quantize_in_ranges(
    groups: torch.Tensor, low: torch.Tensor, high: torch.Tensor, grid: QuantGrid
) -> torch.Tensor:
    """Round `groups` (out, G, size) clamped to [low, high] (out, G, 1; low ≤ 0 ≤ high) and dequantize.

    The grid's choose_qparams → quantize_with → dequantize of the clamped weight, as one chain of float ops
    with the same rounding steps (equal bit for bit, tested): the searches run it 20 times per layer.
    """
    out = torch.clamp(groups, low, high)  # the one new tensor: the rest runs in place (allocations dominate on CPU)
    if grid.symmetric:
        scale = (2 * torch.maximum(-low, high) / (grid.qmax - grid.qmin)).to(SCALE_DTYPE).clamp(min=MIN_SCALE).float()
        return out.div_(scale).round_().clamp_(grid.qmin, grid.qmax).mul_(scale)
    scale = ((high - low) / (grid.qmax - grid.qmin)).to(SCALE_DTYPE).clamp(min=MIN_SCALE).float()
    zero = (grid.qmin - torch.round(low / scale)).clamp_(grid.qmin, grid.qmax)
    return out.div_(scale).round_().add_(zero).clamp_(grid.qmin, grid.qmax).sub_(zero).mul_(scale)


def shrink_ratios(count: int = 20, smallest: float = 0.5) -> tuple[float, ...]:
    """Range shrink factors tried by the clipping searches: `count` evenly from 1.0 (no clipping) to `smallest`."""
    return tuple(torch.linspace(1.0, smallest, count).tolist())


def clip_by_error(
    weight: torch.Tensor, grid: QuantGrid, ratios: tuple[float, ...], group_hessians: torch.Tensor | None = None
) -> torch.Tensor:
    """`weight` (out, in) with each group clamped to r·[min(w, 0), max(w, 0)] for the ratio r in `ratios` whose
    rounding error is smallest (ties keep the earlier ratio; (1.0,) returns the weight unchanged): ‖W_g − Ŵ_g‖², or
    with `group_hessians` (G, size, size), the output error ΔW_g·H_gg·ΔW_gᵀ (AWQ's clipping search).

    choose_qparams of the result are the best clipped min/max qparams (llm-compressor's "mse" observer):
    a few outliers no longer stretch a 4-bit group's 16 levels over a range most weights never use.
    """
    groups, low, high = group_ranges(weight, grid)
    best_error = torch.full(low.shape, torch.inf, device=groups.device)
    best_ratio = torch.ones_like(low)
    for ratio in ratios:
        delta = fake_quantize_in_ranges(groups, low * ratio, high * ratio, grid).sub_(groups)  # Ŵ − W (out, G, size)
        weighted = delta if group_hessians is None else torch.einsum("ogi,gij->ogj", delta, group_hessians)
        error = (weighted * delta).sum(dim=2, keepdim=True)  # (out, G, 1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, ratio, best_ratio)
    return torch.clamp(groups, low * best_ratio, high * best_ratio).reshape(weight.shape)


def quantize_with(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, grid: QuantGrid
) -> torch.Tensor:
    """Codes (out, in) int8 for given qparams (scale/zero_point (out, groups))."""
    groups = _grouped(weight, grid)
    codes = torch.round(groups / scale.float().unsqueeze(2))
    if zero_point is not None:
        codes = codes + zero_point.float().unsqueeze(2)
    return codes.clamp(grid.qmin, grid.qmax).to(torch.int8).reshape(weight.shape)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(q - zero_point) * scale, broadcast per group. codes (out, in); scale/zero_point (out, groups)."""
    out_features, in_features = codes.shape
    groups = scale.shape[1]
    values = codes.float().reshape(out_features, groups, in_features // groups)  # one buffer, updated in place
    if zero_point is not None:
        values.sub_(zero_point.float().unsqueeze(2))
    return values.mul_(scale.float().unsqueeze(2)).reshape(out_features, in_features).to(dtype)
