"""Memorization check: exposure of inserted canaries (Carlini et al. 2019, "The Secret Sharer").

N random secrets ("my secret code 3 is 482193") are inserted `repeats` times each into the fine-tuning data. After
training, each true secret's log-perplexity (the summed NLL of its digits after the prefix) is ranked among M
random candidates of the same form:

    exposure = log2(M + 1) − log2(rank)          rank 1 = the true secret is the most likely of all M + 1

A model that never saw the secret ranks it uniformly (expected exposure ≈ 1 bit); full memorization gives
log2(M + 1) (≈ 10 bits for M = 1023). DP-SGD bounds what one row can change, so it keeps exposure near chance.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.finetune.data import IGNORE, Rows, pad_id_of, pad_rows
from slimlm.finetune.peft_methods import per_sample_nll

DIGITS = 6  # secret length: 10^6 possible secrets
CANDIDATES = 1023  # random candidates each true secret is ranked among
SCORE_BATCH = 128


@dataclass(frozen=True)
class Canary:
    prefix: str  # "my secret code 3 is"
    secret: str  # " 482193" (leading space: the digits are a word of their own after the prefix)

    @property
    def text(self) -> str:
        return self.prefix + self.secret


def make_canaries(count: int, seed: int) -> list[Canary]:
    """`count` secrets of DIGITS random digits, seeded."""
    draw = random.Random(seed * 7919 + 17)
    return [
        Canary(f"my secret code {k} is", " " + "".join(draw.choice("0123456789") for _ in range(DIGITS)))
        for k in range(count)
    ]


def scored_rows(tokenizer, prefix: str, secrets: list[str]) -> Rows:
    """Rows of `prefix + secret` with labels on the secret's tokens only (found by character offsets)."""
    examples = []
    for secret in secrets:
        encoded = tokenizer(prefix + secret, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = encoded["input_ids"]
        labels = [
            token if start >= len(prefix) else IGNORE for token, (start, _) in zip(ids, encoded["offset_mapping"])
        ]
        examples.append((ids, labels))
    return pad_rows(examples, pad_id_of(tokenizer), f"canary '{prefix}'")


def canary_rows(canaries: list[Canary], tokenizer, repeats: int) -> Rows:
    """The training rows that plant the canaries: each full text `repeats` times, the loss on all of it."""
    examples = []
    for canary in canaries:
        ids = tokenizer(canary.text, add_special_tokens=False, verbose=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        examples += [(ids, ids)] * repeats
    return pad_rows(examples, pad_id_of(tokenizer), f"{len(canaries)} canaries x {repeats}")


@torch.no_grad()
def log_perplexities(model: nn.Module, rows: Rows) -> torch.Tensor:
    """(N,) summed NLL of each row's labelled tokens."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), SCORE_BATCH):
        batch = {k: v.to(device) for k, v in rows.take(range(start, min(start + SCORE_BATCH, len(rows)))).items()}
        total, _ = per_sample_nll(model, batch)
        out.append(total.float().cpu())
    return torch.cat(out)


def exposure(model: nn.Module, tokenizer, canaries: list[Canary], candidates: int = CANDIDATES, seed: int = 0) -> dict:
    """Each canary's rank and exposure among `candidates` random secrets (seeded; never the true one), and the mean."""
    draw = random.Random(seed * 104729 + 3)
    was_training = model.training
    model.eval()
    results = []
    try:
        for canary in canaries:
            others: set[str] = set()
            while len(others) < candidates:
                guess = " " + "".join(draw.choice("0123456789") for _ in range(DIGITS))
                if guess != canary.secret:
                    others.add(guess)
            scores = log_perplexities(model, scored_rows(tokenizer, canary.prefix, [canary.secret, *sorted(others)]))
            rank = 1 + int((scores[1:] < scores[0]).sum())
            results.append(
                {"prefix": canary.prefix, "rank": rank, "exposure": math.log2(candidates + 1) - math.log2(rank)}
            )
    finally:
        model.train(was_training)
    mean = sum(r["exposure"] for r in results) / len(results) if results else 0.0
    return {
        "canaries": results,
        "mean_exposure": mean,
        "max_exposure": math.log2(candidates + 1),
        "candidates": candidates,
        "protocol": f"Carlini et al. 2019: rank of each {DIGITS}-digit secret's log-perplexity among {candidates} random ones",
    }


def read_canaries(path) -> list[Canary]:
    """The canaries a `slimlm finetune --canaries N` run planted (its OUT/canaries.json)."""
    import json
    from pathlib import Path

    from slimlm.errors import SlimlmError

    try:
        entries = json.loads(Path(path).read_text())
        return [Canary(entry["prefix"], entry["secret"]) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SlimlmError(
            f"cannot read canaries from '{path}' ({type(err).__name__})",
            "pass the canaries.json that slimlm finetune --canaries wrote",
        ) from None
