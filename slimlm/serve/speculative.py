"""Speculative decoding (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al., 2023, "Accelerating LLM Decoding with Speculative Sampling").

Each round the draft proposes k tokens d₁..d_k one at a time (cheap), then the target scores all of them in ONE
forward over [last, d₁..d_k], giving its distributions p₀..p_k. Token d_i is accepted with probability
min(1, p_{i-1}(d_i) / q_{i-1}(d_i)); at the first rejection the target's token is drawn from norm(max(0, p - q))
and the round ends; if all k are accepted one more token is drawn from p_k. The output follows the target's
distribution exactly. Greedy (temp <= 0) is the one-hot case: accept while d_i == argmax p_{i-1}, then take the
target's argmax, so the text is the target's own greedy text token for token.

Rejected tokens are dropped from both KV caches with `Cache.crop(-n)` (transformers' negative count). Sliding-window
layers record their past (`activate_past_recording`) so they can roll back too. slimlm's KIVI cache cannot roll
back (its old tokens are quantized in place): `load_backend` refuses `--kv-bits` with `--draft`.

The acceptance rate of a compressed model drafting for its own parent measures how often the two agree on the
next token under the target's own sampling: a fidelity figure that needs no data set. `slimlm.evaluate.speculative`
measures it (this loop, timed, for `slimlm eval --draft`; and exactly, without the loop, for greedy decoding).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch import nn

from slimlm.serve.forward import forward
from slimlm.serve.sampling import SamplingSettings, draw, make_generator, probabilities


class Drafter(Protocol):
    """What proposes tokens: a context it extends and rolls back (transformers' `ModuleDrafter`, llama.cpp's
    `serve.backends.LlamaCppDrafter`, so a GGUF in llama.cpp can draft for a model in transformers)."""

    length: int  # tokens of context it holds

    def extend(self, ids: list[int]): ...  # next-token logits (V,) after appending `ids`

    def rollback(self, length: int) -> None: ...  # keep the first `length` tokens


class ModuleDrafter:
    """A transformers model drafting over its own KV cache, cropped on rejection."""

    def __init__(self, model: nn.Module):
        self.model, self.cache, self.length = model, _recording_cache(model), 0

    def extend(self, ids: list[int]):
        logits = forward(self.model, ids, self.cache)[-1]
        self.length += len(ids)
        return logits

    def rollback(self, length: int) -> None:
        self.cache.crop(-(self.length - length))  # crop(0) still trims sliding-window layers back to their window
        self.length = length


def _recording_cache(model: nn.Module):
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()  # sliding-window layers keep what a crop may need back
    return cache


def speculative_tokens(
    target: nn.Module,
    draft: Drafter,
    prompt_ids: list[int],
    settings: SamplingSettings,
    draft_tokens: int,
    stats: dict,
    context_length: int | None = None,
) -> Iterator[int]:
    """Token ids of the target's answer, `draft_tokens` proposed per round by `draft` (a fresh context). `stats` is
    filled as it runs: drafted, accepted, rounds, target_forwards."""
    import torch

    generator = make_generator(settings.seed)
    target_cache = _recording_cache(target)
    limit = context_length or context_positions(target)
    stats.update(drafted=0, accepted=0, rounds=0, target_forwards=1, draft_tokens=draft_tokens)

    def pick(probs) -> int:
        return int(probs.argmax()) if settings.greedy else draw(probs, generator)

    ids = list(prompt_ids)
    target_len = len(ids)  # tokens the target's cache holds; ids[-1] is never in it at a round's start
    first = forward(target, ids, target_cache)[-1]
    vocab = first.shape[-1]
    token = pick(probabilities(first, settings))
    ids.append(token)
    yield token
    while True:
        k = max(0, min(draft_tokens, limit - len(ids) - 1))  # the verify forward must fit the positions
        drafts, q = [], []
        if k:
            logits = draft.extend(ids[draft.length :])
            for i in range(k):
                q.append(probabilities(_fit(logits, vocab), settings))
                drafts.append(pick(q[-1]))
                if i < k - 1:
                    logits = draft.extend(drafts[-1:])
        # (k + 1, V): the target's prediction after `last` and after each draft token, in one forward
        rows = forward(target, ids[target_len:] + drafts, target_cache)[-(k + 1) :]
        target_len = len(ids) + k
        stats["target_forwards"] += 1
        accepted, next_token = 0, None
        for i, proposed in enumerate(drafts):
            p = probabilities(rows[i], settings)
            ratio = p[proposed] / q[i][proposed]
            # greedy: p and q are one-hot, the ratio is 1 exactly when the target's argmax is the proposal
            if ratio >= 1.0 if settings.greedy else bool(torch.rand((), generator=generator) < ratio):
                accepted += 1
                continue
            residual = (p - q[i]).clamp(min=0.0)
            next_token = pick(residual / residual.sum() if residual.sum() > 0 else p)
            break
        if next_token is None:
            next_token = pick(probabilities(rows[k], settings))
        target_cache.crop(-(k - accepted))  # crop(0) still trims sliding-window layers back to their window
        target_len -= k - accepted
        if k:
            draft.rollback(min(draft.length, len(ids) + accepted))
            stats["rounds"] += 1
            stats["drafted"] += k
            stats["accepted"] += accepted
        for token in [*drafts[:accepted], next_token]:
            ids.append(token)
            yield token


def _fit(logits, vocab: int):
    """The draft's logits over the target's `vocab` ids: an embedding padded past the tokenizer (or not) must not
    change which ids exist; ids the draft lacks get probability 0."""
    import torch

    if logits.shape[-1] == vocab:
        return logits
    if logits.shape[-1] > vocab:
        return logits[:vocab]
    return torch.cat([logits, logits.new_full((vocab - logits.shape[-1],), float("-inf"))])


def context_positions(model: nn.Module) -> int:
    """Positions the model holds (what `TransformersBackend.context_length` reads)."""
    config = model.config.get_text_config(decoder=True)
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))
