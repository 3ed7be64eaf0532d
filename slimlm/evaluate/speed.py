"""Latency, throughput, memory and energy of generation, measured like gpt-fast: warm-up, synchronize, median of
repeats, greedy decoding with the KV cache, no early stop, random prompts (content does not change the cost).

- TTFT (time to first token): one forward over the prompt plus choosing the first new token, batch 1.
- TPOT (time per output token): decode time / new tokens after the first, batch 1.
- Throughput at batch B: B x new tokens / decode time (generated tokens per second once the prompt is read).
- Peak memory during the measurement: resident set size of this process (its high-water mark is reset first where
  Linux allows it, else the process-wide peak since start, which the result says) and, on CUDA, the allocator's peak.
- Energy: hardware counters only (slimlm.evaluate.energy); joules per decoded token (the prompt's forward not
  counted), batch 1 and per batch size.
  Without a readable meter the figures are None and `energy_meter` says why.

On CPU every figure is wall-clock time of this process's threads on this machine (`threads` says how many).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.evaluate.energy import EnergyMeter, energy_meter


@dataclass(frozen=True)
class SpeedSettings:
    prompt_tokens: int = 512  # prompt of the batch-1 latency runs
    new_tokens: int = 128  # tokens decoded after the first one in each latency run (TPOT's denominator)
    repeats: int = 3  # measured runs after one warm-up run; figures are medians
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # throughput runs
    throughput_prompt_tokens: int = 128
    throughput_new_tokens: int = 32  # tokens decoded after the first one in each throughput run
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "repeats", "throughput_prompt_tokens", "throughput_new_tokens"):
            if getattr(self, name) < 1:
                raise SlimlmError(
                    f"speed setting {name} must be at least 1, got {getattr(self, name)}", "pass a positive number"
                )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise SlimlmError(f"batch sizes must be positive, got {self.batch_sizes}", "pass e.g. 1,8,32")


@dataclass(frozen=True)
class Speed:
    prefill_tokens_per_s: float  # prompt tokens / median prefill time, batch 1
    decode_tokens_per_s: float  # 1 / TPOT, batch 1
    prompt_tokens: int
    new_tokens: int
    repeats: int
    device: str  # e.g. "cpu (2 threads)" or "cuda:0 (NVIDIA H100)"
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    throughput_tokens_per_s: dict[int, float] = field(default_factory=dict)  # batch size -> generated tokens/s
    cpu_peak_rss_mb: float = 0.0
    cpu_peak_scope: str = ""  # "this measurement" or "process since start"
    cuda_max_allocated_mb: float | None = None
    energy_joules_per_token: float | None = None  # batch-1 decode; None without a meter
    energy_joules_per_token_by_batch: dict[int, float] = field(default_factory=dict)
    energy_meter: str = ""  # the meter, or "unavailable: why"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def _reset_cpu_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux: write 5 to /proc/self/clear_refs); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    from slimlm.evaluate.footprint import peak_memory

    return peak_memory()["cpu_peak_rss_mb"]


def _generate(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device, meter: EnergyMeter | None
) -> tuple[float, float, float | None]:
    """Greedy generation with the KV cache: seconds to the first token, seconds and joules for the other
    `new_tokens - 1` (joules None without a meter)."""
    _sync(device)
    start = time.perf_counter()
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    first = time.perf_counter() - start
    energy = meter.read() if meter else 0.0
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    rest = time.perf_counter() - start
    return first, rest, (meter.read() - energy if meter else None)


@torch.inference_mode()
def measure_speed(model: nn.Module, settings: SpeedSettings = SpeedSettings()) -> Speed:
    """TTFT, TPOT, throughput per batch size, peak memory and energy of `model`, on the device it is on."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = model.config.vocab_size
    meter, meter_note = energy_meter(device)
    scoped = _reset_cpu_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        prompt = torch.randint(0, vocab, (1, settings.prompt_tokens), generator=generator).to(device)
        firsts, rests, joules = [], [], []
        for attempt in range(settings.repeats + 1):  # the first round warms up kernels and the allocator
            first, rest, energy = _generate(model, prompt, settings.new_tokens + 1, device, meter)
            if attempt:
                firsts.append(first)
                rests.append(rest)
                if energy is not None:
                    joules.append(energy / settings.new_tokens)
        throughput, joules_by_batch = {}, {}
        for batch in settings.batch_sizes:
            prompts = torch.randint(0, vocab, (batch, settings.throughput_prompt_tokens), generator=generator).to(
                device
            )
            runs, energies = [], []
            for attempt in range(settings.repeats + 1):
                _, rest, energy = _generate(model, prompts, settings.throughput_new_tokens + 1, device, meter)
                if attempt:
                    runs.append(batch * settings.throughput_new_tokens / rest)
                    if energy is not None:
                        energies.append(energy / (batch * settings.throughput_new_tokens))
            throughput[batch] = statistics.median(runs)
            if energies:
                joules_by_batch[batch] = statistics.median(energies)
    finally:
        model.train(was_training)
    ttft = statistics.median(firsts)
    tpot = statistics.median(rests) / settings.new_tokens
    return Speed(
        prefill_tokens_per_s=settings.prompt_tokens / ttft,
        decode_tokens_per_s=1 / tpot,
        prompt_tokens=settings.prompt_tokens,
        new_tokens=settings.new_tokens,
        repeats=settings.repeats,
        device=describe_device(device),
        ttft_ms=ttft * 1000,
        tpot_ms=tpot * 1000,
        throughput_tokens_per_s=throughput,
        cpu_peak_rss_mb=_cpu_peak_mb(),
        cpu_peak_scope="this measurement" if scoped else "process since start",
        cuda_max_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        energy_joules_per_token=statistics.median(joules) if joules else None,
        energy_joules_per_token_by_batch=joules_by_batch,
        energy_meter=meter.name if meter else meter_note,
    )
