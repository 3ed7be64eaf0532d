"""The explicit registry: method name -> config dataclass, applier, the statistics it needs, a pre-flight check.

Adding a method is one row here; nothing is discovered by walking packages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.data.calibration import CalibrationSet

from slimlm.errors import SlimlmError
from slimlm.models.adapters import linear_weight
from slimlm.prune.depth import DepthConfig, check_depth, prune_depth_
from slimlm.prune.magnitude import MagnitudeConfig, prune_magnitude_
from slimlm.prune.masks import SparsityConfig, parse_pattern
from slimlm.prune.owl import OWLConfig, owl_block_configs, prune_owl_
from slimlm.prune.sparsegpt import SparseGPTConfig, prune_sparsegpt_
from slimlm.prune.wanda import WandaConfig, prune_wanda_
from slimlm.prune.width import WidthConfig, check_width, prune_width_
from slimlm.quantize.rtn import RTNConfig, quantize_rtn_
from slimlm.recipes.config import StageConfig

# apply(model, linears of one block, config, stats) edits the block in place
Applier = Callable[[nn.Module, dict[str, nn.Module], StageConfig, dict], None]


@dataclass(frozen=True)
class Method:
    """A method that edits the linears of each decoder block (pruning masks, quantized weights)."""

    config: type[StageConfig]
    apply: Applier
    statistics: tuple[str, ...]  # what the calibration engine must collect; () = needs no data
    check: Callable[[dict[str, nn.Module], StageConfig], None]  # raises before anything is modified
    quantizes: bool  # replaces linears with QuantizedLinear: later stages may not edit those layers
    summary: str
    # Optional: one config per decoder block (e.g. OWL's layer-wise sparsity), computed before the stage runs.
    block_configs: Callable[[nn.Module, StageConfig, CalibrationSet | None, torch.device | None], list[StageConfig]] | None = None


@dataclass(frozen=True)
class ModelMethod:
    """A method that changes the architecture (drops blocks, narrows layers): it gets the whole model."""

    config: type[StageConfig]
    apply: Callable[[nn.Module, StageConfig, CalibrationSet | None, torch.device | None], None]
    needs_calibration: bool
    check: Callable[[nn.Module, StageConfig], None]  # raises before anything is modified
    summary: str


def _check_pattern(linears: dict[str, nn.Module], config: SparsityConfig) -> None:
    n_m = parse_pattern(config.pattern)
    for name, module in linears.items():
        in_features = linear_weight(module).shape[1]
        if n_m and in_features % n_m[1]:
            raise SlimlmError(f"{config.method}: pattern {config.pattern} needs input sizes divisible by {n_m[1]}, but {name} has {in_features}", "pick an n:m pattern whose m divides every layer's input size, or exclude the layer with 'targets'")


def _check_rtn(linears: dict[str, nn.Module], config: RTNConfig) -> None:
    for name, module in linears.items():
        in_features = linear_weight(module).shape[1]
        if config.group_size is not None and in_features % config.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            raise SlimlmError(
                f"rtn: group_size {config.group_size} does not divide the input size {in_features} of {name}",
                f"use a group_size that divides it (e.g. {', '.join(map(str, divisors)) or 'null for per-channel'})",
            )


METHODS: dict[str, Method | ModelMethod] = {
    "magnitude": Method(
        MagnitudeConfig,
        lambda model, linears, config, stats: prune_magnitude_(linears, config),
        (),
        _check_pattern,
        False,
        "prune the smallest |W| per output row, unstructured or n:m",
    ),
    "wanda": Method(
        WandaConfig,
        lambda model, linears, config, stats: prune_wanda_(linears, config, stats),
        ("input_norm",),
        _check_pattern,
        False,
        "prune the smallest |W|·‖X‖ per output row (Wanda), unstructured or n:m; needs calibration data",
    ),
    "sparsegpt": Method(
        SparseGPTConfig,
        lambda model, linears, config, stats: prune_sparsegpt_(linears, config, stats),
        ("hessian",),
        _check_pattern,
        False,
        "prune by OBS saliency and update the kept weights to compensate (SparseGPT), unstructured or n:m; needs calibration data",
    ),
    "owl": Method(
        OWLConfig,
        lambda model, linears, config, stats: prune_owl_(linears, config, stats),
        ("input_norm",),
        _check_pattern,
        False,
        "per-block sparsity from each block's share of outlier Wanda scores (OWL), then Wanda or magnitude; unstructured; needs calibration data",
        owl_block_configs,
    ),
    "rtn": Method(
        RTNConfig,
        lambda model, linears, config, stats: quantize_rtn_(model, linears, config),
        (),
        _check_rtn,
        True,
        "round-to-nearest integer weights, per channel or per group, stored packed",
    ),
    "depth": ModelMethod(
        DepthConfig,
        lambda model, config, calibration, device: prune_depth_(model, config, calibration.input_ids, device),
        True,
        check_depth,
        "remove whole decoder blocks, the lowest block influence first (ShortGPT); needs calibration data",
    ),
    "width": ModelMethod(
        WidthConfig,
        lambda model, config, calibration, device: prune_width_(model, config, calibration.input_ids, device),
        True,
        check_width,
        "remove the least active MLP channels and key/value head groups in every block (Minitron); needs calibration data",
    ),
}
