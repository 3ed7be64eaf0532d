"""The sequential calibration driver (GPTQ / SparseGPT / Wanda style).

1. Run the model on the calibration windows until the first decoder block and keep that block's inputs.
2. For each block: hook its target linears to accumulate input statistics while the block runs on every
   window, hand the statistics to the method (which compresses the block in place), then run the
   *compressed* block again to produce the next block's inputs — so every block is calibrated on the
   activations it will really see. A statistics pass stops as soon as every hooked linear has seen its input.
3. Optionally ("true sequential", GPTQ), the same inside a block: its linears are compressed in execution-order
   groups that read one input (q/k/v, then o, then gate/up, then down), each group's statistics collected
   after the groups before it are compressed. The extra passes are partial (each stops at its group), so it
   costs about one more block forward per block.

Only one block (plus the activations of the calibration windows) needs to sit on the compute device;
the rest of the model stays where it was loaded, so this scales past what fits on the GPU at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from slimlm.calibration.stats import InputStats
from slimlm.models.adapters import (
    adapter_for,
    block_linears,
    decoder_blocks,
    linear_weight,
)
from slimlm.models.swap import replace_module_
from slimlm.progress import progress_bar

BlockCompressor = Callable[[int, dict[str, nn.Module], dict[str, InputStats]], None]


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are known; private, never escapes this module."""


@contextmanager
def hooks_removed_after(handles: list) -> Iterator[list]:
    """Own a list of hook handles and always remove them, even when the body raises."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def collect_input_stats(
    linears: dict[str, nn.Module],
    wanted: tuple[str, ...],
    shared_inputs: tuple[tuple[str, ...], ...] = (),
    stop_when_seen: bool = False,
) -> Iterator[dict[str, InputStats]]:
    """Forward hooks that feed each linear's input into an InputStats while the context is open.

    Linears named together in `shared_inputs` (suffixes, e.g. q/k/v) read one tensor: only the first is
    hooked and the others share its statistics object, so a Hessian is never computed twice. With
    `stop_when_seen`, the forward is cut short (`_StopForward`, caught by `_forward_until_stopped`) once every
    hooked linear has seen its input.
    """
    leader_of = {}
    for group in shared_inputs:
        members = [name for name in linears if name.endswith(group)]
        leader_of.update({name: members[0] for name in members})
    stats: dict[str, InputStats] = {}
    for name, module in linears.items():
        leader = leader_of.get(name, name)
        if leader not in stats:
            stats[leader] = InputStats(linear_weight(linears[leader]).shape[1], wanted, linear_weight(module).device, name=leader)
        stats[name] = stats[leader]
    leaders = [name for name in linears if leader_of.get(name, name) == name]
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            stats[name].update(inputs[0])
            seen.add(name)
            if stop_when_seen and len(seen) == len(leaders):
                seen.clear()
                raise _StopForward

        return hook

    handles = [linears[name].register_forward_hook(hook_for(name)) for name in leaders]
    with hooks_removed_after(handles):
        yield stats


def _move_(model: nn.Module, paths: list[str | None], device: torch.device) -> None:
    for path in paths:
        if path:
            model.get_submodule(path).to(device)


BlockArguments = tuple[tuple, dict]  # what the model passes a block besides its hidden states


class _ArgumentRecorder(nn.Module):
    """Stands in for a decoder block during capture: records what the model passes it and returns its input.

    Blocks are never run here, so capture costs only the embeddings; the last recorder stops the forward
    before the final norm and LM head. Only the first window's arguments are kept (masks may be large), and
    only block 0's recorder keeps the hidden states.
    """

    def __init__(self, keep_inputs: bool, last: bool):
        super().__init__()
        self.keep_inputs = keep_inputs
        self.last = last
        self.inputs: list[torch.Tensor] = []
        self.arguments: BlockArguments | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.arguments is None:
            self.arguments = (args, kwargs)
        if self.keep_inputs:
            self.inputs.append(hidden_states)
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calibration_ids: torch.Tensor, device: torch.device) -> tuple[list[torch.Tensor], list[BlockArguments]]:
    """Hidden states entering block 0 for each window (each (1, L, hidden)), and per block the other arguments.

    Blocks differ in what they get (Gemma/Qwen sliding vs full attention: other masks and rotary tables), so
    each block's arguments are recorded. All windows have the same length and no padding, so those arguments
    are the same for every window and kept from the first.
    """
    adapter = adapter_for(model)
    blocks = decoder_blocks(model)
    recorders = [_ArgumentRecorder(keep_inputs=i == 0, last=i == len(blocks) - 1) for i in range(len(blocks))]
    originals = list(blocks)
    stems = [adapter.embed, adapter.position_embed, adapter.rotary]
    home = next(model.parameters()).device
    _move_(model, stems, device)
    try:
        for index, recorder in enumerate(recorders):
            replace_module_(model, f"{adapter.blocks}.{index}", recorder)
        for window in calibration_ids:
            try:
                model(window.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for index, original in enumerate(originals):
            replace_module_(model, f"{adapter.blocks}.{index}", original)
        _move_(model, stems, home)
    return recorders[0].inputs, [recorder.arguments for recorder in recorders]


def block_output(block: nn.Module, hidden: torch.Tensor, arguments: BlockArguments) -> torch.Tensor:
    """Run one decoder block on (1, L, hidden) with the arguments the model would pass it."""
    args, kwargs = arguments
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _forward_until_stopped(block: nn.Module, hidden: torch.Tensor, arguments: BlockArguments) -> None:
    """Run a block for its hooks only: a statistics pass may stop it once every hooked linear has its input."""
    try:
        block_output(block, hidden, arguments)
    except _StopForward:
        pass


def execution_groups(linears: dict[str, nn.Module], shared_inputs: tuple[tuple[str, ...], ...]) -> list[dict[str, nn.Module]]:
    """One block's linears (in execution order, as the adapter lists them) split into groups that read one input:
    consecutive members of a `shared_inputs` group together (q/k/v, gate/up), every other linear alone."""
    groups: list[dict[str, nn.Module]] = []
    previous = None
    for name, module in linears.items():
        shared = next((group for group in shared_inputs if name.endswith(group)), None)
        if shared is None or shared != previous:
            groups.append({})
        groups[-1][name] = module
        previous = shared
    return groups


@torch.no_grad()
def calibrate_sequentially(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    statistics: tuple[str, ...],
    compress_block: BlockCompressor,
    select: Callable[[str], bool] = lambda name: True,
    device: torch.device | None = None,
    description: str = "calibrating",
    true_sequential: bool = False,
) -> None:
    """Compress `model` block by block; `compress_block(index, linears, stats)` edits block `index` in place.

    With `true_sequential`, `compress_block` is called once per execution group of the block (see
    `execution_groups`), each time with that group's linears and statistics.
    """
    device = device or next(model.parameters()).device
    hidden_states, arguments = capture_block_inputs(model, calibration_ids, device)
    blocks = decoder_blocks(model)
    adapter = adapter_for(model)
    with progress_bar(description, total=len(blocks)) as advance:
        for index, block in enumerate(blocks):
            home = next(block.parameters()).device
            block.to(device)
            linears = {name: module for name, module in block_linears(model, index).items() if select(name)}
            for group in execution_groups(linears, adapter.shared_inputs) if true_sequential else [linears]:
                with collect_input_stats(group, statistics, adapter.shared_inputs, stop_when_seen=True) as stats:
                    for hidden in hidden_states:
                        _forward_until_stopped(block, hidden, arguments[index])
                compress_block(index, group, stats)
            hidden_states = [block_output(block, hidden, arguments[index]) for hidden in hidden_states]
            block.to(home)
            advance()
