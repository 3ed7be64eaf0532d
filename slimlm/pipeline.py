"""Apply a recipe to a loaded model, stage by stage, through each method's `Stage` record (slimlm/stage.py).

Block-scope stages run per decoder block (through the calibration engine when they need statistics); model-scope
stages get the whole model. What every stage returned is kept in its `StageLog` for the manifest.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from slimlm.calibration.sequential import calibrate_sequentially
from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.models.adapters import block_linears, decoder_blocks, is_linear
from slimlm.progress import progress_bar
from slimlm.quantize.linear import QuantizedLinear
from slimlm.recipes import Recipe
from slimlm.recipes.registry import METHODS
from slimlm.stage import Base, Stage, StageConfig, StageContext, StageLog, call, details_of


def targeted_linears(model: nn.Module, config: StageConfig) -> list[dict[str, nn.Module]]:
    """Per decoder block, the linears this stage edits; refuses stages that would touch quantized layers."""
    per_block = []
    for index in range(len(decoder_blocks(model))):
        chosen = {name: m for name, m in block_linears(model, index).items() if config.selects(name)}
        for name, module in chosen.items():
            if isinstance(module, QuantizedLinear):
                raise SlimlmError(
                    f"stage '{config.method}' would edit {name}, which an earlier stage already quantized",
                    "put quantization stages last in the recipe, or narrow this stage with 'targets'",
                )
            if not is_linear(module):
                raise SlimlmError(
                    f"{name} is a {type(module).__name__}, not a linear layer", "narrow the stage with 'targets'"
                )
        per_block.append(chosen)
    if not any(per_block):
        raise SlimlmError(
            f"stage '{config.method}' matches no layer (targets={config.targets!r})",
            "fix the 'targets' regex; names look like 'model.layers.0.mlp.up_proj'",
        )
    return per_block


def recipe_needs(recipe: Recipe) -> set[str]:
    """What running `recipe` needs besides the model: "calibration" (windows for statistics) and/or "base" (a
    frozen copy of the model before the first stage, with its tokenizer)."""
    needs: set[str] = set()
    for config in recipe.stages:
        stage = METHODS[config.method]
        if stage.needs_calibration:
            needs.add("calibration")
        if "base" in stage.needs:
            needs.add("base")
    return needs


def check_recipe(model: nn.Module, recipe: Recipe, has_calibration: bool) -> None:
    """Every stage's preconditions on this model, before any weight changes (and before any slow evaluation).

    Stages after an architecture-changing stage are checked again when they run, on the changed model.
    """
    quantized: set[str] = set()
    quantization_seen = architecture_changed = False
    for config in recipe.stages:
        stage = METHODS[config.method]
        if stage.needs_calibration and not has_calibration:
            raise SlimlmError(
                f"method '{config.method}' needs calibration data", "pass calibration data (e.g. --calib-data default)"
            )
        if stage.changes_architecture and quantization_seen:
            raise SlimlmError(
                f"stage '{config.method}' changes the architecture after a quantization stage",
                "put structured pruning before quantization in the recipe",
            )
        if stage.scope == "model":
            if not architecture_changed:
                call(stage.check, model=model, config=config)
        elif not architecture_changed:
            for linears in targeted_linears(model, config):
                call(stage.check, linears=linears, config=config)
                if quantized & linears.keys():
                    name = sorted(quantized & linears.keys())[0]
                    raise SlimlmError(
                        f"stage '{config.method}' would edit {name}, which an earlier stage quantizes",
                        "put quantization stages last in the recipe, or narrow this stage with 'targets'",
                    )
                if stage.quantizes_with(config):
                    quantized |= linears.keys()
        quantization_seen = quantization_seen or (stage.quantizes_with(config) and stage.scope == "block")
        architecture_changed = architecture_changed or stage.changes_architecture


def _run_block_stage(model: nn.Module, stage: Stage, config: StageConfig, context: StageContext) -> int:
    per_block = targeted_linears(model, config)
    for linears in per_block:
        call(stage.check, linears=linears, config=config)
    offered = {"model": model, "calibration": context.calibration, "device": context.device}
    configs = call(stage.block_configs, **offered, config=config) if stage.block_configs else [config] * len(per_block)

    def apply(index: int, linears: dict[str, nn.Module], stats: dict) -> None:
        call(stage.apply, **offered, linears=linears, config=configs[index], stats=stats)

    if stage.statistics:
        calibrate_sequentially(
            model,
            context.calibration.input_ids,
            stage.statistics,
            apply,
            select=config.selects,
            device=context.device,
            description=config.method,
            true_sequential=stage.sequential_with(config),
        )
    else:
        with progress_bar(config.method, total=len(per_block)) as advance:
            for index, linears in enumerate(per_block):
                apply(index, linears, {})
                advance()
    return sum(len(block) for block in per_block)


def _run_model_stage(model: nn.Module, stage: Stage, config: StageConfig, context: StageContext) -> object:
    call(stage.check, model=model, config=config)
    ids = context.calibration.input_ids if context.calibration is not None else None
    return call(
        stage.apply,
        model=model,
        config=config,
        calibration=context.calibration,
        calibration_ids=ids,
        device=context.device,
        base=context.base,
    )


def compress_(
    model: nn.Module,
    recipe: Recipe,
    calibration: CalibrationSet | None = None,
    device: torch.device | None = None,
    tokenizer=None,
    checked: bool = False,
) -> list[StageLog]:
    """Run every stage of `recipe` on `model` in place; checks all stages' preconditions first (unless the caller
    did, `checked=True`).

    When a stage trains against the base (distillation), a copy of `model` as it is now is kept for it, with
    `tokenizer` (which such a stage needs to read its data)."""
    if not checked:
        check_recipe(model, recipe, calibration is not None)
    base = None
    if "base" in recipe_needs(recipe):
        if tokenizer is None:
            raise SlimlmError(
                "a distillation stage needs the model's tokenizer to read its training data",
                "pass tokenizer= to compress_",
            )
        base = Base(copy.deepcopy(model).eval().requires_grad_(False), tokenizer)
    context = StageContext(calibration, device, base)
    logs = []
    for config in recipe.stages:
        stage = METHODS[config.method]
        start = time.perf_counter()
        if stage.scope == "block":
            layers, details = _run_block_stage(model, stage, config, context), {}
        else:
            details = details_of(_run_model_stage(model, stage, config, context), stage.reports)
            layers = len(decoder_blocks(model))
        logs.append(StageLog(config.method, time.perf_counter() - start, layers, details))
    return logs
