"""Round-to-nearest weight quantization: min/max scales per channel or group, no data needed.

The baseline GPTQ/AWQ improve on; also the final rounding step those methods share (`quantize/grid.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import linear_weight
from slimlm.quantize.grid import QuantGrid, choose_qparams, quantize_with
from slimlm.quantize.linear import replace_with_codes_
from slimlm.stage import Stage, StageConfig, check_range


@dataclass(frozen=True)
class GridConfig(StageConfig):
    """The integer weight grid every weight quantizer shares (rtn, gptq, awq, qat): its fields and their checks."""

    bits: int = 4  # 2..8
    group_size: int | None = 128  # input channels per scale; null for one scale per output channel
    symmetric: bool = True  # false: an integer zero point per group as well

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "bits", self.bits, 2, 8)
        if self.group_size is not None:
            check_range(self, "group_size", self.group_size, 1, 2**20)

    @property
    def grid(self) -> QuantGrid:
        return QuantGrid(self.bits, self.group_size, self.symmetric)


@dataclass(frozen=True)
class RTNConfig(GridConfig):
    """Round-to-nearest integer weights with min/max scales."""

    method: ClassVar[str] = "rtn"


def rtn_quantize(weight: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight (out, in) -> (codes int8 (out, in), scale fp16 (out, groups), zero_point int8 (out, groups) | None)."""
    scale, zero_point = choose_qparams(weight, grid)
    return quantize_with(weight, scale, zero_point, grid), scale, zero_point


def quantize_rtn_(model: nn.Module, linears: dict[str, nn.Module], config: RTNConfig) -> None:
    for name, module in linears.items():
        codes, scale, zero_point = rtn_quantize(linear_weight(module).detach(), config.grid)
        replace_with_codes_(model, name, module, codes, scale, zero_point, config.grid)


def check_group_size(linears: dict[str, nn.Module], config: StageConfig) -> None:
    """Refuse a group size that does not divide a layer's input size, before anything is quantized."""
    for name, module in linears.items():
        in_features = linear_weight(module).shape[1]
        if config.group_size is not None and in_features % config.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            raise SlimlmError(
                f"{config.method}: group_size {config.group_size} does not divide the input size {in_features} of {name}",
                f"use a group_size that divides it (e.g. {', '.join(map(str, divisors)) or 'null for per-channel'})",
            )


RTN = Stage(config=RTNConfig, apply=quantize_rtn_, check=check_group_size, quantizes=True)
