"""Width pruning: narrow every decoder block by removing its least active MLP channels and attention heads
(Minitron, Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation").

Importance is activation-based and needs only forward passes over the calibration windows:

- MLP channel j: ‖a_j‖₂ over every calibration token, where a = act(x W_gateᵀ) ⊙ (x W_upᵀ) (GPT-2 / OPT:
  act(x W_fcᵀ)) is what enters down_proj — the input-norm statistic of down_proj.
- Key/value group g (GQA-aware: a group is one KV head and the query heads that read it): the sum, over its
  query heads, of ‖head output‖₂ over every calibration token, the head output being that head's slice of the
  o_proj input — so the o_proj input norm, split by head.

Minitron compares several ways to aggregate over batch and sequence; slimlm uses the L2 norm over all tokens
together (batch and sequence flattened), which is the shared `InputStats.input_norm`, collected by the one
sequential calibration driver on the dense model.

Applying keeps the most important channels / groups, the same number in every block so the Hugging Face
config can describe the result: gate/up rows and down columns; q rows per head, k/v rows per group and o_proj
columns; biases with their rows; Phi-3's fused gate_up_proj / qkv_proj sliced segment by segment. The config gets
the new `intermediate_size` (GPT-2 `n_inner`, OPT `ffn_dim`), `num_attention_heads`, `num_key_value_heads`, and an
explicit `head_dim` (the head size no longer equals hidden_size / num_attention_heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.calibration.sequential import calibrate_sequentially
from slimlm.errors import SlimlmError
from slimlm.models.adapters import (
    ADAPTERS,
    adapter_for,
    decoder_blocks,
    is_linear,
    linear_weight,
)
from slimlm.models.swap import replace_module_
from slimlm.prune.depth import config_after, round_half_up
from slimlm.stage import Stage, StageConfig, check_range


@dataclass(frozen=True)
class WidthConfig(StageConfig):
    """Narrow every block alike: drop the least active MLP channels and key/value groups (Minitron)."""

    method: ClassVar[str] = "width"
    mlp: float = (
        0.0  # share of MLP channels removed per block; the kept count is rounded half up to a multiple of multiple_of
    )
    heads: float = 0.0  # share of key/value groups removed per block, each with its query heads; rounded half up
    hidden: float = 0.0  # share of the hidden (embedding) size: not yet supported, must be 0
    multiple_of: int = 8  # the kept MLP channel count is a multiple of this (1 = exact)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets is not None:
            self.fail(
                "targets", "does not apply: width pruning narrows every block alike", "remove 'targets' from the stage"
            )
        check_range(self, "mlp", self.mlp, 0.0, 1.0, upper_open=True)
        check_range(self, "heads", self.heads, 0.0, 1.0, upper_open=True)
        if self.hidden != 0:
            self.fail(
                "hidden",
                "pruning (the embedding dimension) is not yet supported",
                "set 'hidden' to 0 and prune 'mlp' and/or 'heads'",
            )
        if self.multiple_of < 1:
            self.fail(
                "multiple_of", f"is {self.multiple_of}, must be at least 1", "use 8 (default), or 1 for an exact count"
            )
        if self.mlp == 0 and self.heads == 0:
            self.fail(
                "mlp",
                "and 'heads' are both 0, so nothing would be pruned",
                "set 'mlp' and/or 'heads' above 0, e.g. mlp: 0.25",
            )


@dataclass(frozen=True)
class WidthPlan:
    """Sizes per block before and after; equal before/after means that axis is left alone."""

    mlp_channels: int
    mlp_keep: int
    kv_groups: int
    kv_keep: int
    heads_per_group: int  # query heads reading each key/value head
    head_dim: int


@dataclass(frozen=True)
class WidthPruned:
    """What was kept, per block (ascending original indices); None for an axis left alone."""

    mlp_kept: list[torch.Tensor] | None
    groups_kept: list[torch.Tensor] | None

    def record(self) -> dict:
        """What the manifest keeps: per block, the MLP channels and key/value head groups kept (None: all)."""
        return {
            "mlp_channels_kept": None if self.mlp_kept is None else [len(kept) for kept in self.mlp_kept],
            "kv_groups_kept": None if self.groups_kept is None else [kept.tolist() for kept in self.groups_kept],
        }


# --- pure kernels -------------------------------------------------------------------------------------------


def group_importance(head_output_norm: torch.Tensor, num_groups: int, head_dim: int) -> torch.Tensor:
    """(num_heads·head_dim,) per-channel ‖o_proj input‖₂ -> (num_groups,): Σ over each group's heads of ‖head output‖₂."""
    per_head = head_output_norm.float().reshape(-1, head_dim).pow(2).sum(dim=1).sqrt()  # (num_heads,)
    return per_head.reshape(num_groups, -1).sum(dim=1)


def keep_top(importance: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the `n_keep` most important entries, ascending (so kept channels stay in their order)."""
    return torch.topk(importance, n_keep).indices.sort().values


def head_rows(groups: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices, in a projection laid out head after head, of the heads of the kept `groups`."""
    heads = (groups[:, None] * heads_per_group + torch.arange(heads_per_group)).reshape(-1)  # (groups·per_group,)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def layout_rows(layout: str, sizes: dict[str, int], kept: dict[str, torch.Tensor]) -> torch.Tensor:
    """Kept row indices of a projection whose output is the segments `layout` (e.g. "qkv", "cc") one after another."""
    parts, offset = [], 0
    for letter in layout:
        parts.append(offset + kept[letter])
        offset += sizes[letter]
    return torch.cat(parts)


def sliced_linear(
    module: nn.Module, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None
) -> nn.Module:
    """A new dense linear of the same kind (nn.Linear or GPT-2's Conv1D) holding only `rows` (outputs) and `columns` (inputs)."""
    weight = linear_weight(module).detach()  # (out, in)
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    bias = module.bias
    if bias is not None and rows is not None:
        bias = bias[rows]
    out_features, in_features = weight.shape
    if type(module).__name__ == "Conv1D":
        new = type(module)(out_features, in_features)  # Conv1D(nf=out, nx=in) stores (in, out)
        new.weight = nn.Parameter(weight.t().contiguous(), requires_grad=module.weight.requires_grad)
    else:
        new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=module.bias.requires_grad)
    return new


# --- plan, importance, apply ----------------------------------------------------------------------------------


def _owner(prefix: str, path: str) -> str:
    """Fully-qualified name of the module holding the linear at `path` inside the block at `prefix`."""
    parent = path.rpartition(".")[0]
    return f"{prefix}.{parent}" if parent else prefix


def _supported(axis: str) -> str:
    field = "mlp_producers" if axis == "mlp" else "head_producers"
    return ", ".join(sorted(name for name, adapter in ADAPTERS.items() if getattr(adapter, field)))


def config_changes(model: nn.Module, plan: WidthPlan) -> dict[str, object]:
    """The Hugging Face config fields that describe the narrowed model."""
    changes: dict[str, object] = {}
    if plan.mlp_keep < plan.mlp_channels:
        changes[adapter_for(model).mlp_width] = plan.mlp_keep
    if plan.kv_keep < plan.kv_groups:
        changes.update(
            num_attention_heads=plan.kv_keep * plan.heads_per_group,
            num_key_value_heads=plan.kv_keep,
            head_dim=plan.head_dim,  # explicit: hidden_size / num_attention_heads no longer gives it
        )
    return changes


def width_plan(model: nn.Module, config: WidthConfig) -> WidthPlan:
    """Sizes before and after, checking everything that could fail before any weight changes."""
    adapter = adapter_for(model)
    model_type = model.config.model_type
    if config.mlp > 0 and not adapter.mlp_producers:
        raise SlimlmError(f"width: MLP pruning is not supported for '{model_type}'", f"supported: {_supported('mlp')}")
    if config.heads > 0 and not adapter.head_producers:
        raise SlimlmError(
            f"width: head pruning is not supported for '{model_type}' (its config derives the head size from hidden_size / heads)",
            f"prune only 'mlp' for this model; head pruning supports {_supported('heads')}",
        )
    blocks = decoder_blocks(model)
    paths = [path for path, _ in adapter.mlp_producers] + [adapter.mlp_consumer] if config.mlp > 0 else []
    paths += [path for path, _ in adapter.head_producers] + [adapter.head_consumer] if config.heads > 0 else []
    for index, block in enumerate(blocks):
        for path in paths:
            if not is_linear(block.get_submodule(path)):
                raise SlimlmError(
                    f"width: block {index}'s {path} is a {type(block.get_submodule(path)).__name__}, not a dense linear",
                    "apply structured pruning before quantization",
                )

    mlp_channels = mlp_keep = 0
    if adapter.mlp_producers:
        widths = {linear_weight(block.get_submodule(adapter.mlp_consumer)).shape[1] for block in blocks}
        if len(widths) > 1:
            raise SlimlmError(
                f"width: the blocks' MLP widths differ ({sorted(widths)})",
                "width pruning needs a model whose blocks all have the same MLP width",
            )
        mlp_channels = mlp_keep = widths.pop()
        if config.mlp > 0:
            mlp_keep = config.multiple_of * round_half_up(mlp_channels * (1 - config.mlp) / config.multiple_of)
            if mlp_keep >= mlp_channels:
                raise SlimlmError(
                    f"width: mlp={config.mlp} removes none of the {mlp_channels} MLP channels (kept rounds to {mlp_keep}, a multiple of {config.multiple_of})",
                    "raise 'mlp' or lower 'multiple_of'",
                )
            if mlp_keep <= 0:
                raise SlimlmError(
                    f"width: mlp={config.mlp} would remove all {mlp_channels} MLP channels (kept rounds to 0, a multiple of {config.multiple_of})",
                    "lower 'mlp' or 'multiple_of'",
                )

    kv_groups = kv_keep = heads_per_group = head_dim = 0
    if adapter.head_producers:
        attention = blocks[0].get_submodule(adapter.head_consumer.rpartition(".")[0])
        num_heads = model.config.num_attention_heads
        kv_groups = kv_keep = getattr(model.config, "num_key_value_heads", None) or num_heads
        heads_per_group, head_dim = num_heads // kv_groups, attention.head_dim
        if linear_weight(blocks[0].get_submodule(adapter.head_consumer)).shape[1] != num_heads * head_dim:
            raise SlimlmError(
                "width: o_proj's input size is not num_attention_heads × head_dim",
                "the model's config does not match its weights",
            )
        if config.heads > 0:
            kv_keep = kv_groups - round_half_up(config.heads * kv_groups)
            if kv_keep == kv_groups:
                raise SlimlmError(
                    f"width: heads={config.heads} removes none of the {kv_groups} key/value groups (rounds to 0)",
                    f"set 'heads' to at least {1 / (2 * kv_groups):.3g}",
                )
            if kv_keep <= 0:
                raise SlimlmError(
                    f"width: heads={config.heads} would remove all {kv_groups} key/value groups",
                    f"set 'heads' below {1 - 1 / (2 * kv_groups):.3g}",
                )
    plan = WidthPlan(mlp_channels, mlp_keep, kv_groups, kv_keep, heads_per_group, head_dim)
    config_after(model.config, config_changes(model, plan))
    return plan


def check_width(model: nn.Module, config: WidthConfig) -> None:
    width_plan(model, config)


@torch.no_grad()
def width_importance(
    model: nn.Module, plan: WidthPlan, calibration_ids: torch.Tensor, device: torch.device | None = None
) -> dict[str, list[torch.Tensor]]:
    """Per block, MLP channel importance (channels,) and key/value group importance (groups,), from one dense pass."""
    adapter = adapter_for(model)
    consumers = {}
    if plan.mlp_keep < plan.mlp_channels:
        consumers["mlp"] = "." + adapter.mlp_consumer
    if plan.kv_keep < plan.kv_groups:
        consumers["heads"] = "." + adapter.head_consumer
    importance: dict[str, list[torch.Tensor]] = {axis: [] for axis in consumers}

    def record(_index, linears, stats):  # edits nothing: Minitron scores the dense model
        for name in linears:
            if "mlp" in consumers and name.endswith(consumers["mlp"]):
                importance["mlp"].append(stats[name].input_norm.cpu())
            if "heads" in consumers and name.endswith(consumers["heads"]):
                importance["heads"].append(
                    group_importance(stats[name].input_norm.cpu(), plan.kv_groups, plan.head_dim)
                )

    calibrate_sequentially(
        model,
        calibration_ids,
        ("input_norm",),
        record,
        select=lambda name: name.endswith(tuple(consumers.values())),
        device=device,
        description="width: importance",
    )
    return importance


def _narrow_(
    model: nn.Module,
    prefix: str,
    producers: tuple[tuple[str, str], ...],
    consumer: str,
    sizes: dict[str, int],
    kept: dict[str, torch.Tensor],
    columns: torch.Tensor,
) -> None:
    for path, layout in producers:
        replace_module_(
            model,
            f"{prefix}.{path}",
            sliced_linear(model.get_submodule(f"{prefix}.{path}"), rows=layout_rows(layout, sizes, kept)),
        )
    replace_module_(
        model, f"{prefix}.{consumer}", sliced_linear(model.get_submodule(f"{prefix}.{consumer}"), columns=columns)
    )


def _set_int_attributes_(module: nn.Module, values: dict[str, int]) -> None:
    """Keep the module's own copies of sizes (e.g. Phi-3 attention's num_key_value_heads) in step with its weights."""
    for name, value in values.items():
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, value)


def prune_width_(
    model: nn.Module, config: WidthConfig, calibration_ids: torch.Tensor, device: torch.device | None = None
) -> WidthPruned:
    """Score channels and groups on the calibration windows (N, T), then keep the most important in every block."""
    plan = width_plan(model, config)
    adapter = adapter_for(model)
    importance = width_importance(model, plan, calibration_ids, device)
    mlp_kept = [keep_top(scores, plan.mlp_keep) for scores in importance["mlp"]] if "mlp" in importance else None
    groups_kept = [keep_top(scores, plan.kv_keep) for scores in importance["heads"]] if "heads" in importance else None
    for index in range(len(decoder_blocks(model))):
        prefix = f"{adapter.blocks}.{index}"
        if mlp_kept is not None:
            channels = mlp_kept[index]
            _narrow_(
                model,
                prefix,
                adapter.mlp_producers,
                adapter.mlp_consumer,
                {"c": plan.mlp_channels},
                {"c": channels},
                channels,
            )
            _set_int_attributes_(
                model.get_submodule(_owner(prefix, adapter.mlp_consumer)), {"intermediate_size": plan.mlp_keep}
            )
        if groups_kept is not None:
            groups, per_group, head_dim = groups_kept[index], plan.heads_per_group, plan.head_dim
            kv_rows = head_rows(groups, 1, head_dim)
            q_rows = head_rows(groups, per_group, head_dim)
            sizes = {
                "q": plan.kv_groups * per_group * head_dim,
                "k": plan.kv_groups * head_dim,
                "v": plan.kv_groups * head_dim,
            }
            _narrow_(
                model,
                prefix,
                adapter.head_producers,
                adapter.head_consumer,
                sizes,
                {"q": q_rows, "k": kv_rows, "v": kv_rows},
                q_rows,
            )
            _set_int_attributes_(
                model.get_submodule(_owner(prefix, adapter.head_consumer)),
                {
                    "num_heads": plan.kv_keep * per_group,
                    "num_attention_heads": plan.kv_keep * per_group,
                    "num_key_value_heads": plan.kv_keep,
                },
            )
    for key, value in config_changes(model, plan).items():
        setattr(model.config, key, value)
    return WidthPruned(mlp_kept, groups_kept)


WIDTH = Stage(
    config=WidthConfig,
    apply=prune_width_,
    scope="model",
    needs=("calibration",),
    check=check_width,
    changes_architecture=True,
)
