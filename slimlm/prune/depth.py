"""Depth pruning: drop whole decoder blocks (ShortGPT, Men et al. 2024, "ShortGPT: Layers in Large Language
Models are More Redundant Than You Expect").

A block that barely changes the residual stream is redundant. ShortGPT's Block Influence of block i is

    BI_i = 1 − E_t[ cos(x_i,t , x_i+1,t) ]        x_i,t: hidden state entering block i at token t (H,)

averaged over every calibration token; the blocks with the lowest BI are removed. The optional "perplexity"
metric scores block i by the calibration loss of the model with block i skipped (lowest = least needed).

The result is a plain Hugging Face model with fewer blocks: `num_hidden_layers` and the per-layer config lists
(`layer_types`, Qwen's `max_window_layers`) describe exactly the kept blocks, and every kept attention's
`layer_idx` is renumbered 0..n−1 so the KV cache is indexed like in a freshly built model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.calibration.sequential import (
    block_output,
    capture_block_inputs,
    hooks_removed_after,
)
from slimlm.errors import SlimlmError
from slimlm.models.adapters import adapter_for, decoder_blocks
from slimlm.models.swap import replace_module_
from slimlm.progress import progress_bar
from slimlm.stage import Stage, StageConfig, check_range

METRICS = ("block-influence", "perplexity")
# Config fields holding one entry per decoder block (transformers 5.x): sliced to the kept blocks.
PER_LAYER_LISTS = ("layer_types",)


@dataclass(frozen=True)
class DepthConfig(StageConfig):
    """Remove whole decoder blocks, the least influential first (ShortGPT)."""

    method: ClassVar[str] = "depth"
    fraction: float | None = (
        None  # share of blocks removed, rounded half up, at least 1 and at most all but one (default 0.25)
    )
    blocks: int | None = None  # exact number of blocks removed (instead of fraction)
    metric: str = "block-influence"  # "block-influence" (1 − cos(in, out), one pass) or "perplexity" (loss with the block skipped, one pass per block)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets is not None:
            self.fail(
                "targets", "does not apply: depth pruning removes whole blocks", "remove 'targets' from the stage"
            )
        if self.fraction is not None and self.blocks is not None:
            self.fail("blocks", "and 'fraction' are both set", "give either 'fraction' (a share) or 'blocks' (a count)")
        if self.fraction is not None:
            check_range(self, "fraction", self.fraction, 0.0, 1.0, upper_open=True)
            if self.fraction == 0:
                self.fail("fraction", "is 0, which removes nothing", "set 'fraction' above 0, e.g. 0.25")
        if self.blocks is not None and self.blocks < 1:
            self.fail(
                "blocks", f"is {self.blocks}, but at least one block must be removed", "set 'blocks' to 1 or more"
            )
        if self.metric not in METRICS:
            self.fail(
                "metric",
                f"is '{self.metric}', not one of {', '.join(METRICS)}",
                "use 'block-influence' (ShortGPT) or 'perplexity'",
            )


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def blocks_to_remove(n_blocks: int, config: DepthConfig) -> int:
    """How many of `n_blocks` blocks the stage removes: `blocks`, or `fraction`·n rounded half up, clamped to [1, n−1]."""
    if config.blocks is not None:
        if config.blocks >= n_blocks:
            raise SlimlmError(
                f"depth: 'blocks' is {config.blocks}, but the model has only {n_blocks} blocks",
                f"remove at most {n_blocks - 1}",
            )
        return config.blocks
    fraction = 0.25 if config.fraction is None else config.fraction
    return min(max(round_half_up(fraction * n_blocks), 1), n_blocks - 1)


def block_influence(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> float:
    """ShortGPT's Block Influence: 1 − cosine(input, output) per token, averaged. hidden_in, hidden_out: (N, T, H)."""
    cosine = F.cosine_similarity(hidden_in.double(), hidden_out.double(), dim=-1)  # (N, T)
    return float(1.0 - cosine.mean())


@torch.no_grad()
def block_influences(
    model: nn.Module, calibration_ids: torch.Tensor, device: torch.device | None = None
) -> list[float]:
    """Block Influence of every block of the dense model, block by block on the calibration windows (N, T).

    Uses the shared driver's capture of block 0's inputs, then runs each block once (on `device`, the rest of
    the model stays where it is) and feeds its outputs to the next.
    """
    device = device or next(model.parameters()).device
    hidden_states, arguments = capture_block_inputs(model, calibration_ids, device)  # each (1, T, H)
    scores = []
    blocks = decoder_blocks(model)
    with progress_bar("depth: block influence", total=len(blocks)) as advance:
        for index, block in enumerate(blocks):
            home = next(block.parameters()).device
            block.to(device)
            outputs = [block_output(block, hidden, arguments[index]) for hidden in hidden_states]
            block.to(home)
            scores.append(block_influence(torch.cat(hidden_states), torch.cat(outputs)))
            hidden_states = outputs
            advance()
    return scores


def _skip_block(_module, args, kwargs, output):
    """Forward hook that makes a decoder block the identity: its output is the hidden state it received."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.no_grad()
def skip_losses(model: nn.Module, calibration_ids: torch.Tensor, device: torch.device | None = None) -> list[float]:
    """Mean next-token loss on the calibration windows (N, T) with each block skipped in turn (one pass per block).

    Runs the whole model on `device` (moved there and back), so it needs the model to fit there.
    """
    device = device or next(model.parameters()).device
    home = next(model.parameters()).device
    model.to(device)
    blocks = decoder_blocks(model)
    losses = []
    with progress_bar("depth: loss with each block skipped", total=len(blocks)) as advance:
        for block in blocks:
            with hooks_removed_after([block.register_forward_hook(_skip_block, with_kwargs=True)]):
                total = 0.0
                for window in calibration_ids:
                    ids = window.unsqueeze(0).to(device)
                    total += float(model(ids, labels=ids, use_cache=False).loss)
            losses.append(total / len(calibration_ids))
            advance()
    model.to(home)
    return losses


def config_after(config, changes: dict[str, object]):
    """The config with `changes` applied, rebuilt from its dict as `from_pretrained` would: refuses a result that
    plain transformers would not load (e.g. Llama requires hidden_size % num_attention_heads == 0)."""
    from huggingface_hub.errors import StrictDataclassError

    changed = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(changed, key, value)
    try:
        return type(config).from_dict(changed.to_dict())
    except (ValueError, StrictDataclassError) as err:
        reason = " ".join(str(err).split())
        raise SlimlmError(
            f"the pruned model's config would not load in transformers ({', '.join(f'{k}={v}' for k, v in changes.items() if not isinstance(v, list))}): {reason}",
            "prune by a different amount",
        ) from None


def _layer_changes(config, kept: list[int]) -> dict[str, object]:
    """New values of the config fields that count or list the decoder blocks, for keeping blocks `kept`."""
    changes: dict[str, object] = {"num_hidden_layers": len(kept)}
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if values is not None:
            changes[name] = [values[i] for i in kept]
    if (
        getattr(config, "max_window_layers", None) is not None
    ):  # Qwen: the first max_window_layers blocks use full attention
        changes["max_window_layers"] = sum(i < config.max_window_layers for i in kept)
    return changes


def check_depth(model: nn.Module, config: DepthConfig) -> None:
    """Refuse, before anything changes, what depth pruning cannot express in a plain Hugging Face config."""
    n_blocks = len(decoder_blocks(model))
    if n_blocks < 2:
        raise SlimlmError(f"depth: the model has {n_blocks} block, so none can be removed", "use width pruning instead")
    hf_config = model.config
    if getattr(hf_config, "is_heterogeneous", False):
        raise SlimlmError(
            "depth: the model has a per-layer config (per_layer_config), which slimlm cannot yet re-index",
            "prune a model with a uniform config",
        )
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise SlimlmError(
            "depth: this GPT-2 scales attention by 1/(layer_idx+1), so a block moved to a new index would compute something else",
            "depth-prune a GPT-2 with scale_attn_by_inverse_layer_idx=false",
        )
    known = {"num_hidden_layers", "max_window_layers", *PER_LAYER_LISTS}
    for key, value in hf_config.to_dict().items():
        if isinstance(value, list) and len(value) == n_blocks and key not in known and not key.endswith("token_id"):
            raise SlimlmError(
                f"depth: config field '{key}' looks like one entry per block, which slimlm does not know how to shorten",
                "add it to PER_LAYER_LISTS in slimlm/prune/depth.py if it is per-layer",
            )
    removed = blocks_to_remove(n_blocks, config)
    config_after(hf_config, _layer_changes(hf_config, list(range(n_blocks - removed))))


def remove_blocks_(model: nn.Module, removed: list[int]) -> None:
    """Drop decoder blocks `removed` (indices), renumber the rest 0..n−1 and update the config to match."""
    blocks = decoder_blocks(model)
    kept = [i for i in range(len(blocks)) if i not in set(removed)]
    changes = _layer_changes(model.config, kept)
    config_after(model.config, changes)  # refuse before anything changes
    replace_module_(model, adapter_for(model).blocks, nn.ModuleList([blocks[i] for i in kept]))
    for new_index, block in enumerate(decoder_blocks(model)):
        for module in block.modules():  # the block and its attention keep their own layer_idx: the KV cache slot
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    for key, value in changes.items():
        setattr(model.config, key, value)


def prune_depth_(
    model: nn.Module, config: DepthConfig, calibration_ids: torch.Tensor, device: torch.device | None = None
) -> list[int]:
    """Score every block on the calibration windows (N, T), remove the lowest-scoring ones; return their indices."""
    check_depth(model, config)
    n_blocks = len(decoder_blocks(model))
    if config.metric == "block-influence":
        scores = block_influences(model, calibration_ids, device)
    else:
        scores = skip_losses(model, calibration_ids, device)
    order = sorted(range(n_blocks), key=lambda i: scores[i])  # stable: ties remove the earlier block
    removed = sorted(order[: blocks_to_remove(n_blocks, config)])
    remove_blocks_(model, removed)
    return removed


DEPTH = Stage(
    config=DepthConfig,
    apply=prune_depth_,
    scope="model",
    needs=("calibration",),
    check=check_depth,
    changes_architecture=True,
    reports="removed_blocks",
)
