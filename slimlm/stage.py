"""The stage contract, at the bottom of the house: every method file builds on this module and nothing above it.

A stage is one step of a recipe. Its config is a small frozen dataclass derived from `StageConfig` (validated when
built); its `Stage` record says what it works on (`scope`), what it needs, how it is checked before anything
changes, how it is applied and whether it leaves quantized layers behind. The pipeline runs every stage through
that record alone; what an applier returns (a loss curve, a rotation summary, the removed blocks) is its
`StageLog.details` and goes into the saved manifest.

Appliers keep their natural signatures (`prune_wanda_(linears, config, stats)`, `prune_depth_(model, config,
calibration_ids, device)`), because users and tests call them directly: the pipeline passes each the arguments its
signature names, out of those listed in `OFFERED` (see `call`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimlm.data.calibration import CalibrationSet


@dataclass(frozen=True)
class StageConfig:
    """Fields shared by all stages."""

    method: ClassVar[str] = ""
    targets: str | None = None  # regex over fully-qualified linear names (e.g. "mlp"); default: every block linear
    exclude: str | None = None  # regex of linear names this stage leaves alone, even when 'targets' matches them

    def __post_init__(self) -> None:
        for key in ("targets", "exclude"):
            pattern = getattr(self, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    self.fail(
                        key,
                        f"is not a valid regular expression ({err})",
                        "write a Python regex such as 'mlp\\.(up|gate)_proj'",
                    )

    def selects(self, name: str) -> bool:
        """Whether this stage edits the linear with fully-qualified `name`: matched by 'targets', not by 'exclude'."""
        included = self.targets is None or re.search(self.targets, name) is not None
        return included and (self.exclude is None or re.search(self.exclude, name) is None)

    def fail(self, key: str, problem: str, fix: str) -> None:
        raise SlimlmError(f"{self.method}: '{key}' {problem}", fix)


def check_range(
    config: StageConfig,
    key: str,
    value: float,
    low: float,
    high: float,
    upper_open: bool = False,
) -> None:
    """Refuse a value outside [low, high] (or [low, high)) with a message naming the stage, key and range."""
    too_high = value >= high if upper_open else value > high
    if math.isnan(value) or value < low or too_high:
        closing = ")" if upper_open else "]"
        config.fail(key, f"is {value}, outside [{low}, {high}{closing}", f"set '{key}' within [{low}, {high}{closing}")


def check_dampening(config: StageConfig) -> None:
    """The Hessian dampening of GPTQ / SparseGPT (a share of the mean diagonal added to it): within (0, 1]."""
    value = config.dampening
    if math.isnan(value) or not 0 < value <= 1:
        config.fail("dampening", f"is {value}, outside (0, 1]", "set 'dampening' within (0, 1]; the paper uses 0.01")


@dataclass(frozen=True)
class Base:
    """The model as it was before the recipe's first stage (frozen, eval mode) and its tokenizer, for stages that
    train against it (distillation, QAT)."""

    model: nn.Module
    tokenizer: object


@dataclass(frozen=True)
class StageContext:
    """What a recipe run offers its stages besides the model: calibration windows, the device, the base model."""

    calibration: CalibrationSet | None = None
    device: torch.device | None = None
    base: Base | None = None


# The arguments an applier or check may name in its signature (see `call`):
#   model            the model being compressed
#   linears          {name: module} of one decoder block (block scope)
#   config           this stage's config (per block, when `block_configs` gives one)
#   stats            {name: InputStats} of those linears (block scope, when `needs` names statistics)
#   calibration      the CalibrationSet;  calibration_ids: its (N, T) token ids
#   device           where to compute;    base: the `Base` (needs "base")
OFFERED = ("model", "linears", "config", "stats", "calibration", "calibration_ids", "device", "base")

Scope = Literal["block", "model"]


def no_check() -> None:
    """The check of a stage whose config's own validation says everything (e.g. SmoothQuant)."""


@dataclass(frozen=True)
class Stage:
    """One method: how the pipeline checks and applies it.

    scope "block": `apply` edits the linears of one decoder block at a time, driven by the calibration engine
    when `needs` names statistics ("hessian", "input_norm", "input_absmax"); `check(linears, config)` runs per block.
    scope "model": `apply` gets the whole model (it may change the architecture or train it); `check(model, config)`.
    """

    config: type[StageConfig]
    apply: Callable[..., object]
    scope: Scope = "block"
    needs: tuple[str, ...] = ()  # statistics (block scope), "calibration" and/or "base" (model scope); () = data-free
    check: Callable[..., None] = no_check  # raises before anything is modified
    quantizes: bool | Callable[[StageConfig], bool] = False  # leaves QuantizedLinear layers (later stages may not
    # edit those); a function decides per config (AWQ with quantize: false only folds scales)
    changes_architecture: bool = False  # rewrites layers wholesale (drops blocks, narrows, rotates): must come before
    # any quantization, and later stages are checked on the changed model when they run
    edits_weights: bool = True  # False: only records a setting on the model (kv-cache), so it may follow quantization
    reports: str = "result"  # the manifest's key for what `apply` returns when that is not a dataclass or a dict
    block_configs: Callable[..., list[StageConfig]] | None = None  # one config per block (OWL), before the stage runs
    true_sequential: bool | None = None  # compress each block's linears group by group in execution order;
    # None: the config's own `true_sequential` field (False when it has none)

    def quantizes_with(self, config: StageConfig) -> bool:
        return self.quantizes(config) if callable(self.quantizes) else self.quantizes

    def sequential_with(self, config: StageConfig) -> bool:
        if self.true_sequential is not None:
            return self.true_sequential
        return bool(getattr(config, "true_sequential", False))

    @property
    def needs_calibration(self) -> bool:
        """Whether the recipe run must draw calibration windows for this stage."""
        return "calibration" in self.needs or (self.scope == "block" and bool(self.statistics))

    @property
    def statistics(self) -> tuple[str, ...]:
        return tuple(need for need in self.needs if need not in ("calibration", "base"))


def call(function: Callable[..., object], **offered: object) -> object:
    """`function(**the offered arguments its signature names)`; each name must be one of `OFFERED`."""
    wanted = inspect.signature(function).parameters
    return function(**{name: offered[name] for name in wanted if name in offered})


@dataclass(frozen=True)
class StageLog:
    """What one stage did, as the manifest records it."""

    method: str
    seconds: float
    layers: int  # decoder blocks after the stage (block scope: linears it edited)
    details: dict = field(default_factory=dict)  # what the applier returned: loss curve, rotation, removed blocks


def details_of(result: object, key: str = "result") -> dict:
    """An applier's return value as plain data for the manifest (tensors become lists); a result with a `record()`
    method says itself what is worth keeping."""
    if result is None:
        return {}
    if hasattr(result, "record"):
        result = result.record()
    elif dataclasses.is_dataclass(result):
        result = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    if not isinstance(result, dict):
        return {key: _plain(result)}
    return {key: _plain(value) for key, value in result.items()}


def _plain(value: object) -> object:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
