"""Keep-masks from importance scores, shared by every unstructured and n:m pruning method.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Scores are compared within
each output row (the comparison group Wanda found works best for LLMs), or within each block of m
consecutive input weights for the n:m pattern that sparse tensor cores accelerate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import linear_weight
from slimlm.stage import StageConfig, check_range


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'n:m' -> (n, m): keep at most n non-zeros in every m consecutive weights."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise SlimlmError(
            f"sparsity pattern '{pattern}' is not understood",
            "use 'unstructured' or 'n:m' with 0 < n < m, e.g. '2:4' or '4:8'",
        )
    return int(match[1]), int(match[2])


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the `round(in * sparsity)` lowest-scoring weights of every output row. scores: (out, in)."""
    return row_mask_count(scores, round(scores.shape[1] * sparsity))


def row_mask_count(scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Drop the `n_drop` lowest-scoring weights of every output row. scores: (out, in)."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_drop:
        dropped = torch.topk(scores, n_drop, dim=1, largest=False).indices
        mask.scatter_(1, dropped, False)
    return mask


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring weights in every group of m consecutive input weights. scores: (out, in)."""
    out_features, in_features = scores.shape
    if in_features % m:
        raise SlimlmError(
            f"the n:m pattern needs the input dimension ({in_features}) to be a multiple of m={m}",
            "use a pattern whose m divides every pruned layer's input size",
        )
    groups = scores.reshape(out_features, in_features // m, m)
    kept = torch.topk(groups, n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, kept, True)
    return mask.reshape(out_features, in_features)


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    n_m = parse_pattern(pattern)
    return row_mask(scores, sparsity) if n_m is None else n_m_mask(scores, *n_m)


@dataclass(frozen=True)
class SparsityConfig(StageConfig):
    """Fields shared by unstructured / n:m pruning methods."""

    sparsity: float | None = (
        None  # share of weights removed per row (unstructured; default 0.5); implied by an n:m pattern
    )
    pattern: str = "unstructured"  # "unstructured" or "n:m" (keep n of every m consecutive weights), e.g. "2:4"

    def __post_init__(self) -> None:
        super().__post_init__()
        n_m = parse_pattern(self.pattern)
        if self.sparsity is not None:
            check_range(self, "sparsity", self.sparsity, 0.0, 1.0, upper_open=True)
            if n_m and abs(self.sparsity - (1 - n_m[0] / n_m[1])) > 1e-9:
                self.fail(
                    "sparsity",
                    f"{self.sparsity} contradicts pattern {self.pattern} (which means {1 - n_m[0] / n_m[1]:g})",
                    "drop 'sparsity' or make it match the pattern",
                )

    @property
    def target_sparsity(self) -> float:
        n_m = parse_pattern(self.pattern)
        if n_m:
            return 1 - n_m[0] / n_m[1]
        return 0.5 if self.sparsity is None else self.sparsity


def check_pattern(linears: dict[str, nn.Module], config: SparsityConfig) -> None:
    """Refuse an n:m pattern whose m does not divide a layer's input size, before anything is pruned."""
    n_m = parse_pattern(config.pattern)
    for name, module in linears.items():
        in_features = linear_weight(module).shape[1]
        if n_m and in_features % n_m[1]:
            raise SlimlmError(
                f"{config.method}: pattern {config.pattern} needs input sizes divisible by {n_m[1]}, but {name} has {in_features}",
                "pick an n:m pattern whose m divides every layer's input size, or exclude the layer with 'targets'",
            )
