"""Log-likelihood of continuations given contexts, as lm-evaluation-harness 0.4.x computes it, but faster.

What is computed (lm-eval's `HFLM.loglikelihood`): for a request (context, continuation),
- trailing spaces of the context move to the front of the continuation;
- `context_ids = encode(context)`, `whole = encode(context + continuation)`, `continuation_ids = whole[len(context_ids):]`
  (no special tokens; an empty context becomes the BOS token, or EOS when there is none);
- the model reads `context_ids + continuation_ids[:-1]`; the result is `sum_t log p(continuation_ids[t] | prefix)`
  and whether every continuation token is the argmax (`is_greedy`).

How it is made fast: requests that share a context are packed into ONE row,
`context | continuation_1 | continuation_2 | ...`, with a block attention mask (each continuation sees the whole
context and itself, causally, never another continuation) and position ids that restart after the context for
every continuation. The context is read once instead of once per choice, and each continuation's scores are
exactly those of `context + continuation` run alone (up to float summation order). Rows are sorted by length and
batched under a token budget, so padding stays small. A context with a single continuation (LAMBADA, WinoGrande)
gains nothing from packing: such rows are right-padded and run under the model's own causal mask (padding comes
after every real token, so it is never attended), which keeps attention on its fastest kernel; so do requests
longer than a sliding attention window (Mistral, Gemma 2/3), which a hand-made mask would not honour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float  # sum over continuation tokens of log p(token | everything before it), nats
    is_greedy: bool  # every continuation token is the model's argmax at its position
    tokens: int  # continuation tokens scored


@dataclass(frozen=True)
class _Group:
    """One context and the continuations scored against it, already tokenized."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    request_ids: tuple[int, ...]  # index of each continuation's request in the caller's list

    @property
    def length(self) -> int:  # tokens of the packed row (the last continuation token is never read)
        return len(self.context) + sum(len(c) for c in self.continuations) - 1


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4's `loglikelihood` tokenization: ids of the context and of the continuation as it follows that
    context. The tokenizer adds its own special tokens as configured (e.g. BOS for Llama-2 and Gemma, none for
    SmolLM2); an empty context becomes the BOS token (EOS without one) unless the continuation starts with it."""
    if continuation == "":
        raise SlimlmError(
            f"empty continuation after context {context[-40:]!r}", "every choice of a task must be a non-empty string"
        )
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if prefix is None:
            raise SlimlmError(
                "an empty context needs a BOS or EOS token to condition on",
                "use a tokenizer that defines bos_token or eos_token",
            )
        return ([prefix], ids) if not ids or ids[0] != prefix else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer(context + continuation)["input_ids"])
    context_ids = list(tokenizer(context)["input_ids"])
    return context_ids, whole[len(context_ids) :]


def _max_length(model: nn.Module) -> int:
    """Longest sequence the model takes (lm-eval's `max_length` lookup order), at most 2**20."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, 2**20)
    return 2048


def _sliding_window(model: nn.Module) -> int | None:
    config = model.config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


@torch.inference_mode()
def score_requests(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    token_budget: int = 2048,
    advance: Callable[[int], None] | None = None,
) -> list[LogLikelihood]:
    """Log-likelihood of each (context, continuation) in `requests`, in their order.

    `token_budget` caps the tokens of one forward (rows x padded length); one longer row runs alone.
    `advance(n)` is called with the number of requests finished after each batch (for progress bars).
    """
    max_length = _max_length(model)
    grouped: dict[tuple[int, ...], list[tuple[tuple[int, ...], int]]] = {}
    for index, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise SlimlmError(f"continuation {continuation!r} encodes to no tokens", "check the task's choices")
        grouped.setdefault(tuple(context_ids), []).append((tuple(continuation_ids), index))
    window = _sliding_window(model)
    packed: list[_Group] = []  # several continuations of one context: one row, block mask
    plain: list[_Group] = []  # one continuation per row: the model's own causal mask
    for context, items in grouped.items():
        group = _Group(context, tuple(c for c, _ in items), tuple(i for _, i in items))
        too_long = group.length > max_length or (
            window is not None and len(context) + max(len(c) for c in group.continuations) - 1 > window
        )
        if len(items) > 1 and not too_long:
            packed.append(group)
        else:
            plain += [_Group(context, (c,), (i,)) for c, i in items]
    results: list[LogLikelihood | None] = [None] * len(requests)
    device = next(model.parameters()).device
    for groups, own_masks in ((packed, False), (plain, True)):
        groups.sort(key=lambda g: -g.length)  # longest first: the first batch shows the peak memory at once
        start = 0
        while start < len(groups):
            rows = max(1, token_budget // min(groups[start].length, max_length))
            batch = groups[start : start + rows]
            start += len(batch)
            for group, scores in zip(batch, _score_batch(model, batch, max_length, device, own_masks)):
                for request_id, score in zip(group.request_ids, scores):
                    results[request_id] = score
            if advance is not None:
                advance(sum(len(g.request_ids) for g in batch))
    return results  # type: ignore[return-value]  # every request belongs to exactly one group


def _score_batch(
    model: nn.Module, batch: Sequence[_Group], max_length: int, device: torch.device, own_masks: bool
) -> list[list[LogLikelihood]]:
    """One forward over packed rows (or, with `own_masks`, right-padded single-continuation rows under the model's
    own causal masks); returns each group's continuation scores."""
    rows, positions, owners, targets = [], [], [], []
    for group in batch:
        row, pos, owner, target = _pack(group, max_length)
        rows.append(row)
        positions.append(pos)
        owners.append(owner)
        targets.append(target)
    width = max(len(r) for r in rows)
    n = len(rows)
    input_ids = torch.zeros(n, width, dtype=torch.long)
    position_ids = torch.zeros(n, width, dtype=torch.long)
    owner = torch.full((n, width), -2, dtype=torch.long)  # -2: padding, -1: context, k: continuation k
    for i, (row, pos, own) in enumerate(zip(rows, positions, owners)):
        input_ids[i, : len(row)] = torch.tensor(row)
        input_ids[i, len(row) :] = row[-1]  # any token: padding is never attended; not the pad id, which makes HF warn
        position_ids[i, : len(row)] = torch.tensor(pos)
        owner[i, : len(row)] = torch.tensor(own)
    read = torch.zeros(
        n, width, dtype=torch.bool
    )  # positions whose logits are needed: the vocab projection skips the rest
    for i, group_targets in enumerate(targets):
        for read_at, _ in group_targets:
            read[i, read_at] = True
    inputs = {"input_ids": input_ids.to(device), "use_cache": False}
    if not own_masks:
        allowed = _block_mask(owner)  # (n, 1, width, width)
        dtype = next(model.parameters()).dtype  # additive form: eager attention adds it, SDPA accepts it
        additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        inputs.update(attention_mask=additive.to(device), position_ids=position_ids.to(device))
    if _keeps_logits_by_mask(model):
        logits = model(**inputs, logits_to_keep=read.to(device)).logits  # (kept, vocab), rows in order
    else:
        logits = model(**inputs).logits[read.to(device)]  # (n, width, vocab) -> (kept, vocab)
    where = (read.flatten().cumsum(0) - 1).view(n, width)  # row position -> index into the kept logits
    out = []
    for i, group_targets in enumerate(targets):
        scores = []
        for read_at, token_ids in group_targets:
            log_probs = torch.log_softmax(logits[where[i, read_at].to(logits.device)].float(), dim=-1)  # (m, vocab)
            wanted = torch.tensor(token_ids, device=log_probs.device)
            logprob = log_probs.gather(-1, wanted[:, None]).sum().item()
            greedy = bool((log_probs.argmax(-1) == wanted).all().item())
            scores.append(LogLikelihood(logprob, greedy, len(token_ids)))
        out.append(scores)
    return out


def _keeps_logits_by_mask(model: nn.Module) -> bool:
    """Whether the model's forward takes a boolean (batch, seq) `logits_to_keep` (transformers 5's
    `slice_logits_to_keep`), so the vocab projection runs only where log-probs are read."""
    import inspect

    import transformers.modeling_utils

    return (
        hasattr(transformers.modeling_utils, "slice_logits_to_keep")
        and "logits_to_keep" in inspect.signature(model.forward).parameters
    )


def _pack(
    group: _Group, max_length: int
) -> tuple[list[int], list[int], list[int], list[tuple[list[int], tuple[int, ...]]]]:
    """Lay out one group as a row: token ids, position ids, owner per position (-1 context, k continuation k),
    and for each continuation the row positions whose logits predict its tokens, with the tokens."""
    context = list(group.context)
    if len(group.continuations) == 1:  # lm-eval keeps the last max_length + 1 tokens (left truncation)
        whole = (context + list(group.continuations[0]))[-(max_length + 1) :]
        context = whole[: len(whole) - len(group.continuations[0])]
        if not context:
            raise SlimlmError(
                f"a continuation of {len(group.continuations[0])} tokens leaves no context within the model's {max_length} positions",
                "shorten the task's choices",
            )
    row = list(context)
    pos = list(range(len(context)))
    owner = [-1] * len(context)
    targets = []
    for k, continuation in enumerate(group.continuations):
        fed = list(continuation[:-1])  # the last continuation token is only predicted, never read
        read_at = [len(context) - 1] + [len(row) + j for j in range(len(fed))]
        targets.append((read_at, continuation))
        row += fed
        pos += range(len(context), len(context) + len(fed))
        owner += [k] * len(fed)
    return row, pos, owner, targets


def _block_mask(owner: torch.Tensor) -> torch.Tensor:
    """(n, 1, L, L) bool, True = may attend: the context causally; a continuation token sees the context and the
    earlier tokens of its own continuation; a padding position sees only itself (keeps softmax finite)."""
    q_owner, k_owner = owner[:, :, None], owner[:, None, :]  # (n, L, 1), (n, 1, L)
    index = torch.arange(owner.shape[1])
    causal = index[None, :, None] >= index[None, None, :]  # (1, L, L): key at or before query in the row
    sees_context = (k_owner == -1) & (q_owner >= -1)
    same_block = (q_owner == k_owner) & (q_owner >= 0)
    padding_self = (q_owner == -2) & (index[None, :, None] == index[None, None, :])
    return ((sees_context | same_block) & causal | padding_self)[:, None]
