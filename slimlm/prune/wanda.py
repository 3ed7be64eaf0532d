"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs").

Score each weight by |W_ij| · ‖X_j‖₂ — its magnitude times the norm of the input channel it reads over the
calibration tokens — and drop the lowest scores within each output row (or each n:m group). No weight update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.calibration.stats import InputStats
from slimlm.models.adapters import linear_weight, set_linear_weight_
from slimlm.prune.masks import SparsityConfig, check_pattern, mask_from_scores
from slimlm.stage import Stage


@dataclass(frozen=True)
class WandaConfig(SparsityConfig):
    """Prune by |weight| × input-activation norm, compared within each output row."""

    method: ClassVar[str] = "wanda"
    true_sequential: bool = True  # within a block, prune q/k/v, then o, then gate/up, then down, each scored on inputs from the already-pruned earlier ones


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂: weight (out, in), input_norm (in,) -> scores (out, in) float32."""
    return weight.abs().float() * input_norm.float().unsqueeze(0)


def wanda_prune(
    weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float, pattern: str = "unstructured"
) -> torch.Tensor:
    """weight (out, in), input_norm (in,) -> weight with the lowest |W|·‖X‖ entries zeroed."""
    return weight * mask_from_scores(wanda_scores(weight, input_norm), sparsity, pattern)


def prune_wanda_(linears: dict[str, nn.Module], config: WandaConfig, stats: dict[str, InputStats]) -> None:
    for name, module in linears.items():
        pruned = wanda_prune(linear_weight(module), stats[name].input_norm, config.target_sparsity, config.pattern)
        set_linear_weight_(module, pruned)


WANDA = Stage(config=WandaConfig, apply=prune_wanda_, needs=("input_norm",), check=check_pattern)
