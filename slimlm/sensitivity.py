"""Per-layer sensitivity: how much the model's predictions move when one linear alone is compressed.

For every decoder-block linear ℓ the stage (e.g. int4 RTN g64) is applied to ℓ only, and the mean per-token

    KL_ℓ = E_t[ KL( p_base(· | x_<t) ‖ p_ℓ(· | x_<t) ) ]        (nats)

is measured on a few evaluation windows; then ℓ is restored exactly. Sorted by KL_ℓ, the table says which layers
deserve more bits (a mixed-precision recipe: a second quantization stage with `targets`, the first with `exclude`).
KL is additive to first order for small independent perturbations, so the per-layer numbers rank well even though
they ignore interactions. Cost: one forward pass over the windows per layer.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.calibration.sequential import calibrate_sequentially
from slimlm.calibration.stats import InputStats
from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.evaluate.perplexity import EvalWindows, evaluate_quality
from slimlm.models.adapters import adapter_for, block_linears, decoder_blocks, is_linear
from slimlm.models.swap import replace_module_
from slimlm.progress import progress_bar
from slimlm.recipes.registry import METHODS
from slimlm.stage import StageConfig, call


@dataclass(frozen=True)
class LayerSensitivity:
    name: str  # fully-qualified linear name, e.g. model.layers.3.mlp.down_proj
    projection: str  # its name inside the block, e.g. mlp.down_proj
    block: int
    kl_divergence: float  # mean KL(base || model with only this layer compressed) per token, nats
    top1_agreement: float  # share of positions whose argmax is unchanged
    perplexity: float  # of the model with only this layer compressed, on the same windows


@dataclass(frozen=True)
class SensitivityTable:
    stage: dict  # the stage each layer was compressed with, as in a recipe
    protocol: str  # what the windows were
    base_perplexity: float
    layers: list[LayerSensitivity]  # most sensitive first

    def by_projection(self) -> dict[str, float]:
        """Mean KL per projection kind (q_proj, down_proj, ...), most sensitive first."""
        groups: dict[str, list[float]] = defaultdict(list)
        for row in self.layers:
            groups[row.projection].append(row.kl_divergence)
        means = {name: sum(values) / len(values) for name, values in groups.items()}
        return dict(sorted(means.items(), key=lambda item: -item[1]))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "by_projection": self.by_projection()}


def _layer_statistics(
    model: nn.Module, wanted: tuple[str, ...], calibration: CalibrationSet, select, device
) -> dict[str, InputStats]:
    """Input statistics of every selected linear of the *unmodified* model (each layer is compressed alone)."""
    kept: dict[str, InputStats] = {}
    calibrate_sequentially(
        model,
        calibration.input_ids,
        wanted,
        lambda index, linears, stats: kept.update(stats),
        select=select,
        device=device,
        description="sensitivity: statistics",
    )
    return kept


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    windows: EvalWindows,
    stage: StageConfig,
    calibration: CalibrationSet | None = None,
    device: torch.device | None = None,
) -> SensitivityTable:
    """Compress each linear the stage selects alone, measure KL against the base on `windows`, restore it.

    `stage` is a per-layer method's config (rtn, a pruning method, ...); methods that need input statistics get
    those of the unmodified model, collected once from `calibration`. The model is left exactly as it was.
    """
    method = METHODS[stage.method]
    if method.scope != "block" or method.block_configs is not None:
        raise SlimlmError(
            f"sensitivity: '{stage.method}' is not applied one linear at a time",
            "use a per-layer method, e.g. --method rtn (or magnitude, sparsegpt, ...)",
        )
    if method.statistics and calibration is None:
        raise SlimlmError(
            f"sensitivity: method '{stage.method}' needs calibration data",
            "pass calibration data (e.g. --calib-data default)",
        )
    blocks_path = adapter_for(model).blocks
    names: dict[str, tuple[int, str]] = {}
    for index in range(len(decoder_blocks(model))):
        for name, module in block_linears(model, index).items():
            if stage.selects(name):
                if not is_linear(module):
                    raise SlimlmError(
                        f"sensitivity: {name} is a {type(module).__name__}, not a dense linear layer",
                        "measure sensitivity on the uncompressed model",
                    )
                call(method.check, linears={name: module}, config=stage)
                names[name] = (index, name.removeprefix(f"{blocks_path}.{index}."))
    if not names:
        raise SlimlmError(
            f"sensitivity: the stage matches no layer (targets={stage.targets!r}, exclude={stage.exclude!r})",
            "fix the regex; names look like 'model.layers.0.mlp.up_proj'",
        )
    stats = _layer_statistics(model, method.statistics, calibration, stage.selects, device) if method.statistics else {}
    if device is not None:
        model.to(device)
    base, reference = evaluate_quality(model, windows, keep_reference=windows.input_ids.shape[0], progress=False)
    rows = []
    with progress_bar(f"sensitivity: {stage.method} one layer at a time", total=len(names)) as advance:
        for name, (index, projection) in names.items():
            original = model.get_submodule(name)
            saved = {key: value.clone() for key, value in original.state_dict().items()}
            try:
                call(
                    method.apply,
                    model=model,
                    linears={name: original},
                    config=stage,
                    stats={name: stats[name]} if stats else {},
                )
                quality, _ = evaluate_quality(model, windows, reference=reference, progress=False)
            finally:  # quantizers swap the module, pruners edit it in place: undo both
                replace_module_(model, name, original)
                original.load_state_dict(saved)
            rows.append(
                LayerSensitivity(
                    name, projection, index, quality.kl_divergence, quality.top1_agreement, quality.perplexity
                )
            )
            advance()
    rows.sort(key=lambda row: (-row.kl_divergence, row.name))
    stage_dict = {"method": stage.method, **dataclasses.asdict(stage)}
    return SensitivityTable(stage_dict, windows.protocol(), base.perplexity, rows)
