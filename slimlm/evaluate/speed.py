"""Prefill and decode speed, measured like gpt-fast: warm-up, synchronize, median of repeats, batch 1.

On CPU these are wall-clock figures of this process's threads; they say nothing about other machines.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Speed:
    prefill_tokens_per_s: float  # prompt tokens / time of one forward over the prompt
    decode_tokens_per_s: float  # new tokens / time to generate them one by one with the KV cache
    prompt_tokens: int
    new_tokens: int
    repeats: int
    device: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_speed(model: nn.Module, prompt_tokens: int = 512, new_tokens: int = 128, repeats: int = 3, seed: int = 0) -> Speed:
    """Median prefill and decode throughput on a random prompt (greedy, KV cache, no early stop)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=generator).to(device)
    prefill, decode = [], []
    for attempt in range(repeats + 1):  # the first round warms up kernels and allocator
        _sync(device)
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        _sync(device)
        prefill_s = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode_s = time.perf_counter() - start
        if attempt:
            prefill.append(prompt_tokens / prefill_s)
            decode.append(new_tokens / decode_s)
    return Speed(statistics.median(prefill), statistics.median(decode), prompt_tokens, new_tokens, repeats, str(device))
