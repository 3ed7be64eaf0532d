"""SmoothQuant (Xiao et al., 2023, arXiv:2211.10438): migrate activation outliers into the weights.

A few input channels of a linear layer carry activations far larger than the rest, so a per-token int8 grid
spends its range on them. With a per-input-channel scale s (in,), x·Wᵀ = (x / s)·(W·diag(s))ᵀ: dividing the
activations and multiplying the weight columns by

    s_j = max|X_j|^α / max|W_j|^(1−α)          (max|W_j| over the rows of every reader of x)

balances the two ranges (α = 0.5 splits the difficulty evenly). The division of x is folded into the norm that
produces it (`quantize/smoothing.py`), so the smoothed model computes the same function in float and nothing
extra runs at inference; the `w8a8` stage then quantizes the smoothed weights and activations.

Smoothed here: each norm group of the architecture's adapter (`input_norms`: the norm before attention and
its q/k/v readers, the norm before the MLP and its gate/up or fc1 readers), as in the paper and
llm-compressor's default mappings. Outputs of attention and the MLP's inner activations are not smoothed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.calibration.stats import InputStats
from slimlm.errors import SlimlmError
from slimlm.models.adapters import adapter_for, decoder_blocks, linear_weight
from slimlm.quantize.smoothing import scale_linear_columns_, scale_norm_output_
from slimlm.stage import Stage, StageConfig, check_range

MIN_RANGE = 1e-5  # the reference code's clamp: a dead channel must not give a zero or infinite scale


@dataclass(frozen=True)
class SmoothQuantConfig(StageConfig):
    """Fold per-channel scales that move activation outliers into the weights (function unchanged in float)."""

    method: ClassVar[str] = "smoothquant"

    alpha: float = (
        0.5  # migration strength in [0, 1]: 0 leaves activations as they are, 1 moves all their range into the weights
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "alpha", self.alpha, 0.0, 1.0)


def smoothing_scales(input_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) = max|X_j|^α / max|W_j|^(1−α), clamped as in the reference code.

    input_absmax: (in,) max |x_j| over the calibration tokens; weights: the readers' (out_i, in) weights.
    """
    weight_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # (in,)
    weight_absmax = weight_absmax.clamp(min=MIN_RANGE)
    scales = input_absmax.float().to(weight_absmax.device).pow(alpha) / weight_absmax.pow(1 - alpha)
    return scales.clamp(min=MIN_RANGE)


def _block_index(model: nn.Module, name: str) -> int:
    """Index of the decoder block a fully-qualified linear name belongs to ('model.layers.3.mlp.up_proj' -> 3)."""
    return int(name.removeprefix(adapter_for(model).blocks + ".").split(".")[0])


@torch.no_grad()
def smooth_quant_(
    model: nn.Module, linears: dict[str, nn.Module], config: SmoothQuantConfig, stats: dict[str, InputStats]
) -> None:
    """Smooth every norm group of one decoder block whose readers this stage targets (`linears` from one block)."""
    if not linears:  # 'targets' selects nothing in this block
        return
    adapter = adapter_for(model)
    index = _block_index(model, next(iter(linears)))
    block = decoder_blocks(model)[index]
    prefix = f"{adapter.blocks}.{index}."
    for norm_path, readers in adapter.input_norms:
        names = [prefix + reader for reader in readers]
        chosen = [name for name in names if name in linears]
        if not chosen:
            continue
        if len(chosen) != len(names):
            missing = min(set(names) - set(chosen))
            raise SlimlmError(
                f"smoothquant: 'targets' selects {chosen[0]} but not {missing}, which reads the same norm ({prefix}{norm_path})",
                "target all readers of a norm together (or none), e.g. drop 'targets' or use 'self_attn' / 'mlp'",
            )
        absmax = torch.stack([stats[name].input_absmax for name in names]).amax(dim=0)  # they all read one tensor
        scales = smoothing_scales(absmax, [linear_weight(linears[name]) for name in names], config.alpha)
        scale_norm_output_(block.get_submodule(norm_path), scales)
        for name in names:
            scale_linear_columns_(linears[name], scales)


SMOOTHQUANT = Stage(config=SmoothQuantConfig, apply=smooth_quant_, needs=("input_absmax",))
