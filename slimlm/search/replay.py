"""Replaying a search: `slimlm compress --recipe DIR/recipe.yaml` rebuilds the file the search chose.

The search's recipe.yaml names each kept tensor's TYPE/METHOD (GGUF tensor names, or HF module names for
compressed-tensors, at the base's block numbering), the blocks removed and the calibration windows its statistics
came from. The replay draws those windows, collects the same Hessians (and, for an importance-weighted embedding,
the same Fishers) on the same base, encodes each tensor through
the database's own encoder (`search.database.encode_group`: GPTQ once per shared-input group on its stacked rows)
and writes the artifact as the search did: tensor for tensor the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.search.space import METHODS, Knob, Option, gguf_search_space, tied_output


def replay_space(model: nn.Module, target: str):
    """Every option the database could hold on each tensor of `target`."""
    if target == "gguf":
        return gguf_search_space(model, methods=METHODS)
    from slimlm.search.compressed_tensors import ct_search_space
    from slimlm.settings import CT_SEARCH_TYPES

    asym = tuple(f"{t}-asym" for t in CT_SEARCH_TYPES if t.startswith("int"))
    return ct_search_space(model, CT_SEARCH_TYPES + asym)


def check_replay(model: nn.Module, target: str, tensors: Mapping[str, str], removed: tuple[int, ...]) -> list[Knob]:
    """The knobs `tensors` sets, each checked against the model (every kept tensor named once, each option one the
    database could hold for its shape); raises a SlimlmError naming the first problem."""
    from slimlm.search.database import baseline_options

    space = replay_space(model, target)
    known = {k.tensor: k for k in space.knobs}
    unknown = [t for t in tensors if t not in known]
    if unknown:
        raise SlimlmError(
            f"recipe export tensors: '{unknown[0]}' is not a searchable tensor of this model",
            "replay the recipe on the model the search ran on",
        )
    blocks = {k.block for k in space.knobs if k.block is not None}
    if set(removed) - blocks:
        raise SlimlmError(
            f"recipe export remove_blocks: {sorted(set(removed) - blocks)} not among the model's blocks 0..{max(blocks)}",
            "replay the recipe on the model the search ran on",
        )
    missing = [k.tensor for k in space.knobs if k.block not in removed and k.tensor not in tensors]
    if missing:
        raise SlimlmError(
            f"recipe export tensors: no type for {missing[0]} ({len(missing)} tensors unnamed)",
            "name every kept tensor's TYPE/METHOD, as the search's recipe.yaml does",
        )
    chosen = []
    for knob in space.knobs:
        if knob.block in removed:
            continue
        option = Option.parse(tensors[knob.tensor])
        allowed = (*knob.options, *baseline_options(knob))
        if option not in allowed:
            raise SlimlmError(
                f"recipe export tensors: {knob.tensor} {knob.shape} cannot be {option.label}",
                f"use one of: {', '.join(o.label for o in allowed)}",
            )
        chosen.append(knob)
    return chosen


def replay(
    model: nn.Module,
    tokenizer,
    target: str,
    tensors: Mapping[str, str],
    removed: tuple[int, ...],
    calibration_ids: torch.Tensor,
    out: Path,
    source_gguf: Path | None = None,
    manifest: dict | None = None,
    overwrite: bool = False,
):
    """Write the artifact a search chose (see the module docstring): GGUF -> `write_gguf`'s summary; compressed-tensors
    -> the checkpoint directory."""
    from slimlm.models.adapters import adapter_for
    from slimlm.progress import progress_bar
    from slimlm.search.database import encode_group, group_inputs, shared_input_groups
    from slimlm.search.space import SearchSpace
    from slimlm.search.statistics import collect_statistics

    removed = tuple(removed)
    knobs = check_replay(model, target, tensors, removed)
    # the embedding's importance-weighted rounding needs the Fisher of a backward pass; everything else, Hessians
    embedding_rounded = any(k.role == "embedding" and Option.parse(tensors[k.tensor]).method == "rtn" for k in knobs)
    statistics = collect_statistics(model, calibration_ids, gradients=embedding_rounded)
    head = adapter_for(model).lm_head if tied_output(model) else None
    payloads = {}
    with progress_bar("replay: encoding tensors", len(knobs), unit="tensors") as advance:
        for group in shared_input_groups(SearchSpace(target, tuple(knobs))):
            weights, hessian, importance = group_inputs(model, group, statistics, head)
            options = [Option.parse(tensors[k.tensor]) for k in group]
            for knob, option, encoded in zip(
                group, options, encode_group(weights, [(o,) for o in options], hessian, importance)
            ):
                payloads[knob.tensor] = (option, encoded[option.label])
                advance()
    if target == "gguf":
        from slimlm.search.artifact import write_configuration

        packed = {tensor: (option.type, data) for tensor, (option, data) in payloads.items()}
        return write_configuration(model, tokenizer, source_gguf, removed, packed, out, overwrite=overwrite)
    from slimlm.search.compressed_tensors import write_ct_checkpoint

    return write_ct_checkpoint(model, tokenizer, removed, payloads, out, manifest or {}, overwrite=overwrite)
