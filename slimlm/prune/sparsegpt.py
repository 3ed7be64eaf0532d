"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

Prune a linear layer's weight W (out, in) column by column and, after each column, update the columns not yet
visited so the layer's output on the calibration inputs X moves as little as possible — the Optimal Brain
Surgeon step, with the Hessian H = 2/N · XᵀX (in, in) shared by every row:

    H ← H + δ·mean(diag H)·I                         (dampening)
    H⁻¹ = UᵀU, U upper triangular                    (Cholesky of the inverse)
    for column j:  q = w_j with its pruned rows set to 0
                   err = (w_j − q) / U_jj             (out,)
                   W[:, j:] −= err ⊗ U[j, j:]         (OBS update of the columns after j)

Row j of U is, up to the factor U_jj, the first row of the inverse of H restricted to columns j.., i.e. of the
Hessian of the columns still free, so one factorization serves every step. Columns are processed in blocks of
`block_size`: the update is applied inside the block at once and to the columns after it in one matmul
("lazy batch update"), which changes the order of the arithmetic, not the result.

Mask selection, by the OBS saliency w² / U_jj²:
- unstructured: at the start of each block, per output row, drop the lowest-saliency weights of the block. The
  reference code picks one threshold over the whole block (all rows together); slimlm compares within each
  output row like Wanda and `prune/masks.py`, so every row ends with exactly round(in·sparsity) zeros. The row's
  drop count is spread over the blocks as round(end·s) − round(start·s), which sums to exactly round(in·s).
- n:m: when reaching the first column of each group of m, keep the n highest-saliency weights of the group
  (on the weights as updated so far), so `block_size` must be a multiple of m.
"""

from __future__ import annotations

import math
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
from slimlm.models.adapters import linear_weight, set_linear_weight_
from slimlm.prune.masks import SparsityConfig, check_pattern, n_m_mask, parse_pattern, row_mask_count
from slimlm.stage import Stage, check_dampening, check_range


@dataclass(frozen=True)
class SparseGPTConfig(SparsityConfig):
    """Prune by OBS saliency w²/[H⁻¹]_jj and update the remaining weights to compensate (SparseGPT)."""

    method: ClassVar[str] = "sparsegpt"
    block_size: int = (
        128  # columns per lazy-update block (speed only for n:m; also the mask-selection window for unstructured)
    )
    dampening: float = 0.01  # share of mean(diag H) added to H's diagonal before inverting it
    true_sequential: bool = True  # within a block, prune q/k/v, then o, then gate/up, then down, each on inputs from the already-pruned earlier ones

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "block_size", self.block_size, 1, math.inf)
        check_dampening(self)
        n_m = parse_pattern(self.pattern)
        if n_m and self.block_size % n_m[1]:
            self.fail(
                "block_size",
                f"{self.block_size} is not a multiple of m={n_m[1]} (pattern {self.pattern})",
                f"use a block_size divisible by {n_m[1]}, e.g. 128",
            )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    block_size: int = SparseGPTConfig.block_size,
    dampening: float = SparseGPTConfig.dampening,
) -> torch.Tensor:
    """weight (out, in), hessian (in, in) -> pruned and OBS-updated weight (out, in), in the weight's dtype.

    `sparsity` is the share removed per output row (ignored for an n:m pattern). Computed in float32; neither
    input is modified. Input channels that never fire (H_jj = 0) are zeroed and excluded from the updates.
    """
    n_m = parse_pattern(pattern)
    in_features = weight.shape[1]
    if n_m and (in_features % n_m[1] or block_size % n_m[1]):
        raise SlimlmError(
            f"sparsegpt: pattern {pattern} needs the input size ({in_features}) and block_size ({block_size}) to be multiples of {n_m[1]}",
            "pick an n:m pattern whose m divides both",
        )
    W, H = working_copies(weight, hessian)  # float32 (out, in), (in, in); dead inputs zeroed
    U = dampened_inverse_cholesky(H, dampening, "sparsegpt")  # (in, in)

    # The loop works on Wᵀ (in, out), so that a column of W is one contiguous row (as in GPTQ).
    Wt = W.t().contiguous()
    with single_threaded():  # one column at a time: small ops
        for start in range(0, in_features, block_size):
            end = min(start + block_size, in_features)
            W1 = Wt[start:end]  # (B, out), a view: updated in place
            U1 = U[start:end, start:end]  # (B, B)
            d = U1.diagonal().unsqueeze(1)  # (B, 1)
            err1 = torch.zeros_like(W1)  # (B, out): (w − q)/d of each column, for the lazy update
            if n_m is None:
                n_drop = round(end * sparsity) - round(start * sparsity)
                keep = row_mask_count((W1.pow(2) / d.pow(2)).t(), n_drop).t()  # (B, out)
            else:
                keep = torch.ones_like(W1, dtype=torch.bool)  # (B, out), filled group by group below
            for j in range(end - start):
                if n_m is not None and j % n_m[1] == 0:
                    group = slice(j, j + n_m[1])
                    keep[group] = n_m_mask((W1[group].pow(2) / d[group].pow(2)).t(), *n_m).t()
                w = W1[j]  # (out,)
                q = w * keep[j]
                err = err1[j]
                torch.sub(w, q, out=err).div_(d[j])
                W1[j + 1 :].addr_(U1[j, j + 1 :], err, alpha=-1)  # (B − j − 1, out): the columns after j
                W1[j] = q  # exactly q: pruned weights are exact zeros, not rounding residue
            Wt[end:].addmm_(U[start:end, end:].t(), err1, alpha=-1)  # lazy batch update of every later column
    return Wt.t().contiguous().to(weight.dtype)


def prune_sparsegpt_(linears: dict[str, nn.Module], config: SparseGPTConfig, stats: dict[str, InputStats]) -> None:
    for names, weight, hessian in stacked_by_input(linears, stats):  # q/k/v (gate/up) in one call: rows are independent
        pruned = sparsegpt_prune(
            weight, hessian, config.target_sparsity, config.pattern, config.block_size, config.dampening
        )
        for name, rows in zip(names, pruned.split([linear_weight(linears[name]).shape[0] for name in names])):
            set_linear_weight_(linears[name], rows.contiguous())


SPARSEGPT = Stage(config=SparseGPTConfig, apply=prune_sparsegpt_, needs=("hessian",), check=check_pattern)
