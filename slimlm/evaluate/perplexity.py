"""Perplexity under the GPTQ protocol, plus KL divergence and top-1 agreement against the base model, in one pass.

GPTQ protocol (Frantar et al., 2022; also SparseGPT, Wanda): tokenize the whole evaluation text once, cut it into
`n = n_tokens // seqlen` non-overlapping windows (trailing tokens dropped), run each window alone with no context
carried over, and take `ppl = exp(mean NLL)` over the `seqlen - 1` predicted tokens of every window.

Perplexity alone hides how a compressed model's distribution moved; KL(base || compressed) per token and the share
of positions whose top-1 token is unchanged show it directly, from the same forward passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from slimlm.data.calibration import tokenize_text
from slimlm.data.text import Text
from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    from slimlm.quantize.kv_cache import KVCacheConfig


@dataclass(frozen=True, eq=False)
class EvalWindows:
    input_ids: torch.Tensor  # (n_windows, seqlen) int64
    source: str  # Text.label
    seqlen: int
    total_windows: int  # windows the whole text holds; more than n_windows when max_windows cut the evaluation short

    def protocol(self) -> str:
        """One line for reports: what exactly the perplexity was computed on."""
        n = self.input_ids.shape[0]
        count = f"{n} non-overlapping windows"
        if n < self.total_windows:
            count = f"the first {n} of {self.total_windows} non-overlapping windows"
        return f"GPTQ protocol: {count} x {self.seqlen} tokens of {self.source}; loss on tokens 2..L of each window"


def make_windows(tokenizer, text: Text, seqlen: int = 2048, max_windows: int | None = None) -> EvalWindows:
    """Cut the tokenized text into the GPTQ protocol's windows; `max_windows` keeps only the first ones (quicker,
    but then not the paper-comparable number, which `protocol()` says)."""
    if seqlen < 2:
        raise SlimlmError(f"evaluation windows need at least 2 tokens, got seqlen={seqlen}", "pass seqlen >= 2 (GPTQ uses 2048)")
    if max_windows is not None and max_windows < 1:
        raise SlimlmError(f"max_windows must be at least 1, got {max_windows}", "pass max_windows >= 1, or none for every window")
    ids = tokenize_text(tokenizer, text.text)  # (n_tokens,)
    total = ids.numel() // seqlen
    if total == 0:
        raise SlimlmError(
            f"{text.label} has only {ids.numel()} tokens, fewer than one window of {seqlen}", "use a shorter seqlen or a longer text"
        )
    n = total if max_windows is None else min(total, max_windows)
    return EvalWindows(input_ids=ids[: n * seqlen].view(n, seqlen), source=text.label, seqlen=seqlen, total_windows=total)


@dataclass(frozen=True)
class QualityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, nats
    windows: int
    seqlen: int
    protocol: str
    kl_divergence: float | None  # mean over positions of KL(reference || model), nats; None without a reference
    top1_agreement: float | None  # share of positions whose argmax equals the reference's argmax
    kl_windows: int  # windows the KL and agreement cover (the reference's), 0 without a reference


@dataclass(eq=False)
class ReferenceLogits:
    """Log-probabilities of the base model for the first k windows, kept (float32, CPU) to score compressed
    variants against. Memory: k * seqlen * vocab * 4 bytes (about 400 MB per 2048-token window of a 49k vocab)."""

    log_probs: list[torch.Tensor]  # each (seqlen, vocab) float32
    input_ids: torch.Tensor  # (k, seqlen): the windows they belong to, checked before comparing


def evaluate_quality(
    model: nn.Module,
    windows: EvalWindows,
    reference: ReferenceLogits | None = None,
    keep_reference: int = 0,
    progress: bool = True,
    kv_cache: KVCacheConfig | None = None,
    chunk_size: int | None = None,
) -> tuple[QualityResult, ReferenceLogits | None]:
    """Perplexity of `model` on `windows` (one forward per window, batch 1, no KV cache), and with `reference`
    the KL(reference || model) and top-1 agreement over the windows the reference covers. `keep_reference=k`
    returns this model's log-probs of the first k windows (at most all of them) to serve as a later reference.
    The model runs in eval mode and is put back in the mode it was in.

    KV cache in the loop: with `chunk_size` (or a `kv_cache` setting, which defaults the chunk to 128) each window
    is fed `chunk_size` tokens at a time through a cache, so later tokens attend to what the cache holds of earlier
    ones: a KIVI quantized cache, or without `kv_cache` a plain DynamicCache (same numbers as one forward, up to
    float rounding). The protocol line says which."""
    from slimlm.quantize.kv_cache import (
        DEFAULT_CHUNK,
        chunked_protocol,
        forward_in_chunks,
        make_cache,
    )

    if kv_cache is not None and chunk_size is None:
        chunk_size = DEFAULT_CHUNK
    n, seqlen = windows.input_ids.shape
    if keep_reference < 0:
        raise SlimlmError(f"keep_reference must be >= 0, got {keep_reference}", "pass the number of windows to keep, or 0")
    if reference is not None and not _same_windows(reference, windows):
        raise SlimlmError(
            "the reference log-probs were computed on other windows than the ones being evaluated",
            "evaluate the base model and its compressed variants on the same EvalWindows",
        )
    device = next(model.parameters()).device
    keep = min(keep_reference, n)
    kept: list[torch.Tensor] = []
    nll_sum, kl_sum, agree = 0.0, 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in track(range(n), description="perplexity", disable=not progress, transient=True):
                ids = windows.input_ids[i : i + 1].to(device)  # (1, L)
                if chunk_size is None:
                    logits = model(ids, use_cache=False).logits[0]  # (L, V)
                else:
                    logits = forward_in_chunks(model, ids, chunk_size, make_cache(model, kv_cache))
                log_probs = torch.log_softmax(logits.float(), dim=-1)  # (L, V)
                nll_sum -= log_probs[:-1].gather(-1, ids[0, 1:, None]).sum().item()  # position t predicts token t+1
                if reference is not None and i < reference.input_ids.shape[0]:
                    ref = reference.log_probs[i].to(device)  # (L, V)
                    if ref.shape != log_probs.shape:
                        raise SlimlmError(
                            f"reference log-probs have shape {tuple(ref.shape)}, this model's {tuple(log_probs.shape)}",
                            "KL needs the same vocabulary and seqlen as the reference model",
                        )
                    # kl_div(input=log q, target=log p, log_target=True) sums p * (log p - log q) = KL(p || q).
                    kl_sum += F.kl_div(log_probs, ref, reduction="sum", log_target=True).item()
                    agree += (log_probs.argmax(-1) == ref.argmax(-1)).sum().item()
                if i < keep:
                    kept.append(log_probs.cpu())
    finally:
        model.train(was_training)
    nll = nll_sum / (n * (seqlen - 1))
    kl_windows = reference.input_ids.shape[0] if reference is not None else 0
    result = QualityResult(
        perplexity=math.exp(nll),
        nll=nll,
        windows=n,
        seqlen=seqlen,
        protocol=windows.protocol() + ("" if chunk_size is None else f"; {chunked_protocol(kv_cache, chunk_size)}"),
        kl_divergence=kl_sum / (kl_windows * seqlen) if reference is not None else None,
        top1_agreement=agree / (kl_windows * seqlen) if reference is not None else None,
        kl_windows=kl_windows,
    )
    return result, (ReferenceLogits(log_probs=kept, input_ids=windows.input_ids[:keep].clone()) if keep else None)


def _same_windows(reference: ReferenceLogits, windows: EvalWindows) -> bool:
    k = reference.input_ids.shape[0]
    return 0 < k == len(reference.log_probs) and k <= windows.input_ids.shape[0] and torch.equal(reference.input_ids, windows.input_ids[:k])
