"""Magnitude pruning: zero the smallest |W| per output row, or keep the n largest of every m.

The baseline every calibration-based method must beat; it needs no data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.models.adapters import linear_weight, set_linear_weight_
from slimlm.prune.masks import SparsityConfig, check_pattern, mask_from_scores
from slimlm.stage import Stage


@dataclass(frozen=True)
class MagnitudeConfig(SparsityConfig):
    """Prune by weight magnitude, compared within each output row."""

    method: ClassVar[str] = "magnitude"


def magnitude_prune(weight: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """Return `weight` (out, in) with its lowest-|w| entries zeroed per row or per n:m group."""
    mask = mask_from_scores(weight.abs().float(), sparsity, pattern)
    return weight * mask


def prune_magnitude_(linears: dict[str, nn.Module], config: MagnitudeConfig) -> None:
    for module in linears.values():
        weight = linear_weight(module)
        set_linear_weight_(module, magnitude_prune(weight, config.target_sparsity, config.pattern))


MAGNITUDE = Stage(config=MagnitudeConfig, apply=prune_magnitude_, check=check_pattern)
