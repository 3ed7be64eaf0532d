"""The sequential calibration driver (GPTQ / SparseGPT / Wanda style).

1. Run the model on the calibration windows until the first decoder block and keep that block's inputs.
2. For each block: hook its target linears to accumulate input statistics while the block runs on every
   window, hand the statistics to the method (which compresses the block in place), then run the
   *compressed* block again to produce the next block's inputs — so every block is calibrated on the
   activations it will really see. A statistics pass stops as soon as every hooked linear has seen its input.
3. Optionally ("true sequential", GPTQ), the same inside a block: its linears are compressed in execution-order
   groups that read one input (q/k/v, then o, then gate/up, then down), each group's statistics collected
   after the groups before it are compressed. When the windows' activations fit in memory at once, this runs
   in ONE block forward over all windows as a single batch: the first linear of each group is replaced by a
   stand-in that takes the group's statistics from its (whole-batch) input, lets the method compress the group,
   and computes with the compressed layer, so each linear runs once and the block's output is already the
   compressed block's (1 forward per block instead of ~2.65). Otherwise, partial passes per window (each
   stops at its group), which cost about one more block forward per block.

Only one block (plus the activations of the calibration windows) needs to sit on the compute device;
the rest of the model stays where it was loaded, so this scales past what fits on the GPU at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from slimlm.calibration.stats import InputStats
from slimlm.errors import SlimlmError
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
    stats = _shared_stats(linears, wanted, shared_inputs)
    leaders = [name for name in linears if stats[name].name == name]
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


def _shared_stats(
    linears: dict[str, nn.Module], wanted: tuple[str, ...], shared_inputs: tuple[tuple[str, ...], ...]
) -> dict[str, InputStats]:
    """One InputStats per input tensor: linears of a `shared_inputs` group share their first member's (named after it)."""
    leader_of = {}
    for group in shared_inputs:
        members = [name for name in linears if name.endswith(group)]
        leader_of.update({name: members[0] for name in members})
    stats: dict[str, InputStats] = {}
    for name, module in linears.items():
        leader = leader_of.get(name, name)
        if leader not in stats:
            stats[leader] = InputStats(
                linear_weight(linears[leader]).shape[1], wanted, linear_weight(module).device, name=leader
            )
        stats[name] = stats[leader]
    return stats


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
def capture_block_inputs(
    model: nn.Module, calibration_ids: torch.Tensor, device: torch.device
) -> tuple[list[torch.Tensor], list[BlockArguments]]:
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


class _CompressOnCall(nn.Module):
    """Stands in for the first linear of an execution group during a one-pass block forward (see the module doc)."""

    def __init__(self, on_call: Callable[[torch.Tensor], nn.Module]):
        super().__init__()
        self.on_call = on_call
        self.called = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.called = True
        return self.on_call(x)(x)


def compress_in_one_pass(
    model: nn.Module,
    block: nn.Module,
    batch: torch.Tensor,
    arguments: BlockArguments,
    groups: list[dict[str, nn.Module]],
    statistics: tuple[str, ...],
    compress_group: Callable[[dict[str, nn.Module], dict[str, InputStats]], None],
) -> torch.Tensor:
    """Compress `groups` (execution order, each reading one input) true-sequentially during one forward of `block`
    on `batch` (all windows, (N, L, hidden)); returns the compressed block's output for the batch."""
    stand_ins: dict[str, _CompressOnCall] = {}
    originals: dict[str, nn.Module] = {}

    def on_call_for(leader: str, group: dict[str, nn.Module]):
        def on_call(x: torch.Tensor) -> nn.Module:
            replace_module_(model, leader, originals[leader])
            stats = InputStats(linear_weight(originals[leader]).shape[1], statistics, x.device, name=leader)
            stats.update(x)
            compress_group(group, dict.fromkeys(group, stats))
            return model.get_submodule(leader)  # the method may have swapped in a quantized layer

        return on_call

    for group in groups:
        leader = next(iter(group))
        originals[leader] = group[leader]
        stand_ins[leader] = _CompressOnCall(on_call_for(leader, group))
        replace_module_(model, leader, stand_ins[leader])
    try:
        output = block_output(block, batch, arguments)
    finally:
        for leader, stand_in in stand_ins.items():
            if not stand_in.called:
                replace_module_(model, leader, originals[leader])
    missed = [leader for leader, stand_in in stand_ins.items() if not stand_in.called]
    if missed:
        raise SlimlmError(
            f"calibration: {missed[0]} never ran in its block's forward, so it cannot be calibrated",
            "leave it out of the stage with 'targets'",
        )
    return output


def one_pass_fits(model: nn.Module, windows: int, seqlen: int, device: torch.device) -> bool:
    """Whether one block's forward over all windows as one batch fits in half the free memory of `device`.

    Counted: the block's widest intermediate activations (about four of the MLP width and six of the hidden width
    per token, float32) — attention is assumed not to materialise L×L scores (SDPA's fused kernels)."""
    config = model.config
    hidden = config.hidden_size  # GPT-2's n_embd through the config's attribute map
    intermediate = (
        getattr(config, adapter_for(model).mlp_width, None) or 4 * hidden
    )  # GPT-2's n_inner: None means 4 × hidden
    needed = 4 * windows * seqlen * (4 * intermediate + 6 * hidden)
    return needed < free_memory(device) // 2


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's own count, else the host's MemAvailable (0 where the host does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no /proc (macOS): unknown, as if nothing were free
        pass
    return 0


def execution_groups(
    linears: dict[str, nn.Module], shared_inputs: tuple[tuple[str, ...], ...]
) -> list[dict[str, nn.Module]]:
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
    one_pass = true_sequential and one_pass_fits(model, *calibration_ids.shape, device)
    if one_pass:
        hidden_states = [torch.cat(hidden_states)]  # all windows as one batch
    with progress_bar(description, total=len(blocks)) as advance:
        for index, block in enumerate(blocks):
            home = next(block.parameters()).device
            block.to(device)
            linears = {name: module for name, module in block_linears(model, index).items() if select(name)}
            groups = execution_groups(linears, adapter.shared_inputs) if true_sequential else [linears]
            if one_pass:
                hidden_states = [
                    compress_in_one_pass(
                        model,
                        block,
                        hidden_states[0],
                        arguments[index],
                        groups,
                        statistics,
                        partial(compress_block, index),
                    )
                ]
            else:
                for group in groups:
                    with collect_input_stats(group, statistics, adapter.shared_inputs, stop_when_seen=True) as stats:
                        for hidden in hidden_states:
                            _forward_until_stopped(block, hidden, arguments[index])
                    compress_block(index, group, stats)
                hidden_states = [block_output(block, hidden, arguments[index]) for hidden in hidden_states]
            block.to(home)
            advance()
