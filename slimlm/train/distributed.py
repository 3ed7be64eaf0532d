"""Multi-process training through `torchrun`: process group from the environment, FSDP2 sharding, full state dicts.

`torchrun --nproc_per_node N script.py` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; `init_from_env()` joins
the group (NCCL on CUDA, gloo on CPU). `shard_(model, blocks)` applies FSDP2's `fully_shard` to every decoder block
and then to the root, the layout PyTorch's FSDP2 guide recommends: each block's parameters are all-gathered just
before its forward/backward and freed after, and gradients are reduce-scattered and averaged over the processes.
With every process reading an equal share of the global batch, the averaged gradient equals the single-process
gradient of the whole batch.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


def init_from_env() -> World:
    """Join the process group that `torchrun` describes in the environment; a no-op for a plain single process."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return world()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return world()


@contextmanager
def process_group() -> Iterator[World]:
    """`init_from_env` for the duration of a command: other ranks than 0 stay quiet (no progress bars), and on the
    way out every rank waits for the others before the group is torn down, so no process exits while another still
    talks to it (gloo aborts a worker whose peer vanished mid-teardown). Sharded models live on in reference cycles
    (FSDP's hooks) and hold the group through their device mesh: they are collected before the group is destroyed,
    not during interpreter exit (a CI run had a worker abort there: "terminate called without an active
    exception"). A no-op outside `torchrun`."""
    place = init_from_env()
    if not place.is_main:
        os.environ["SLIMLM_QUIET"] = "1"
    finished = False
    try:
        yield place
        finished = True
    except SystemExit as exit_:  # a command line (click) ends with sys.exit even when it succeeds
        finished = exit_.code in (0, None)
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            gc.collect()
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_(model: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    """FSDP2 in place: `fully_shard` each of `blocks`, then the root (embeddings, final norm, head and the rest)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state dicts on CPU, on every process (collective under FSDP)."""
    if not is_sharded(model):
        return model.state_dict(), (optimizer.state_dict() if optimizer is not None else None)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    model_state = {k: v.cpu() for k, v in get_model_state_dict(model, options=options).items()}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_state, optimizer_state


def load_full_state_(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> None:
    """Load unsharded state dicts (as `full_state` returns them) into a plain or FSDP2-sharded model and optimizer."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the processes (itself in a single process)."""
    if world().size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
    return value if dist.get_backend() == "nccl" else value / world().size
