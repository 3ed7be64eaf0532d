"""Perplexity under the GPTQ protocol, plus KL divergence and top-1 agreement against the base model, in one pass.

GPTQ protocol (Frantar et al., 2022; also SparseGPT, Wanda): tokenize the whole evaluation text once, cut it into
`n = n_tokens // seqlen` non-overlapping windows (trailing tokens dropped), run each window alone with no context
carried over, and take `ppl = exp(mean NLL)` over the `seqlen - 1` predicted tokens of every window. When the
tokenizer itself puts a BOS token in front of what it encodes (Llama, Gemma, Mistral; not GPT-2 or SmolLM2), each
window is that BOS and then `seqlen - 1` text tokens, as lm-eval and llama.cpp score such models: the loss still
covers `seqlen - 1` text tokens per window, and no text token is dropped into the BOS slot.

Perplexity alone hides how a compressed model's distribution moved; KL(base || compressed) per token and the share
of positions whose top-1 token is unchanged show it directly, from the same forward passes. The base is kept as its
top-k log-probs per position plus the log of the rest's mass (the sparse KL of EvoPress, Sieberling et al., 2024),
so what is kept is O(tokens * k) whatever the vocabulary, and the KL is computed over the k tokens and one "rest"
bucket: a lower bound of the full KL (coarser partitions never raise it), equal to it when k covers the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from slimlm.data.calibration import tokenize_text
from slimlm.data.text import Text
from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    from slimlm.quantize.kv_cache import KVCacheConfig

# Base log-probs kept per position for the KL; the rest of the vocabulary is kept as one mass. On SmolLM2 (49k vocab,
# 4 windows, rtn-w4-g64) the KL is 0.2840 at 4096 against 0.2850 exact (0.2800 at 1024, 0.2695 at 256).
KL_TOP_K = 4096
ROWS_PER_STEP = 256  # positions whose log-softmax is materialised at once: bounds the float32 copy of the logits


@dataclass(frozen=True, eq=False)
class EvalWindows:
    input_ids: torch.Tensor  # (n_windows, seqlen) int64
    source: str  # Text.label
    seqlen: int
    total_windows: int  # windows the whole text holds; more than n_windows when max_windows cut the evaluation short
    bos_token_id: int | None = None  # set when every window starts with the tokenizer's BOS (the tokenizer adds one)

    def protocol(self) -> str:
        """One line for reports: what exactly the perplexity was computed on."""
        n = self.input_ids.shape[0]
        count = f"{n} non-overlapping windows"
        if n < self.total_windows:
            count = f"the first {n} of {self.total_windows} non-overlapping windows"
        if self.bos_token_id is None:
            return (
                f"GPTQ protocol: {count} x {self.seqlen} tokens of {self.source}; no BOS (the tokenizer adds none); "
                "loss on tokens 2..L of each window"
            )
        return (
            f"GPTQ protocol: {count} x {self.seqlen} tokens of {self.source}; each window is the tokenizer's BOS "
            f"(id {self.bos_token_id}, as the tokenizer adds it) then {self.seqlen - 1} text tokens; "
            "loss on tokens 2..L of each window"
        )


def bos_token_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer's own encoding starts with it (its `add_bos_token` / post-processor), else None:
    the model was trained to see it, so perplexity windows carry it too."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", verbose=False)["input_ids"]  # the tokenizer's default special-token behaviour
    return bos if ids and ids[0] == bos else None


def make_windows(tokenizer, text: Text, seqlen: int = 2048, max_windows: int | None = None) -> EvalWindows:
    """Cut the tokenized text into the GPTQ protocol's windows (each led by BOS when the tokenizer adds one);
    `max_windows` keeps only the first ones (quicker, but then not the paper-comparable number, which `protocol()`
    says). Compare recipes on one `EvalWindows` made once, from the base's tokenizer."""
    if seqlen < 2:
        raise SlimlmError(
            f"evaluation windows need at least 2 tokens, got seqlen={seqlen}", "pass seqlen >= 2 (GPTQ uses 2048)"
        )
    if max_windows is not None and max_windows < 1:
        raise SlimlmError(
            f"max_windows must be at least 1, got {max_windows}", "pass max_windows >= 1, or none for every window"
        )
    ids = tokenize_text(tokenizer, text.text)  # (n_tokens,)
    bos = bos_token_id(tokenizer)
    step = seqlen if bos is None else seqlen - 1  # text tokens per window
    total = ids.numel() // step
    if total == 0:
        raise SlimlmError(
            f"{text.label} has only {ids.numel()} tokens, fewer than one window of {seqlen}",
            "use a shorter seqlen or a longer text",
        )
    n = total if max_windows is None else min(total, max_windows)
    windows = ids[: n * step].view(n, step)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)  # (n, seqlen)
    return EvalWindows(input_ids=windows, source=text.label, seqlen=seqlen, total_windows=total, bos_token_id=bos)


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
    """The base model's predictions on the first k windows, kept (CPU) to score compressed variants against: per
    position its `top_k` largest log-probs, their token ids, and the log of the probability of every other token.
    Memory: k * seqlen * (8 * top_k + 4) bytes whatever the vocabulary (64 MB per 2048-token window at
    top_k=4096, against 400 MB for full float32 log-probs at a 49k vocabulary and 2 GB at 262k)."""

    top_log_probs: list[torch.Tensor]  # each (seqlen, top_k) float32, largest first
    top_ids: list[torch.Tensor]  # each (seqlen, top_k) int32
    rest_log_mass: list[torch.Tensor]  # each (seqlen,) float32: log(1 - sum of the top_k probabilities)
    input_ids: torch.Tensor  # (k, seqlen): the windows they belong to, checked before comparing
    vocab: int

    @property
    def top_k(self) -> int:
        return self.top_ids[0].shape[-1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.top_log_probs, *self.top_ids, *self.rest_log_mass))

    def describe(self) -> str:
        """What the KL was computed from, for the protocol line."""
        k = self.input_ids.shape[0]
        if self.top_k >= self.vocab:
            return f"KL(base || model) and top-1 agreement on the first {k} windows, over the full vocabulary"
        return (
            f"KL(base || model) and top-1 agreement on the first {k} windows; KL over the base's top-{self.top_k} "
            f"tokens per position plus the rest's mass as one bucket (sparse KL, a lower bound; vocabulary {self.vocab})"
        )


def evaluate_quality(
    model: nn.Module,
    windows: EvalWindows,
    reference: ReferenceLogits | None = None,
    keep_reference: int = 0,
    progress: bool = True,
    kv_cache: KVCacheConfig | None = None,
    chunk_size: int | None = None,
    top_k: int = KL_TOP_K,
) -> tuple[QualityResult, ReferenceLogits | None]:
    """Perplexity of `model` on `windows` (one forward per window, batch 1, no KV cache), and with `reference`
    the KL(reference || model) and top-1 agreement over the windows the reference covers. `keep_reference=k`
    returns this model's top-`top_k` log-probs (and the rest's mass) of the first k windows (at most all of them)
    to serve as a later reference. The model runs in eval mode and is put back in the mode it was in.

    KV cache in the loop: with `chunk_size` (or a `kv_cache` setting, which defaults the chunk to 128) each window
    is fed `chunk_size` tokens at a time through a cache, so later tokens attend to what the cache holds of earlier
    ones: a KIVI quantized cache, or without `kv_cache` a plain DynamicCache (same numbers as one forward, up to
    float rounding). The protocol line says which."""
    from slimlm.progress import progress_bar
    from slimlm.quantize.kv_cache import (
        DEFAULT_CHUNK,
        chunked_protocol,
        forward_in_chunks,
        make_cache,
    )

    if kv_cache is not None and chunk_size is None:
        chunk_size = DEFAULT_CHUNK
    tally = QualityTally(windows, reference, keep_reference, top_k)
    device = next(model.parameters()).device
    n = windows.input_ids.shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), progress_bar("perplexity", n, unit="windows", show=progress) as advance:
            for i in range(n):
                ids = windows.input_ids[i : i + 1].to(device)  # (1, L)
                if chunk_size is None:
                    logits = model(ids, use_cache=False).logits[0]  # (L, V)
                else:
                    logits = forward_in_chunks(model, ids, chunk_size, make_cache(model, kv_cache))
                tally.add(i, logits)
                del logits
                advance()
    finally:
        model.train(was_training)
    return tally.result("" if chunk_size is None else chunked_protocol(kv_cache, chunk_size))


class QualityTally:
    """The running sums of one evaluation, fed one window's logits at a time. Every engine's logits (transformers
    here, llama.cpp in `slimlm.evaluate.llama_cpp`) go through this same code, so their perplexity, KL and top-1
    agreement are directly comparable."""

    def __init__(
        self,
        windows: EvalWindows,
        reference: ReferenceLogits | None = None,
        keep_reference: int = 0,
        top_k: int = KL_TOP_K,
    ):
        if keep_reference < 0:
            raise SlimlmError(
                f"keep_reference must be >= 0, got {keep_reference}", "pass the number of windows to keep, or 0"
            )
        if top_k < 1:
            raise SlimlmError(
                f"top_k must be at least 1, got {top_k}",
                f"pass the base log-probs to keep per position (default {KL_TOP_K})",
            )
        if reference is not None and not _same_windows(reference, windows):
            raise SlimlmError(
                "the reference log-probs were computed on other windows than the ones being evaluated",
                "evaluate the base model and its compressed variants on the same EvalWindows",
            )
        self.windows, self.reference, self.top_k = windows, reference, top_k
        self.keep = min(keep_reference, windows.input_ids.shape[0])
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.nll_sum, self.kl_sum, self.agree, self.vocab, self.seen = 0.0, 0.0, 0, 0, 0

    def add(self, i: int, logits: torch.Tensor) -> None:
        """Score window `i` (in order) from its logits (L, V), any float dtype, on any device."""
        reference, seqlen = self.reference, self.windows.seqlen
        if i != self.seen or tuple(logits.shape[:1]) != (seqlen,):
            raise ValueError(f"window {i} given out of order or with {logits.shape[0]} positions instead of {seqlen}")
        device = logits.device
        ids = self.windows.input_ids[i].to(device)  # (L,)
        self.vocab = logits.shape[-1]
        compare = reference is not None and i < reference.input_ids.shape[0]
        if compare and reference.vocab != self.vocab:
            raise SlimlmError(
                f"the reference has a vocabulary of {reference.vocab} tokens, this model {self.vocab}",
                "KL needs the same vocabulary and seqlen as the reference model",
            )
        window_kept = []
        for rows in range(0, seqlen, ROWS_PER_STEP):  # (R, V) float32 at a time, not (L, V)
            log_probs = torch.log_softmax(logits[rows : rows + ROWS_PER_STEP].float(), dim=-1)  # (R, V)
            targets = ids[rows + 1 : rows + 1 + log_probs.shape[0]]  # position t predicts token t+1
            self.nll_sum -= log_probs[: targets.numel()].gather(-1, targets[:, None]).sum().item()
            if compare:
                part = slice(rows, rows + log_probs.shape[0])
                ref = (reference.top_log_probs[i][part], reference.top_ids[i][part], reference.rest_log_mass[i][part])
                self.kl_sum += sparse_kl(*(t.to(device) for t in ref), log_probs).sum().item()
                self.agree += (log_probs.argmax(-1) == ref[1][:, 0].to(device)).sum().item()
            if i < self.keep:
                window_kept.append(top_k_and_rest(log_probs, self.top_k))
        if i < self.keep:
            self.kept.append(tuple(torch.cat(parts).cpu() for parts in zip(*window_kept)))
        self.seen += 1

    def result(self, protocol_note: str = "") -> tuple[QualityResult, ReferenceLogits | None]:
        """The figures over every window added; `protocol_note` (how the logits were computed) joins the protocol line."""
        windows, reference = self.windows, self.reference
        n, seqlen = windows.input_ids.shape
        if self.seen != n:
            raise ValueError(f"{self.seen} of {n} windows were scored")
        nll = self.nll_sum / (n * (seqlen - 1))
        kl_windows = reference.input_ids.shape[0] if reference is not None else 0
        protocol = windows.protocol() + (f"; {protocol_note}" if protocol_note else "")
        result = QualityResult(
            perplexity=math.exp(nll),
            nll=nll,
            windows=n,
            seqlen=seqlen,
            protocol=protocol + (f"; {reference.describe()}" if reference is not None else ""),
            kl_divergence=self.kl_sum / (kl_windows * seqlen) if reference is not None else None,
            top1_agreement=self.agree / (kl_windows * seqlen) if reference is not None else None,
            kl_windows=kl_windows,
        )
        if not self.keep:
            return result, None
        values, ids, rest = (list(column) for column in zip(*self.kept))
        return result, ReferenceLogits(values, ids, rest, windows.input_ids[: self.keep].clone(), self.vocab)


def top_k_and_rest(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, V) log-probs -> the k largest (R, k), their ids (R, k) int32, and log of the rest's mass (R,)."""
    values, ids = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1, sorted=True)
    return values, ids.to(torch.int32), _log_one_minus_exp(values.logsumexp(-1))


def sparse_kl(
    top_log_p: torch.Tensor, top_ids: torch.Tensor, rest_log_p: torch.Tensor, log_q: torch.Tensor
) -> torch.Tensor:
    """KL(p || q) per position over the partition {each of p's top-k tokens, everything else}:
    sum_i p_i (log p_i - log q_i) + P_rest (log P_rest - log Q_rest), with Q_rest = 1 - sum_i q_i over the same k.
    Shapes: top_log_p, top_ids (R, k); rest_log_p (R,); log_q (R, V) -> (R,)."""
    top_log_q = log_q.gather(-1, top_ids.long())  # (R, k)
    top = (top_log_p.exp() * (top_log_p - top_log_q)).sum(-1)  # (R,)
    rest_log_q = _log_one_minus_exp(top_log_q.logsumexp(-1))  # (R,)
    return top + rest_log_p.exp() * (rest_log_p - rest_log_q)


def _log_one_minus_exp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - x) from log x <= 0, accurate near x = 1 (-expm1); floored at the tiniest float, so that a model
    that put all its mass on the base's top-k still gets a finite (large) rest term instead of inf or nan."""
    return (-torch.expm1(log_x.clamp(max=0.0))).clamp(min=torch.finfo(log_x.dtype).tiny).log()


def _same_windows(reference: ReferenceLogits, windows: EvalWindows) -> bool:
    k = reference.input_ids.shape[0]
    return (
        0 < k == len(reference.top_ids)
        and k <= windows.input_ids.shape[0]
        and reference.input_ids.shape[1] == windows.input_ids.shape[1]
        and torch.equal(reference.input_ids, windows.input_ids[:k])
    )
