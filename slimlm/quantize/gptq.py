"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers").

Quantize a linear layer's weight W (out, in) one input column at a time and, after each column, update the
columns not yet quantized so the layer's output on the calibration inputs moves as little as possible (the
Optimal Brain Quantizer step), with the Hessian H = 2/N · XᵀX (in, in) shared by every row:

    H ← H + δ·mean(diag H)·I                          (dampening; ×10 and retry if not positive definite)
    H⁻¹ = UᵀU, U upper triangular                     (Cholesky of the inverse)
    for column j:  q = dequant(quant(w_j))            (on the grid of j's group, quantize/grid.py)
                   err = (w_j − q) / U_jj              (out,)
                   W[:, j:] −= err ⊗ U[j, j:]          (update of the columns after j)

Columns are processed in blocks of `block_size`: the update is applied inside the block at once and to the
columns after it in one matmul ("lazy batch update"), which reorders the arithmetic, not the result. Input
channels that never fire (H_jj = 0) are zeroed and excluded from the updates.

Group quantization parameters (min/max of the group's weights, scales rounded to float16 before codes are
chosen; with `clip`, of the weights clamped to the shrunk range of least rounding error, `grid.clip_by_error`):
- per channel (group_size None): from the whole row of W, before any update.
- groups, fixed order: when the group's first column is reached, from the group's columns as updated so far
  (the reference code's behaviour; it reads the in-block columns before their in-block updates, slimlm uses
  the exact current values, so the result does not depend on `block_size`).
- act_order: columns are visited by descending H_jj (the most active inputs first, while many columns are still
  free to absorb their error) with *static* groups: every group's parameters are chosen from the original W,
  groups are the usual runs of consecutive original columns, so the stored layout is the standard one (no
  g_idx) and codes are put back in the original column order at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.calibration.hessian import (
    dampened_inverse_cholesky,
    single_threaded,
    stacked_by_input,
    working_copies,
)
from slimlm.calibration.stats import InputStats
from slimlm.errors import SlimlmError
from slimlm.models.adapters import linear_weight
from slimlm.quantize.grid import (
    QuantGrid,
    choose_qparams,
    clip_by_error,
    quantize_with,
    shrink_ratios,
)
from slimlm.quantize.linear import replace_with_codes_
from slimlm.quantize.rtn import GridConfig, check_group_size
from slimlm.stage import Stage, check_dampening, check_range

DAMPENING_RETRIES = 2  # δ, 10δ, 100δ: a Hessian that needs more is a symptom (too few tokens), not a rounding issue


@dataclass(frozen=True)
class GPTQConfig(GridConfig):
    """Integer weights chosen column by column with second-order error compensation (GPTQ)."""

    method: ClassVar[str] = "gptq"

    act_order: bool = True  # visit columns by descending Hessian diagonal (static groups, standard layout); false: in order, groups chosen on the updated weights
    block_size: int = 128  # columns per lazy-update block (speed only)
    dampening: float = 0.01  # share of mean(diag H) added to H's diagonal before inverting it
    clip: bool = True  # shrink each group's range to the ratio (1.0 … 0.5) of least rounding error before choosing its scale (MSE observer)
    true_sequential: bool = True  # within a block, quantize q/k/v, then o, then gate/up, then down, each on inputs from the already-quantized earlier ones

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "block_size", self.block_size, 1, math.inf)
        check_dampening(self)

    @property
    def clip_ratios(self) -> tuple[float, ...]:
        return shrink_ratios() if self.clip else (1.0,)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: QuantGrid,
    block_size: int = GPTQConfig.block_size,
    dampening: float = GPTQConfig.dampening,
    act_order: bool = GPTQConfig.act_order,
    clip_ratios: tuple[float, ...] = (1.0,),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight (out, in), hessian (in, in) -> (codes int8 (out, in), scale fp16 (out, groups), zero_point int8 (out, groups) | None).

    The layout is RTN's (`quantize/rtn.py`): dequantize with `quantize.grid.dequantize`. Computed in float32;
    neither input is modified. Each group's qparams come from its weights clipped by `grid.clip_by_error` over
    `clip_ratios` ((1.0,): plain min/max).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise SlimlmError(
            f"gptq: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match",
            "pass an (out, in) weight and its (in, in) Hessian",
        )
    out_features, in_features = weight.shape
    group = grid.group_size or in_features
    if in_features % group:
        raise SlimlmError(
            f"gptq: group_size {grid.group_size} does not divide the input size {in_features}",
            "use a group_size that divides it, or null for per-channel",
        )
    if not torch.isfinite(weight).all():
        raise SlimlmError(
            "gptq: the weight holds NaN or Inf",
            "check the model loads correctly (e.g. in float32) before quantizing it",
        )
    W, H = working_copies(weight, hessian)  # float32 (out, in), (in, in); dead inputs zeroed

    row_grid = QuantGrid(grid.bits, None, grid.symmetric)  # one group per row: qparams of one group's columns
    static = grid.group_size is None or act_order  # qparams known up front, from the original weights
    if static:
        scale, zero_point = choose_qparams(clip_by_error(W, grid, clip_ratios), grid)  # (out, groups)
    else:
        scale = torch.empty(out_features, in_features // group, dtype=torch.float16, device=W.device)
        zero_point = (
            None
            if grid.symmetric
            else torch.empty(out_features, in_features // group, dtype=torch.int8, device=W.device)
        )
    order = (
        torch.argsort(H.diagonal(), descending=True, stable=True)
        if act_order
        else torch.arange(in_features, device=W.device)
    )
    if act_order:
        W, H = W[:, order], H[order][:, order]
    group_of = (order // group).tolist()  # visiting position -> group of the original column
    U = dampened_inverse_cholesky(H, dampening, "gptq", retries=DAMPENING_RETRIES)  # (in, in)

    Wt = W.t().contiguous()  # (in, out)
    float_scale = scale.t().float().contiguous()  # (groups, out)
    zero = zero_point.t().float() if zero_point is not None else torch.zeros_like(float_scale)
    lowest, highest = (
        (grid.qmin - zero).contiguous(),
        (grid.qmax - zero).contiguous(),
    )  # (groups, out) clamp bounds of round(w / s)

    def refill(g: int, current: torch.Tensor) -> None:
        """Group g's qparams from its columns as updated so far, current (group, out), into the loop's tables."""
        s, z = choose_qparams(clip_by_error(current.t(), row_grid, clip_ratios), row_grid)  # (out, 1)
        scale[:, g] = s[:, 0]
        float_scale[g] = s[:, 0].float()
        if zero_point is not None:
            zero_point[:, g] = z[:, 0]
            lowest[g] = grid.qmin - z[:, 0].float()
            highest[g] = grid.qmax - z[:, 0].float()

    error_feedback_(
        Wt, U, group_of, group, (float_scale, lowest, highest, None), block_size, None if static else refill
    )
    if act_order:
        Wt = Wt[torch.argsort(order)]
    return quantize_with(Wt.t(), scale, zero_point, grid), scale, zero_point


def error_feedback_(
    Wt: torch.Tensor,
    U: torch.Tensor,
    group_of: list[int],
    group: int,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    block_size: int = GPTQConfig.block_size,
    refill=None,
) -> None:
    """GPTQ's column loop, in place on Wt = Wᵀ (in, out) in visiting order, with U (in, in) the upper Cholesky
    factor of the (permuted, dampened) H⁻¹ and group_of[j] the group of the j-th visited column.

    Column j is rounded on its group's grid, q = clamp(round((w − O)/S), lo, hi)·S + O, with tables = (S, lo, hi,
    O or None) each (groups, out) float32, and its error fed to the columns after it. After the loop row j holds
    column j as it was when rounded, so rounding Wt with the same expression gives exactly the committed codes.
    `refill(g, current (group, out))`, if given, refills group g's table rows (in place) from its current columns
    when its first column is reached (GPTQ's dynamic groups; `group_of` is then the identity's groups).

    A column of W is one contiguous row of Wt. Per group, the scale, bounds and offset are rows of the tables;
    every per-column view is made up front (unbind): the loop is ~10 small ops per column, and creating views by
    indexing cost as much as the arithmetic.
    """
    in_features = Wt.shape[0]
    scale_table, low_table, high_table, offset_table = tables
    scales, lows, highs = scale_table.unbind(0), low_table.unbind(0), high_table.unbind(0)  # views: see refill
    offsets = offset_table.unbind(0) if offset_table is not None else None
    columns = Wt.unbind(0)
    diagonal = U.diagonal().unbind(0)  # 0-dim tensors: dividing by one is cheaper than by a Python float
    with single_threaded():  # one column at a time: small ops
        for start in range(0, in_features, block_size):
            end = min(start + block_size, in_features)
            W1 = Wt[start:end]  # (B, out), a view: updated in place
            U1 = U[start:end, start:end]  # (B, B)
            err1 = torch.zeros_like(W1)  # (B, out): (w − q)/U_jj of each column, for the lazy update
            errors, later_columns, later_u = (
                err1.unbind(0),
                [W1[j + 1 :] for j in range(end - start)],
                [U1[j, j + 1 :] for j in range(end - start)],
            )
            for j in range(end - start):
                col = start + j
                g = group_of[col]
                if refill is not None and col % group == 0:
                    # this group's columns as updated so far: in-block ones are current, later ones still owe this
                    # block's pending update (err1 is zero from row j on)
                    current = W1[j : j + group]
                    if col + group > end:
                        rest = Wt[end : col + group] - U[start:end, end : col + group].t() @ err1
                        current = torch.cat([current, rest])
                    refill(g, current)
                w, err = columns[col], errors[j]  # (out,)
                if offsets is None:
                    q = (
                        torch.div(w, scales[g]).round_().clamp_(lows[g], highs[g]).mul_(scales[g])
                    )  # quantize_with's codes, dequantized
                else:
                    q = (
                        torch.sub(w, offsets[g])
                        .div_(scales[g])
                        .round_()
                        .clamp_(lows[g], highs[g])
                        .mul_(scales[g])
                        .add_(offsets[g])
                    )
                torch.sub(w, q, out=err).div_(diagonal[col])
                later_columns[j].addr_(later_u[j], err, alpha=-1)  # (B − j − 1, out): the columns after j
            Wt[end:].addmm_(U[start:end, end:].t(), err1, alpha=-1)  # lazy batch update of every later column


def gptq_by_input(
    linears: dict[str, nn.Module],
    stats: dict[str, InputStats],
    grid: QuantGrid,
    block_size: int = GPTQConfig.block_size,
    dampening: float = GPTQConfig.dampening,
    act_order: bool = GPTQConfig.act_order,
    clip_ratios: tuple[float, ...] = (1.0,),
) -> Iterator[tuple[str, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(name, linear, codes, scale, zero_point) for each linear, as `gptq_quantize` gives them. Linears that read
    the same input (q/k/v, gate/up share one statistics object) are stacked row-wise and quantized in one call:
    GPTQ treats rows independently given H, so this equals separate calls, with one factorization and one column
    loop. The tensors are clones: each layer owns its buffers (saving refuses tensors that share memory)."""
    for names, weight, hessian in stacked_by_input(linears, stats):
        codes, scale, zero_point = gptq_quantize(weight, hessian, grid, block_size, dampening, act_order, clip_ratios)
        rows = [linear_weight(linears[name]).shape[0] for name in names]
        zero_points = zero_point.split(rows) if zero_point is not None else [None] * len(names)
        for name, c, s, z in zip(names, codes.split(rows), scale.split(rows), zero_points):
            yield name, linears[name], c.clone(), s.clone(), None if z is None else z.clone()


def quantize_gptq_(
    model: nn.Module, linears: dict[str, nn.Module], config: GPTQConfig, stats: dict[str, InputStats]
) -> None:
    """Replace each linear by a QuantizedLinear whose codes GPTQ chose (`gptq_by_input`)."""
    for name, linear, codes, scale, zero_point in gptq_by_input(
        linears, stats, config.grid, config.block_size, config.dampening, config.act_order, config.clip_ratios
    ):
        replace_with_codes_(model, name, linear, codes, scale, zero_point, config.grid)


GPTQ = Stage(config=GPTQConfig, apply=quantize_gptq_, needs=("hessian",), check=check_group_size, quantizes=True)
