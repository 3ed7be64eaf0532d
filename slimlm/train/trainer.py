"""One plain training loop: no framework, every step visible.

    for step in range(start, steps):
        for micro in range(grad_accum):                     # the global batch of this micro-step, this process's rows
            loss = loss_fn(model, source.batch(rows)) / grad_accum
            loss.backward()                                 # bf16 autocast on CUDA, fp32 on CPU
        stop if the loss or the gradient norm is not finite  # last good state saved, step named
        clip_grad_norm_(clip_norm); optimizer.step(); scheduler.step()
        checkpoint every `checkpoint_every` steps (atomic), evaluate every `eval_every` steps

Data is addressed by position: optimizer step s, micro-step m reads the global samples
[(s·A + m)·B, (s·A + m + 1)·B) of the source (B = batch_size, A = grad_accum), each process its equal slice. A
checkpoint therefore only needs the step number to resume the data exactly where it stopped; with the model,
optimizer, scheduler and RNG states restored, an interrupted run continues as if it had never stopped. A
checkpoint records what defines the run (config, the caller's run description, parameter shapes) and is refused
for any other run.

The same loop runs under `torchrun` with FSDP2 (`slimlm.train.distributed`): gradients are averaged over the
processes, so N processes with batch_size B reproduce one process with batch_size B.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from rich.progress import Progress, TextColumn
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.progress import bar_columns, console, quiet
from slimlm.train.distributed import (
    all_mean,
    full_state,
    is_sharded,
    load_full_state_,
    world,
)

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT = "last.pt"
# Settings that change how often things happen, not what is computed: a run may resume with other values.
NOT_IDENTITY = ("checkpoint_dir", "checkpoint_every", "eval_every")


@dataclass(frozen=True)
class TrainConfig:
    """What one training run does; also what its checkpoints must match to resume."""

    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per micro-step, summed over all processes
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4  # peak learning rate, reached after warm-up
    min_lr_ratio: float = 0.1  # the schedule decays to lr · min_lr_ratio
    warmup_steps: int = 0  # linear warm-up from 0
    schedule: str = "cosine"  # "cosine", "linear" or "constant" after warm-up
    optimizer: str = "adamw"  # "adamw" (β = 0.9, 0.95) or "adafactor" (factored second moments: less memory)
    weight_decay: float = 0.0  # decoupled, on matrices only (not norms and biases)
    clip_norm: float | None = 1.0  # clip the global gradient norm; null: no clipping
    seed: int = 0
    checkpoint_dir: str | None = None  # where last.pt is written and resumed from; null: no checkpoints
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end, on interruption and on NaN)
    eval_every: int = 0  # steps between evaluations (0: none)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise SlimlmError(
                    f"training: '{key}' is {getattr(self, key)}, must be at least 1", f"set '{key}' to 1 or more"
                )
        for key in ("warmup_steps", "checkpoint_every", "eval_every"):
            if getattr(self, key) < 0:
                raise SlimlmError(
                    f"training: '{key}' is {getattr(self, key)}, must be 0 or more", f"set '{key}' to 0 or more"
                )
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise SlimlmError(
                f"training: 'lr' is {self.lr}, must be a positive number",
                "use e.g. 1e-4 (full fine-tuning) or 1e-3 (LoRA)",
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise SlimlmError(f"training: 'min_lr_ratio' is {self.min_lr_ratio}, outside [0, 1]", "use e.g. 0.1")
        if self.schedule not in SCHEDULES:
            raise SlimlmError(f"training: unknown schedule '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise SlimlmError(f"training: unknown optimizer '{self.optimizer}'", f"use one of {', '.join(OPTIMIZERS)}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise SlimlmError(
                f"training: 'clip_norm' is {self.clip_norm}, must be above 0", "use e.g. 1.0, or null for no clipping"
            )


class BatchSource(Protocol):
    """Training data addressed by global sample index, so any position can be read again after a resume."""

    def batch(self, samples: range) -> dict[str, torch.Tensor]:
        """The samples with these global indices, as tensors with a leading batch dimension ("input_ids" (b, T) at least)."""
        ...

    def describe(self) -> dict:
        """JSON-able: what the data is (part of the run's identity)."""
        ...


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    losses: list[float]  # mean training loss of every step, from step 1
    evaluations: list[dict] = field(default_factory=list)  # {"step": s, **metrics}
    tokens: int = 0  # tokens read by the model during this call (all processes)
    seconds: float = 0.0  # wall time of this call's steps
    resumed_from: int = 0  # the step the run resumed from (0: a fresh start)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# --- pure pieces ------------------------------------------------------------------------------------------------


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warm-up, then cosine/linear/constant decay
    from 1 to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(config.steps - config.warmup_steps - 1, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


def micro_batch_samples(step: int, micro: int, config: TrainConfig, rank: int, world_size: int) -> range:
    """Global sample indices this process reads at optimizer step `step`, micro-step `micro`."""
    local = config.batch_size // world_size
    start = (step * config.grad_accum + micro) * config.batch_size + rank * local
    return range(start, start + local)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Adafactor over the trainable parameters; weight decay on matrices only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SlimlmError(
            "the model has no trainable parameters", "unfreeze some parameters (or add LoRA adapters) before training"
        )
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def run_identity(model: nn.Module, config: TrainConfig, run: dict) -> dict:
    """What a checkpoint must match: the config (minus bookkeeping), the caller's description, the trainable shapes."""
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IDENTITY}
    shapes = {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    return {"config": settings, "run": run, "parameters": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]}


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


# --- checkpoints ------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    step: int,
    identity: dict,
    losses: list[float],
    evaluations: list[dict],
) -> None:
    """Write the full training state to `path` atomically (temporary file, then rename); collective under FSDP."""
    model_state, optimizer_state = full_state(model, optimizer)
    if not world().is_main:
        return
    payload = {
        "step": step,
        "identity": identity,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "losses": losses,
        "evaluations": evaluations,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save(payload, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, identity: dict) -> dict:
    """Read a checkpoint and refuse it if it belongs to another run or config."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:  # a truncated or foreign file
        raise SlimlmError(
            f"cannot read checkpoint '{path}' ({type(err).__name__})",
            "delete it to start over, or point checkpoint_dir elsewhere",
        ) from None
    if not isinstance(payload, dict) or "identity" not in payload:
        raise SlimlmError(
            f"'{path}' is not a slimlm training checkpoint",
            "delete it to start over, or point checkpoint_dir elsewhere",
        )
    if payload["identity"] != identity:
        differences = "; ".join(_differences(payload["identity"], identity)[:4])
        raise SlimlmError(
            f"checkpoint '{path}' (step {payload['step']}) belongs to another run or config ({differences})",
            "resume with the same settings, or use another checkpoint_dir (or delete the checkpoint) to start over",
        )
    return payload


# --- the loop ---------------------------------------------------------------------------------------------------


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights and optimizer state); plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _grad_norm(model: nn.Module, clip_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    config: TrainConfig,
    eval_fn: EvalFn | None = None,
    run: dict | None = None,
    description: str = "train",
    wrap_optimizer: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = None,
) -> TrainResult:
    """Train `model` in place for `config.steps` optimizer steps of `loss_fn(model, batch)`; resumes from
    `config.checkpoint_dir/last.pt` when it exists and matches. Under `torchrun` pass a model already sharded with
    `slimlm.train.distributed.shard_`. `run` describes anything else that defines the run (teacher, loss, …).
    `wrap_optimizer` turns the AdamW/Adafactor optimizer into another that steps it (Opacus' DPOptimizer: per-sample
    clipping and noise before each step)."""
    place = world()
    if config.batch_size % place.size:
        raise SlimlmError(
            f"batch_size {config.batch_size} does not split evenly over {place.size} processes",
            f"use a batch_size divisible by {place.size}",
        )
    if place.size > 1 and not is_sharded(model):
        raise SlimlmError(
            "training under torchrun needs a sharded model", "call slimlm.train.distributed.shard_(model, blocks) first"
        )
    device = next(model.parameters()).device
    identity = run_identity(model, config, {**(run or {}), "data": source.describe()})
    optimizer = build_optimizer(model, config)
    if wrap_optimizer is not None:
        optimizer = wrap_optimizer(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    checkpoint = Path(config.checkpoint_dir) / CHECKPOINT if config.checkpoint_dir else None
    result = TrainResult(steps=0, losses=[])
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if checkpoint is not None and checkpoint.is_file():
        payload = load_checkpoint(checkpoint, identity)
        load_full_state_(model, optimizer, payload["model"], payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        _set_rng_state(payload["rng"])
        result = TrainResult(
            steps=payload["step"],
            losses=payload["losses"],
            evaluations=payload["evaluations"],
            resumed_from=payload["step"],
        )

    def save(step: int) -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, scheduler, step, identity, result.losses, result.evaluations)

    was_training = model.training
    model.train()
    in_update = False
    start = time.perf_counter()
    step = result.steps
    try:
        with _progress(description, config.steps, result.steps, place.is_main) as report:
            for step in range(result.steps, config.steps):
                step_loss = torch.zeros((), device=device)
                seqlen = 0
                for micro in range(config.grad_accum):
                    samples = micro_batch_samples(step, micro, config, place.rank, place.size)
                    batch = _to(source.batch(samples), device)
                    seqlen = batch["input_ids"].shape[-1]
                    if is_sharded(model):  # reduce-scatter gradients only after the last micro-step
                        model.set_requires_gradient_sync(micro == config.grad_accum - 1)
                    try:
                        with _autocast(device):
                            loss = loss_fn(model, batch) / config.grad_accum
                        loss.backward()
                    except torch.OutOfMemoryError:
                        raise SlimlmError(
                            f"out of memory at step {step + 1}: micro-batch of {len(samples)} sequences × {seqlen} tokens per process (batch_size {config.batch_size}, grad_accum {config.grad_accum})",
                            "lower batch_size (and raise grad_accum to keep the tokens per step) or seqlen",
                        ) from None
                    step_loss += loss.detach().float()
                    result.tokens += batch["input_ids"].numel() * place.size
                step_loss = float(all_mean(step_loss))
                norm = _grad_norm(model, config.clip_norm)
                if not math.isfinite(step_loss) or not math.isfinite(norm):
                    what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                    optimizer.zero_grad(set_to_none=True)
                    save(step)  # the parameters are still those after step `step`: the last good state
                    kept = (
                        f"the last good state (after step {step}) is in {checkpoint}"
                        if checkpoint
                        else "no checkpoint_dir was set, so nothing was saved"
                    )
                    raise SlimlmError(
                        f"{description}: the {what} became {step_loss if what == 'loss' else norm} at step {step + 1}; training stopped, {kept}",
                        "lower lr, raise warmup_steps or set clip_norm; check the data and the teacher's outputs",
                    )
                in_update = True
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                in_update = False
                result.losses.append(step_loss)
                result.steps = step + 1
                result.seconds = time.perf_counter() - start
                if config.eval_every and result.steps % config.eval_every == 0 and eval_fn is not None:
                    model.eval()
                    with torch.no_grad():
                        result.evaluations.append({"step": result.steps, **eval_fn(model)})
                    model.train()
                if (
                    config.checkpoint_every
                    and result.steps % config.checkpoint_every == 0
                    and result.steps < config.steps
                ):
                    save(result.steps)
                report(step_loss, result.tokens_per_second)
        save(result.steps)
    except KeyboardInterrupt:
        # Between optimizer steps the state is consistent: keep it. Mid-update (or with other processes to agree with) it is not.
        if not in_update and place.size == 1:
            save(result.steps)
        raise
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


@contextmanager
def _progress(description: str, total: int, done: int, show: bool) -> Iterator[Callable[[float, float], None]]:
    """Yield `report(loss, tokens_per_second)`: a bar with the step's loss and tokens/s (rich, on stderr; silent with
    SLIMLM_QUIET=1 and on every process but the first)."""
    if quiet() or not show:
        yield lambda loss, rate: None
        return
    columns = bar_columns(TextColumn("loss {task.fields[loss]:.4f} · {task.fields[rate]:,.0f} tok/s"))
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, completed=done, loss=float("nan"), rate=0.0)
        yield lambda loss, rate: progress.update(task, advance=1, loss=loss, rate=rate)
