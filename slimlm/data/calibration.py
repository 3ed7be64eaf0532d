"""GPTQ-style calibration sampling: random fixed-length windows of one long token stream.

GPTQ (Frantar et al., 2022) tokenizes the whole calibration text once and draws `n_samples` windows of
`seqlen` tokens at offsets `random.randint(0, n_tokens - seqlen - 1)`; SparseGPT and Wanda reuse it. The drawn ids
are hashed so a manifest can say exactly which calibration data produced a model.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from slimlm.data.text import Text
from slimlm.errors import SlimlmError


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    input_ids: torch.Tensor  # (n_samples, seqlen) int64
    sha256: str  # of the ids as int64 little-endian bytes, row-major
    source: str  # Text.label
    seed: int

    def describe(self) -> dict:
        """What a manifest records about the calibration data (JSON-able)."""
        n_samples, seqlen = self.input_ids.shape
        return {
            "source": self.source,
            "n_samples": n_samples,
            "seqlen": seqlen,
            "seed": self.seed,
            "sha256": self.sha256,
        }


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All of `text` as one 1-D int64 id tensor, no special tokens; `verbose=False` silences the
    "longer than the maximum sequence length" warning, which is expected here: callers cut the stream into windows."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def ids_sha256(ids: torch.Tensor) -> str:
    """sha256 of token ids as int64 little-endian bytes: the same on every machine for the same ids."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes()).hexdigest()


def sample_calibration(tokenizer, text: Text, n_samples: int, seqlen: int, seed: int = 0) -> CalibrationSet:
    """Draw `n_samples` windows of `seqlen` tokens at seeded random offsets (with `random.Random(seed)`, the
    offsets equal GPTQ's `random.seed(seed); random.randint(...)` sequence). Same seed and text, same ids."""
    if n_samples < 1:
        raise SlimlmError(
            f"calibration needs at least 1 sample, got n_samples={n_samples}", "pass n_samples >= 1 (GPTQ uses 128)"
        )
    if seqlen < 2:
        raise SlimlmError(
            f"calibration windows need at least 2 tokens, got seqlen={seqlen}", "pass seqlen >= 2 (GPTQ uses 2048)"
        )
    ids = tokenize_text(tokenizer, text.text)  # (n_tokens,)
    if ids.numel() < seqlen + 1:
        raise SlimlmError(
            f"{text.label} has only {ids.numel()} tokens, fewer than seqlen + 1 = {seqlen + 1}",
            "use a shorter seqlen or a longer calibration text",
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n_samples)]
    input_ids = torch.stack([ids[start : start + seqlen] for start in starts])  # (n_samples, seqlen)
    return CalibrationSet(input_ids=input_ids, sha256=ids_sha256(input_ids), source=text.label, seed=seed)
