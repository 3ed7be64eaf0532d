"""Token sampling with llama.cpp's names, defaults and order, and stop strings over streamed text.

llama.cpp's default sampler chain (common/sampling.cpp) is  top-k → top-p → min-p → temperature → draw,  so top-p
and min-p see the *untempered* distribution; `temp <= 0` is greedy (argmax). The same chain here means a
`--temp 0.7 --top-k 40` run asks the same of a transformers model as of `llama-cli`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from slimlm.settings import SettingError

# llama.cpp's defaults (common/common.h, `common_params_sampling`); n_predict -1 = until end of turn or context.
DEFAULT_TEMP, DEFAULT_TOP_K, DEFAULT_TOP_P, DEFAULT_MIN_P = 0.8, 40, 0.95, 0.05
DEFAULT_N_PREDICT, DEFAULT_SEED = -1, -1


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen and when an answer ends."""

    temp: float = DEFAULT_TEMP  # <= 0: greedy
    top_k: int = DEFAULT_TOP_K  # 0: off
    top_p: float = DEFAULT_TOP_P  # 1.0: off
    min_p: float = DEFAULT_MIN_P  # 0.0: off; keep tokens with p >= min_p · p_max
    max_tokens: int = DEFAULT_N_PREDICT  # -1: until end of turn or the context is full
    seed: int = DEFAULT_SEED  # -1: a fresh random seed per answer
    stop: tuple[str, ...] = field(default=())  # answer ends before the first of these strings

    def __post_init__(self) -> None:
        def refuse(name: str, requirement: str, example: str) -> None:
            raise SettingError("SamplingSettings", name, getattr(self, name), requirement, example)

        if not self.temp == self.temp:  # NaN
            refuse("temp", "must be a number", "0.8")
        if self.top_k < 0:
            refuse("top_k", "must be 0 (off) or more", "40")
        if not 0.0 < self.top_p <= 1.0:
            refuse("top_p", "must be in (0, 1]", "0.95")
        if not 0.0 <= self.min_p <= 1.0:
            refuse("min_p", "must be in [0, 1]", "0.05")
        if self.max_tokens < -1 or self.max_tokens == 0:
            refuse("max_tokens", "must be positive, or -1 for no limit", "256")
        if any(not s for s in self.stop):
            refuse("stop", "stop strings must not be empty", "'\\n\\n'")

    @property
    def greedy(self) -> bool:
        return self.temp <= 0

    def with_seed(self, seed: int) -> SamplingSettings:
        return replace(self, seed=seed)


GREEDY = SamplingSettings(temp=0.0)


def probabilities(logits, settings: SamplingSettings):
    """The distribution (V,) the next token is drawn from: top-k, top-p, min-p on the raw softmax, then temperature
    over what is left (llama.cpp's order). Greedy settings give a one-hot at the argmax."""
    import torch

    logits = logits.float()
    if settings.greedy:
        probs = torch.zeros_like(logits)
        probs[logits.argmax()] = 1.0
        return probs
    keep = torch.ones_like(logits, dtype=torch.bool)
    if 0 < settings.top_k < logits.numel():
        keep &= logits >= torch.topk(logits, settings.top_k).values[-1]
    masked = logits.masked_fill(~keep, float("-inf"))
    if settings.top_p < 1.0:
        probs = masked.softmax(-1)
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        drop_sorted = before >= settings.top_p  # keep the smallest head whose mass reaches top_p
        keep &= ~torch.zeros_like(keep).scatter(0, order, drop_sorted)
        masked = logits.masked_fill(~keep, float("-inf"))
    if settings.min_p > 0.0:
        probs = masked.softmax(-1)
        keep &= probs >= settings.min_p * probs.max()
        masked = logits.masked_fill(~keep, float("-inf"))
    return (masked / settings.temp).softmax(-1)


def draw(probs, generator) -> int:
    """One token id from `probs` (V,) with `generator` (a seeded torch.Generator)."""
    import torch

    return int(torch.multinomial(probs, 1, generator=generator).item())


def make_generator(seed: int):
    """A torch.Generator seeded with `seed`; -1 draws a fresh seed (llama.cpp's LLAMA_DEFAULT_SEED)."""
    import torch

    generator = torch.Generator()
    if seed == -1:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class StopStrings:
    """Cut streamed text at the first stop string. `feed` returns what is safe to show now: text that could still
    turn out to be the start of a stop string is held back until the next piece decides it."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            shown, self.pending = self.pending[: min(hits)], ""
            return shown
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        shown = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(shown) :]
        return shown

    def flush(self) -> str:
        """What was held back, once the answer ended for another reason."""
        shown, self.pending = ("" if self.stopped else self.pending), ""
        return shown
