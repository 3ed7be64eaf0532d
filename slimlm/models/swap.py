"""The one module-swap primitive: quantized linears, adapters and structured pruning all go through it."""

from __future__ import annotations

from torch import nn


def replace_module_(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at fully-qualified `name` for `new`; return the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
