"""The explicit registry: method name -> config dataclass, applier, the statistics it needs, a pre-flight check.

Adding a method is one row here; nothing is discovered by walking packages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.data.calibration import CalibrationSet
from slimlm.distill.stage import Base, DistillConfig, check_distill, distill_
from slimlm.errors import SlimlmError
from slimlm.models.adapters import linear_weight
from slimlm.prune.depth import DepthConfig, check_depth, prune_depth_
from slimlm.prune.magnitude import MagnitudeConfig, prune_magnitude_
from slimlm.prune.masks import SparsityConfig, parse_pattern
from slimlm.prune.owl import OWLConfig, owl_block_configs, prune_owl_
from slimlm.prune.sparsegpt import SparseGPTConfig, prune_sparsegpt_
from slimlm.prune.wanda import WandaConfig, prune_wanda_
from slimlm.prune.width import WidthConfig, check_width, prune_width_
from slimlm.quantize.awq import AWQConfig, quantize_awq_
from slimlm.quantize.gptq import GPTQConfig, quantize_gptq_
from slimlm.quantize.kv_cache import KVCacheConfig, check_kv_cache, set_kv_cache_
from slimlm.quantize.qat import QATConfig, check_qat, qat_
from slimlm.quantize.rotation import RotateConfig, apply_rotation_, check_rotate
from slimlm.quantize.rtn import RTNConfig, quantize_rtn_
from slimlm.quantize.smoothquant import SmoothQuantConfig, smooth_quant_
from slimlm.quantize.w8a8 import (
    GPTQW8A8Config,
    W8A8Config,
    quantize_gptq_w8a8_,
    quantize_w8a8_,
)
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
    quantizes: bool | Callable[[StageConfig], bool]  # replaces linears with QuantizedLinear (later stages may not edit
    # those layers); a callable decides per config (AWQ with quantize: false only folds scales)
    summary: str
    # Optional: one config per decoder block (e.g. OWL's layer-wise sparsity), computed before the stage runs.
    block_configs: Callable[[nn.Module, StageConfig, CalibrationSet | None, torch.device | None], list[StageConfig]] | None = None
    # Whether the engine compresses each block's linears group by group in execution order, the statistics of
    # later groups taken after earlier ones are compressed (GPTQ's true sequential); one block forward when the
    # windows fit in memory at once (calibration/sequential.py), else partial extra forwards.
    true_sequential: Callable[[StageConfig], bool] = lambda config: False

    def quantizes_with(self, config: StageConfig) -> bool:
        return self.quantizes(config) if callable(self.quantizes) else self.quantizes


@dataclass(frozen=True)
class ModelMethod:
    """A method that changes the architecture (drops blocks, narrows layers): it gets the whole model."""

    config: type[StageConfig]
    apply: Callable[[nn.Module, StageConfig, CalibrationSet | None, torch.device | None], None]
    needs_calibration: bool
    check: Callable[[nn.Module, StageConfig], None]  # raises before anything is modified
    summary: str
    edits_weights: bool = True  # False: only records a setting on the model (kv-cache), so it may follow quantization


@dataclass(frozen=True)
class TrainMethod:
    """A method that trains the model against the base the recipe started from (distillation, recovery).

    The pipeline keeps a copy of the model as it was before the first stage (`Base`, with the tokenizer) and passes it."""

    config: type[StageConfig]
    apply: Callable[[nn.Module, Base, StageConfig, torch.device | None], object]
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
                f"{config.method}: group_size {config.group_size} does not divide the input size {in_features} of {name}",
                f"use a group_size that divides it (e.g. {', '.join(map(str, divisors)) or 'null for per-channel'})",
            )


METHODS: dict[str, Method | ModelMethod | TrainMethod] = {
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
        true_sequential=lambda config: config.true_sequential,
    ),
    "sparsegpt": Method(
        SparseGPTConfig,
        lambda model, linears, config, stats: prune_sparsegpt_(linears, config, stats),
        ("hessian",),
        _check_pattern,
        False,
        "prune by OBS saliency and update the kept weights to compensate (SparseGPT), unstructured or n:m; needs calibration data",
        true_sequential=lambda config: config.true_sequential,
    ),
    "owl": Method(
        OWLConfig,
        lambda model, linears, config, stats: prune_owl_(linears, config, stats),
        ("input_norm",),
        _check_pattern,
        False,
        "per-block sparsity from each block's share of outlier Wanda scores (OWL), then Wanda or magnitude; unstructured; needs calibration data",
        owl_block_configs,
        true_sequential=lambda config: True,  # as the wanda method's default
    ),
    "rtn": Method(
        RTNConfig,
        lambda model, linears, config, stats: quantize_rtn_(model, linears, config),
        (),
        _check_rtn,
        True,
        "round-to-nearest integer weights, per channel or per group, stored packed",
    ),
    "gptq": Method(
        GPTQConfig,
        quantize_gptq_,
        ("hessian",),
        _check_rtn,
        True,
        "integer weights chosen column by column, later columns updated to cancel the output error (GPTQ), per channel or per group, stored packed; needs calibration data",
        true_sequential=lambda config: config.true_sequential,
    ),
    "awq": Method(
        AWQConfig,
        quantize_awq_,
        ("hessian", "input_norm"),
        _check_rtn,
        lambda config: config.quantize,
        "activation-aware per-channel scales folded into norms / producer rows, clipped ranges, then integer weights (AWQ); quantize: false only folds the scales (AWQ + GPTQ); needs calibration data",
    ),
    "smoothquant": Method(
        SmoothQuantConfig,
        smooth_quant_,
        ("input_absmax",),
        lambda linears, config: None,
        False,
        "move activation outliers into the weights with per-channel scales folded into the norms (SmoothQuant); function unchanged; run before w8a8; needs calibration data",
    ),
    "w8a8": Method(
        W8A8Config,
        lambda model, linears, config, stats: quantize_w8a8_(model, linears, config),
        (),
        lambda linears, config: None,
        True,
        "int8 weights per output channel (round to nearest) and int8 activations per token at run time (W8A8); int8_matmul: real int8 matmuls on CPU",
    ),
    "gptq-w8a8": Method(
        GPTQW8A8Config,
        quantize_gptq_w8a8_,
        ("hessian",),
        lambda linears, config: None,
        True,
        "W8A8 with the int8 weights chosen by GPTQ (llm-compressor's W8A8 recipe after SmoothQuant); needs calibration data",
        true_sequential=lambda config: config.true_sequential,
    ),
    "depth": ModelMethod(
        DepthConfig,
        lambda model, config, calibration, device: prune_depth_(model, config, calibration.input_ids, device),
        True,
        check_depth,
        "remove whole decoder blocks, the lowest block influence first (ShortGPT); needs calibration data",
    ),
    "rotate": ModelMethod(
        RotateConfig,
        lambda model, config, calibration, device: apply_rotation_(model, config),
        False,
        check_rotate,
        "rotate the residual stream by a random Hadamard matrix, norm gains fused (QuaRot): same function, fewer outliers for the quantizer that follows",
    ),
    "width": ModelMethod(
        WidthConfig,
        lambda model, config, calibration, device: prune_width_(model, config, calibration.input_ids, device),
        True,
        check_width,
        "remove the least active MLP channels and key/value head groups in every block (Minitron); needs calibration data",
    ),
    "distill": TrainMethod(
        DistillConfig,
        lambda model, base, config, device: distill_(model, base, config, device),
        check_distill,
        "train the model to match the recipe's base model (KD: forward/reverse KL, GKD's JSD, TV, ULD; optional hidden-state and CE terms), fully or with LoRA merged back; keeps pruned zeros",
    ),
    "qat": TrainMethod(
        QATConfig,
        qat_,
        check_qat,
        "quantization-aware training: fake-quantized weights (straight-through rounding) and learned per-group scales (LSQ), distilled from the recipe's base (LLM-QAT; samples: teacher is data-free); starts from RTN qparams or refines an earlier rtn/gptq/awq result; stored packed",
    ),
    "kv-cache": ModelMethod(
        KVCacheConfig,
        lambda model, config, calibration, device: set_kv_cache_(model, config),
        False,
        check_kv_cache,
        "quantize the KV cache at inference, keys per channel and values per token, newest tokens in full precision (KIVI); weights untouched",
        edits_weights=False,
    ),
}
