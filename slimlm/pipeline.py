"""Apply a recipe to a loaded model, stage by stage; the calibration engine runs for stages that need data."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.calibration.sequential import calibrate_sequentially
from slimlm.data.calibration import CalibrationSet
from slimlm.distill.stage import Base
from slimlm.errors import SlimlmError
from slimlm.models.adapters import block_linears, decoder_blocks, is_linear
from slimlm.progress import progress_bar
from slimlm.quantize.linear import QuantizedLinear
from slimlm.recipes import Recipe
from slimlm.recipes.config import StageConfig
from slimlm.recipes.registry import METHODS, Method, ModelMethod, TrainMethod


@dataclass(frozen=True)
class StageLog:
    method: str
    seconds: float
    layers: int


def targeted_linears(model: nn.Module, config: StageConfig) -> list[dict[str, nn.Module]]:
    """Per decoder block, the linears this stage edits; refuses stages that would touch quantized layers."""
    per_block = []
    for index in range(len(decoder_blocks(model))):
        chosen = {name: m for name, m in block_linears(model, index).items() if config.selects(name)}
        for name, module in chosen.items():
            if isinstance(module, QuantizedLinear):
                raise SlimlmError(f"stage '{config.method}' would edit {name}, which an earlier stage already quantized", "put quantization stages last in the recipe, or narrow this stage with 'targets'")
            if not is_linear(module):
                raise SlimlmError(f"{name} is a {type(module).__name__}, not a linear layer", "narrow the stage with 'targets'")
        per_block.append(chosen)
    if not any(per_block):
        raise SlimlmError(f"stage '{config.method}' matches no layer (targets={config.targets!r})", "fix the 'targets' regex; names look like 'model.layers.0.mlp.up_proj'")
    return per_block


def needs_calibration(method: Method | ModelMethod | TrainMethod) -> bool:
    if isinstance(method, TrainMethod):
        return False  # it reads its own training data (the stage's 'data' key)
    return method.needs_calibration if isinstance(method, ModelMethod) else bool(method.statistics)


def check_recipe(model: nn.Module, recipe: Recipe, has_calibration: bool) -> None:
    """Every stage's preconditions on this model, before any weight changes (and before any slow evaluation).

    Stages after an architecture-changing stage are checked again when they run, on the changed model.
    """
    quantized: set[str] = set()
    quantization_seen = architecture_changed = False
    for config in recipe.stages:
        method = METHODS[config.method]
        if needs_calibration(method) and not has_calibration:
            raise SlimlmError(f"method '{config.method}' needs calibration data", "pass calibration data (e.g. --calib-data default)")
        if isinstance(method, TrainMethod):  # trains what is there (quantized layers stay frozen)
            if not architecture_changed:
                method.check(model, config)
            continue
        if isinstance(method, ModelMethod) and not method.edits_weights:
            if not architecture_changed:
                method.check(model, config)
            continue
        if isinstance(method, ModelMethod):
            if quantization_seen:
                raise SlimlmError(f"stage '{config.method}' changes the architecture after a quantization stage", "put structured pruning before quantization in the recipe")
            if not architecture_changed:
                method.check(model, config)
            architecture_changed = True
            continue
        quantization_seen = quantization_seen or method.quantizes_with(config)
        if architecture_changed:
            continue
        for linears in targeted_linears(model, config):
            method.check(linears, config)
            if quantized & linears.keys():
                name = sorted(quantized & linears.keys())[0]
                raise SlimlmError(f"stage '{config.method}' would edit {name}, which an earlier stage quantizes", "put quantization stages last in the recipe, or narrow this stage with 'targets'")
            if method.quantizes_with(config):
                quantized |= linears.keys()


def _run_block_method(model: nn.Module, method: Method, config: StageConfig, calibration: CalibrationSet | None, device: torch.device | None) -> int:
    per_block = targeted_linears(model, config)
    for linears in per_block:
        method.check(linears, config)
    configs = method.block_configs(model, config, calibration, device) if method.block_configs else [config] * len(per_block)
    if method.statistics:
        calibrate_sequentially(
            model,
            calibration.input_ids,
            method.statistics,
            lambda index, linears, stats: method.apply(model, linears, configs[index], stats),
            select=config.selects,
            device=device,
            description=config.method,
            true_sequential=method.true_sequential(config),
        )
    else:
        with progress_bar(config.method, total=len(per_block)) as advance:
            for index, linears in enumerate(per_block):
                method.apply(model, linears, configs[index], {})
                advance()
    return sum(len(block) for block in per_block)


def compress_(
    model: nn.Module,
    recipe: Recipe,
    calibration: CalibrationSet | None = None,
    device: torch.device | None = None,
    tokenizer=None,
) -> list[StageLog]:
    """Run every stage of `recipe` on `model` in place; checks all stages' preconditions first.

    When a stage trains against the base (distillation), a copy of `model` as it is now is kept for it, with
    `tokenizer` (which such a stage needs to read its data)."""
    check_recipe(model, recipe, calibration is not None)
    base = None
    if any(isinstance(METHODS[config.method], TrainMethod) for config in recipe.stages):
        if tokenizer is None:
            raise SlimlmError("a distillation stage needs the model's tokenizer to read its training data", "pass tokenizer= to compress_")
        base = Base(copy.deepcopy(model).eval().requires_grad_(False), tokenizer)
    logs = []
    for config in recipe.stages:
        method = METHODS[config.method]
        start = time.perf_counter()
        if isinstance(method, TrainMethod):
            method.check(model, config)
            method.apply(model, base, config, device)
            layers = len(decoder_blocks(model))
        elif isinstance(method, ModelMethod):
            method.check(model, config)
            method.apply(model, config, calibration, device)
            layers = len(decoder_blocks(model))
        else:
            layers = _run_block_method(model, method, config, calibration, device)
        logs.append(StageLog(config.method, time.perf_counter() - start, layers))
    return logs


def linear_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights over all decoder-block linears (quantized ones after dequantization)."""
    zeros = total = 0
    for index in range(len(decoder_blocks(model))):
        for module in block_linears(model, index).values():
            weight = module.dequantized_weight() if isinstance(module, QuantizedLinear) else module.weight
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total
