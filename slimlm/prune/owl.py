"""OWL (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to
High Sparsity").

Decoder blocks whose Wanda scores have more outliers matter more, so they get a lower sparsity, the others a
higher one, with the same mean:

1. On the dense model, block l's outlier ratio D_l is the share of the Wanda scores |W_ij|·‖X_j‖ of all its
   targeted linears (pooled) that exceed M × their mean (M = `outlier_threshold`, the paper uses 5).
2. s_l = S − λ · (D_l − mean D) / max_k |D_k − mean D|   (S = target sparsity, λ = `max_deviation`)
   so mean(s_l) = S exactly, every s_l lies in [S − λ, S + λ], and more outliers mean lower sparsity.
3. Block l is pruned by the base method (Wanda or magnitude) at sparsity s_l.

Step 2 keeps the paper's stated constraint s_l ∈ [S − λ, S + λ]. The reference code instead min-max scales D onto
[0, 2λ] and re-centres it on S, which spans exactly 2λ but can put a block up to 2λ from S when the ratios are
skewed; both agree whenever the largest and smallest ratio sit equally far from the mean (e.g. two blocks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.calibration.sequential import calibrate_sequentially
from slimlm.calibration.stats import InputStats
from slimlm.data.calibration import CalibrationSet
from slimlm.models.adapters import decoder_blocks, linear_weight
from slimlm.prune.magnitude import MagnitudeConfig, prune_magnitude_
from slimlm.prune.masks import SparsityConfig, check_pattern
from slimlm.prune.wanda import WandaConfig, prune_wanda_, wanda_scores
from slimlm.stage import Stage, check_range

BASE_CONFIGS: dict[str, type[SparsityConfig]] = {"wanda": WandaConfig, "magnitude": MagnitudeConfig}


@dataclass(frozen=True)
class OWLConfig(SparsityConfig):
    """Give each decoder block its own sparsity from its share of outlier Wanda scores (OWL); unstructured only."""

    method: ClassVar[str] = "owl"
    base: str = "wanda"  # the method that prunes each block at its own sparsity: "wanda" or "magnitude"
    outlier_threshold: float = 5.0  # the paper's M: a score is an outlier above M × its block's mean score
    max_deviation: float = 0.08  # the paper's λ: every block's sparsity stays within target ± max_deviation

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern != "unstructured":
            self.fail(
                "pattern",
                f"is {self.pattern}, but OWL gives each block a different sparsity, which an n:m pattern fixes",
                "use pattern: unstructured (for n:m, use wanda or sparsegpt directly)",
            )
        if self.base not in BASE_CONFIGS:
            self.fail(
                "base",
                f"is '{self.base}'; OWL prunes with {' or '.join(BASE_CONFIGS)}",
                "set base: wanda (the paper's choice) or base: magnitude",
            )
        check_range(self, "outlier_threshold", self.outlier_threshold, 1.0, math.inf)
        check_range(self, "max_deviation", self.max_deviation, 0.0, 1.0, upper_open=True)
        low, high = self.target_sparsity - self.max_deviation, self.target_sparsity + self.max_deviation
        if low < 0 or high >= 1:
            self.fail(
                "max_deviation",
                f"{self.max_deviation} lets block sparsities reach [{low:g}, {high:g}], outside [0, 1)",
                "lower 'max_deviation' or move 'sparsity' away from 0 and 1",
            )


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Share of all entries of `scores` (any shapes, pooled) greater than `threshold` × their pooled mean."""
    pooled = torch.cat([s.flatten().float() for s in scores])  # (Σ numel,)
    return float((pooled > threshold * pooled.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], target: float, max_deviation: float) -> list[float]:
    """Per-block sparsities s_l = target − λ·(D_l − mean D)/max|D − mean D|: mean target, within target ± λ."""
    mean = sum(ratios) / len(ratios)
    deviations = [ratio - mean for ratio in ratios]
    widest = max(abs(deviation) for deviation in deviations)
    if widest == 0:
        return [target] * len(ratios)
    return [target - max_deviation * deviation / widest for deviation in deviations]


def owl_block_configs(
    model: nn.Module, config: OWLConfig, calibration: CalibrationSet, device: torch.device | None
) -> list[SparsityConfig]:
    """One base-method config per decoder block, at that block's OWL sparsity.

    Runs a calibration pass over the dense model that only records each block's outlier ratio; a block with no
    targeted linear keeps the target sparsity (it prunes nothing anyway) and takes no part in the allocation.
    """
    ratios: dict[int, float] = {}

    def record(index: int, linears: dict[str, nn.Module], stats: dict[str, InputStats]) -> None:
        if linears:
            scores = [
                wanda_scores(linear_weight(module), stats[name].input_norm) for name, module in linears.items()
            ]  # each (out, in)
            ratios[index] = outlier_ratio(scores, config.outlier_threshold)

    calibrate_sequentially(
        model,
        calibration.input_ids,
        ("input_norm",),
        record,
        select=config.selects,
        device=device,
        description="owl: outlier ratios",
    )
    allocated = dict(
        zip(ratios, owl_sparsities(list(ratios.values()), config.target_sparsity, config.max_deviation), strict=True)
    )
    base = BASE_CONFIGS[config.base]
    return [
        base(targets=config.targets, sparsity=allocated.get(index, config.target_sparsity))
        for index in range(len(decoder_blocks(model)))
    ]


def prune_owl_(linears: dict[str, nn.Module], config: SparsityConfig, stats: dict[str, InputStats]) -> None:
    """Prune one block with the config `owl_configs` made for it (the base method at the block's sparsity)."""
    if isinstance(config, WandaConfig):
        prune_wanda_(linears, config, stats)
    else:
        prune_magnitude_(linears, config)


OWL = Stage(
    config=OWLConfig,
    apply=prune_owl_,
    needs=("input_norm",),
    check=check_pattern,
    block_configs=owl_block_configs,
    true_sequential=True,  # as the wanda method's default
)
