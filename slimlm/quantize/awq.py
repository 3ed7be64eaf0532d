"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978).

A few input channels carry much larger activations than the rest, so the error of their weight columns costs
the most. AWQ scales those columns up before rounding (they round relatively finer) and divides the inputs by
the same scale, folded into whatever produces them (a norm, or a linear's rows: quantize/smoothing.py):

    y = x·Wᵀ = (x / s)·(W·diag(s))ᵀ ≈ (x / s)·Q(W·diag(s))ᵀ

1. Scale search, per group of linears reading one tensor: s = mean|x|^α, normalised to s / sqrt(max(s)·min(s)),
   for α = k/n, k = 0..n-1 (α = 0: s = 1, plain RTN, so by its loss the search never does worse than RTN);
   with `duo_scaling` also AutoAWQ's s = mean|x|^α / mean|ŵ|^(1−α) (ŵ: each weight over its group's max |w|),
   which also lowers the scale of channels whose weights are already large.
   The loss is the readers' output error, exact for a linear layer through its Hessian H = 2/N·XᵀX:
       ‖X·ΔWᵀ‖² = N/2 · tr(ΔW·H·ΔWᵀ),   ΔW = W − Q(W·diag(s))·diag(1/s)
   The reference code instead runs the enclosing module (attention, MLP) on the calibration tokens for every
   candidate; the Hessian loss needs no forward pass and reuses the statistics GPTQ uses, at the price of not
   seeing the error through the softmax or the MLP activation (q/k/v and gate/up errors are summed as they are).
2. Clipping search (the reference's auto_clip): per output row and group, shrink the group's [min, max] by a
   ratio from 1.0 down to 0.5 and keep the ratio with the smallest error of that group's share of the output,
   ΔW_g·H_gg·ΔW_gᵀ (H_gg: the group's diagonal block of H for the inputs x / s). Ratio 1.0 is RTN's range, so
   clipping never increases a group's error. q/k are not clipped, as in the reference: their error reaches the
   output through the softmax, which this loss does not see.
3. Round onto the shared integer grid (quantize/grid.py) with the clipped ranges, into QuantizedLinear.

Scaled groups: the projections behind each norm of a block (adapter.input_norms: q/k/v, gate/up, GPT-2's
c_attn / c_fc), and producer→reader pairs whose in-between step commutes with a positive per-channel scale
(`PRODUCER_PAIRS`). All statistics are collected once, on the block's original inputs; after folding s the
readers see x / s, whose Hessian is diag(1/s)·H·diag(1/s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.calibration.stats import InputStats
from slimlm.models.adapters import adapter_for, decoder_blocks, linear_weight
from slimlm.quantize.grid import (
    QuantGrid,
    clip_by_error,
    fake_quantize_in_ranges,
    group_ranges,
    shrink_ratios,
)
from slimlm.quantize.linear import replace_with_codes_
from slimlm.quantize.rtn import GridConfig, check_group_size, rtn_quantize
from slimlm.quantize.smoothing import (
    scale_linear_columns_,
    scale_linear_rows_,
    scale_norm_output_,
)
from slimlm.stage import Stage, check_range

MIN_CLIP_RATIO = 0.5  # the reference's max_shrink: a group's range is never cut below half
_MIN_SCALE = 1e-4  # floor of mean|x|^α, as in the reference (channels that never fire)
_NOT_CLIPPED = ("q_proj", "k_proj", "qkv_proj", "c_attn")  # produce queries/keys (fused ones too)


@dataclass(frozen=True)
class AWQConfig(GridConfig):
    """Activation-aware per-channel scaling, then clipped integer weights (AWQ); needs calibration data."""

    method: ClassVar[str] = "awq"

    symmetric: bool = False  # true: no zero point (AWQ is usually asymmetric)
    alpha_grid: int = 20  # candidates α = k/alpha_grid, k = 0..alpha_grid-1, for s = mean|x|^α
    clip: bool = True  # search a clipping ratio per output row and group (only when quantizing)
    clip_grid: int = 20  # clipping ratios, evenly from 1.0 down to 0.5
    duo_scaling: bool = True  # also search s = mean|x|^α / mean|ŵ|^(1-α) (AutoAWQ / llm-compressor's duo_scaling)
    quantize: bool = True  # false: only fold the scales, keep float weights for a later stage (AWQ + GPTQ)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "alpha_grid", self.alpha_grid, 1, 1000)
        check_range(self, "clip_grid", self.clip_grid, 1, 1000)

    @property
    def clip_ratios(self) -> tuple[float, ...]:
        return shrink_ratios(self.clip_grid, MIN_CLIP_RATIO) if self.clip else (1.0,)


# ---------------------------------------------------------------------------------------------- kernels


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(ΔW·H·ΔWᵀ) for ΔW (out, in) and H (in, in): 2/N·‖X·ΔWᵀ‖² when H = 2/N·XᵀX."""
    return (delta @ hessian).mul_(delta).sum()


def awq_scale_candidates(
    mean_abs: torch.Tensor, alpha_grid: int, weight_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """(alpha_grid, in): row k is s = mean|x|^α, α = k/alpha_grid, or with `weight_mean` (in,) (duo scaling)
    s = mean|x|^α / (weight_mean^(1−α) + 1e-4); floored at 1e-4, divided by sqrt(max(s)·min(s))."""
    alphas = torch.arange(alpha_grid, device=mean_abs.device, dtype=torch.float32).unsqueeze(1) / alpha_grid
    scales = mean_abs.float().unsqueeze(0).pow(alphas)
    if weight_mean is not None:
        scales = scales / (weight_mean.float().unsqueeze(0).pow(1 - alphas) + _MIN_SCALE)
    scales = scales.clamp(min=_MIN_SCALE)
    return scales / (scales.amax(dim=1, keepdim=True) * scales.amin(dim=1, keepdim=True)).sqrt()


def relative_weight_mean(weight: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """(in,): mean over output rows of |w| / max|w| of its row's group, AutoAWQ's weight term of duo scaling."""
    groups, _, _ = group_ranges(weight.float(), grid)  # (out, G, size)
    magnitude = groups.abs()
    return (magnitude / magnitude.amax(dim=-1, keepdim=True).clamp(min=1e-12)).reshape(weight.shape).mean(dim=0)


def scaled_quantization_error(
    weights: Sequence[torch.Tensor], hessian: torch.Tensor, scales: torch.Tensor, grid: QuantGrid
) -> torch.Tensor:
    """Σ over readers of tr(ΔW·H·ΔWᵀ), ΔW = W − Q(W·diag(s))·diag(1/s); weights (out_i, in), H (in, in), s (in,).

    Computed in the scaled domain: ΔW = D·diag(1/s) with D = W·diag(s) − Q(W·diag(s)), so the loss is
    tr(D·H_s·Dᵀ) with H_s = diag(1/s)·H·diag(1/s), the Hessian of the inputs x / s.
    """
    scaled = torch.cat([w.float() for w in weights]) * scales  # (Σ out_i, in): readers stack (rounding is per row)
    groups, low, high = group_ranges(scaled, grid)
    rounding_error = (
        fake_quantize_in_ranges(groups, low, high, grid).sub_(groups).reshape(scaled.shape)
    )  # −D: the loss is even
    return output_error(rounding_error, hessian.float() / torch.outer(scales, scales))


def awq_search_scale(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    mean_abs: torch.Tensor,
    grid: QuantGrid,
    alpha_grid: int,
    duo_scaling: bool = False,
) -> torch.Tensor:
    """The candidate s (in,) with the smallest output error of all readers; ties go to the smaller α (RTN first),
    and to activation-only scales over duo ones."""
    weight = torch.cat([w.float() for w in weights])  # (Σ out_i, in): rounding is per row, so readers stack
    candidates = awq_scale_candidates(mean_abs, alpha_grid)
    if duo_scaling:
        candidates = torch.cat(
            [candidates, awq_scale_candidates(mean_abs, alpha_grid, relative_weight_mean(weight, grid))]
        )
    losses = torch.stack([scaled_quantization_error([weight], hessian, s, grid) for s in candidates])
    return candidates[int(torch.argmin(losses))]  # argmin returns the first of equal minima


def _diagonal_blocks(hessian: torch.Tensor, groups: int) -> torch.Tensor:
    """(in, in) -> (groups, size, size): H_gg, the Hessian of each group's own input channels."""
    size = hessian.shape[0] // groups
    return hessian.float().reshape(groups, size, groups, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def awq_clip_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, grid: QuantGrid, ratios: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per output row and group, clip then round with the ratio of smallest ΔW_g·H_gg·ΔW_gᵀ (ΔW = W − Ŵ).

    Clipping by r clamps a group to r·[min(w, 0), max(w, 0)] before RTN. weight (out, in), hessian (in, in) of
    the inputs the weight reads. Returns codes int8 (out, in), scale fp16 (out, groups), zero_point int8
    (out, groups) | None. Ties keep the earlier ratio; ratios = (1.0,) is RTN.
    """
    blocks = _diagonal_blocks(hessian, grid.group_count(weight.shape[1]))  # (G, size, size)
    return rtn_quantize(clip_by_error(weight, grid, ratios, blocks), grid)


# ---------------------------------------------------------------------------------------------- applier

# Per architecture, (producer, reader, step): the reader reads the producer's *last* reader.in_features output
# rows (v_proj entirely; the value third of a fused qkv / c_attn; the up half of Phi-3's gate_up) through a step
# that commutes with a positive per-channel scale. "attention": the weighted sum over values, only when every
# query head has its own value head (with GQA the reader's channels repeat the producer's: skipped, as in
# AutoAWQ); "gate": act(gate)·up; "relu": ReLU (GPT-2's GELU does not commute, so c_fc → c_proj is absent).
_LLAMA_PAIRS = (("self_attn.v_proj", "self_attn.o_proj", "attention"), ("mlp.up_proj", "mlp.down_proj", "gate"))
PRODUCER_PAIRS: dict[str, tuple[tuple[str, str, str], ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), _LLAMA_PAIRS),
    "phi3": (("self_attn.qkv_proj", "self_attn.o_proj", "attention"), ("mlp.gate_up_proj", "mlp.down_proj", "gate")),
    "gpt2": (("attn.c_attn", "attn.c_proj", "attention"),),
    "opt": (("self_attn.v_proj", "self_attn.out_proj", "attention"), ("fc1", "fc2", "relu")),
}


@dataclass(frozen=True)
class ScaleGroup:
    """Linears reading one tensor, and where its division by s folds: a norm, or a producer's last rows."""

    readers: tuple[str, ...]  # fully-qualified names
    norm: nn.Module | None = None
    producer: nn.Module | None = None

    def fold_(self, readers: dict[str, nn.Module], scales: torch.Tensor) -> None:
        if self.norm is not None:
            scale_norm_output_(self.norm, scales)
        else:
            rows = linear_weight(self.producer).shape[0]
            scale_linear_rows_(self.producer, scales, slice(rows - scales.shape[0], rows))
        for name in self.readers:
            scale_linear_columns_(readers[name], scales)


def _step_commutes(config, step: str) -> bool:
    if step == "attention":
        heads = config.num_attention_heads
        return (getattr(config, "num_key_value_heads", None) or heads) == heads
    if step == "relu":
        return getattr(config, "activation_function", None) == "relu"
    return step == "gate"


def scale_groups(model: nn.Module, linears: dict[str, nn.Module]) -> list[ScaleGroup]:
    """The groups of one block whose linears are all in `linears` (a stage's targets may leave some out)."""
    adapter = adapter_for(model)
    index = int(next(iter(linears)).removeprefix(f"{adapter.blocks}.").split(".")[0])
    block = decoder_blocks(model)[index]
    prefix = f"{adapter.blocks}.{index}."
    groups = [
        ScaleGroup(tuple(prefix + r for r in readers), norm=block.get_submodule(norm))
        for norm, readers in adapter.input_norms
    ]
    for producer, reader, step in PRODUCER_PAIRS.get(model.config.model_type, ()):
        if prefix + producer in linears and _step_commutes(model.config, step):
            groups.append(ScaleGroup((prefix + reader,), producer=linears[prefix + producer]))
    return [group for group in groups if set(group.readers) <= linears.keys()]


@torch.no_grad()
def quantize_awq_(
    model: nn.Module, linears: dict[str, nn.Module], config: AWQConfig, stats: dict[str, InputStats]
) -> None:
    """AWQ on the decoder block that `linears` belong to: search and fold each group's s, then clip and round.

    `stats` (hessian, input_norm) were collected on the block's original inputs. With `quantize: false` the
    block keeps float weights (scaled: the same function) for a following stage.
    """
    input_scales: dict[str, torch.Tensor] = {}
    for group in scale_groups(model, linears):
        first = stats[group.readers[0]]
        weights = [linear_weight(linears[name]) for name in group.readers]
        scales = awq_search_scale(
            weights, first.hessian, first.mean_abs, config.grid, config.alpha_grid, config.duo_scaling
        )
        group.fold_(linears, scales)
        input_scales.update(dict.fromkeys(group.readers, scales))
    if not config.quantize:
        return
    for name, module in linears.items():
        hessian = stats[name].hessian
        if name in input_scales:  # the inputs are now x / s
            hessian = hessian / torch.outer(input_scales[name], input_scales[name])
        weight = linear_weight(module).detach()
        ratios = (1.0,) if name.rpartition(".")[2] in _NOT_CLIPPED else config.clip_ratios
        codes, scale, zero_point = awq_clip_quantize(weight, hessian, config.grid, ratios)
        replace_with_codes_(model, name, module, codes, scale, zero_point, config.grid)


def awq_quantizes(config: AWQConfig) -> bool:
    """With `quantize: false` AWQ only folds its scales (for a GPTQ stage after it)."""
    return config.quantize


AWQ = Stage(
    config=AWQConfig,
    apply=quantize_awq_,
    needs=("hessian", "input_norm"),
    check=check_group_size,
    quantizes=awq_quantizes,
)
