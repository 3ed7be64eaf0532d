"""Data augmentation for `slimlm finetune`: a teacher writes extra training rows from the training split (A Survey
of Small Language Models §3.2.2: AugGPT, Dai et al. 2023, rephrases every sample with an LLM; LLM2LLM, Lee et al.
2024, has a teacher write new examples for the student). The default teacher is the model being fine-tuned.

From each training row, `copies` new rows, by the row's kind:
- chat (loss on the answers): the teacher answers the row's last prompt (everything before its last answer, earlier
  turns included); the new row is that prompt + the teacher's answer, the loss on the answer only, with its
  end-of-turn token when the teacher ended it (an answer cut at the token budget gets none, so the student is not
  taught to stop mid-sentence).
- text (loss on every token), the teacher has a chat template: it rewrites the text (REWRITE); the new row is the
  rewrite, the loss on every token.
- text, no chat template: the teacher continues the row's first half; the new row is that half + the
  continuation, the loss on the continuation.

Rows are sampled by distillation's batched generator (`slimlm.distill.data.generate`): left-padded batches of
similar prompt lengths, each seeded by (seed, its first index). Generated rows that are empty, loop (`repetitive`),
or repeat the original or another generated row are dropped and counted. Only the rows given (the training split,
after the held-out split) reach the teacher, so the held-out split is never augmented nor leaks into training.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch import nn

from slimlm.distill.data import SamplingSettings, generate
from slimlm.errors import SlimlmError
from slimlm.finetune.data import IGNORE, Rows, concat_rows, pad_id_of, pad_rows, render_chat
from slimlm.finetune.settings import AUGMENT_TOP_P, FinetuneSettings
from slimlm.progress import progress_bar

REWRITE = "Rewrite the following text in other words:\n\n"
BATCH = 8  # sequences per generation call
NGRAM = 4  # a generated row whose NGRAM-grams are under MIN_DISTINCT distinct is a loop, not text
MIN_DISTINCT = 0.5


@dataclass(frozen=True)
class Request:
    """One row to have written: what the teacher continues and what the new row keeps before its output."""

    kind: str  # answer (chat), rewrite or continuation (text)
    teacher_ids: list[int]  # the teacher's prompt
    prefix: list[int]  # the new row's tokens before the generated ones, no loss on them
    original: str  # what the row already holds in that place (answer, text, continuation): not to be repeated
    budget: int  # most tokens to generate (the new row fits seqlen)


def requests(rows: Rows, tokenizer, seqlen: int, new_tokens: int) -> list[Request]:
    """What to generate for each row of `rows` (see the module docstring); a conversation cut before its answer,
    empty text or a one-token row gives nothing to prompt with and is skipped."""
    out = []
    template = bool(getattr(tokenizer, "chat_template", None))
    for ids, labels, mask in zip(rows.input_ids, rows.labels, rows.attention_mask):
        n = int(mask.sum())
        ids, labels = ids[:n].tolist(), labels[:n].tolist()
        if template and IGNORE not in labels:  # text, rewritten through the chat template
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if text.strip():
                prompt = render_chat(tokenizer, [{"role": "user", "content": REWRITE + text}], True, "augmentation")
                teacher_ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
                out.append(Request("rewrite", teacher_ids, [], text, min(new_tokens, seqlen)))
            continue
        if IGNORE in labels:  # chat: the last answer starts where the last run of labelled tokens does
            starts = [t for t in range(1, n) if labels[t] != IGNORE and labels[t - 1] == IGNORE]
            kind, cut = "answer", starts[-1] if starts else 0
        else:  # text, continued from its first half
            kind, cut = "continuation", n // 2
        if cut > 0:  # the teacher continues ids[:cut]; the row holds ids[cut:] there already
            original = tokenizer.decode(ids[cut:], skip_special_tokens=True)
            out.append(Request(kind, ids[:cut], ids[:cut], original, min(new_tokens, seqlen - cut)))
    return out


def sample_outputs(
    teacher: nn.Module, wanted: list[Request], copies: int, sampling: SamplingSettings, seed: int, pad_id: int
) -> list[list[int]]:
    """The teacher's tokens for `copies` rows of each request (output i belongs to request i // copies), at most its
    budget each. Prompts are sorted by length so that a batch pads little."""
    order = sorted(range(len(wanted) * copies), key=lambda i: len(wanted[i // copies].teacher_ids))
    outputs: list[list[int]] = [[] for _ in order]
    with progress_bar("augmenting: the teacher writes rows", len(order), unit="rows") as advance:
        for start in range(0, len(order), BATCH):
            batch = [wanted[i // copies] for i in order[start : start + BATCH]]
            width = max(len(r.teacher_ids) for r in batch)
            prompts = torch.full((len(batch), width), pad_id, dtype=torch.int64)  # (b, P), left-padded
            mask = torch.zeros_like(prompts)
            for row, request in enumerate(batch):
                prompts[row, width - len(request.teacher_ids) :] = torch.tensor(request.teacher_ids)
                mask[row, width - len(request.teacher_ids) :] = 1
            ids = generate(
                teacher,
                prompts,
                max(r.budget for r in batch),
                sampling,
                seed * 1_000_003 + start,
                sampling.greedy_tokens,
                attention_mask=mask,
            )
            for row, (index, request) in enumerate(zip(order[start : start + BATCH], batch)):
                outputs[index] = ids[row, width : width + request.budget].tolist()
                advance()
    return outputs


def repetitive(ids: list[int]) -> bool:
    """Whether the tokens loop: fewer than MIN_DISTINCT of their NGRAM-grams are distinct (a model stuck repeating a
    phrase writes the same few n-grams over and over; text rarely repeats one)."""
    grams = [tuple(ids[t : t + NGRAM]) for t in range(len(ids) - NGRAM + 1)]
    return bool(grams) and len(set(grams)) < MIN_DISTINCT * len(grams)


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def rejection(content: list[int], key: tuple, seen: set[tuple]) -> str | None:
    """Why a generated row is dropped (empty, repetitive, duplicate of an original or of an earlier generated row),
    or None to keep it. `key` is (prefix, normalized text); `seen` holds the originals' and the kept rows' keys."""
    if not key[1]:
        return "empty"
    if repetitive(content):
        return "repetitive"
    if key in seen:
        return "duplicate"
    return None


def augment_rows(
    rows: Rows,
    teacher: nn.Module,
    tokenizer,
    end_ids: set[int],
    copies: int,
    new_tokens: int,
    seqlen: int,
    sampling: SamplingSettings,
    seed: int,
) -> tuple[Rows, dict]:
    """`rows` followed by the kept teacher-written rows, and what happened (counts by kind and by reason dropped).
    `end_ids`: the tokens that end the teacher's turn (kept on a chat answer, cut from text)."""
    start = time.perf_counter()
    wanted = requests(rows, tokenizer, seqlen, new_tokens)
    outputs = sample_outputs(teacher, wanted, copies, sampling, seed, pad_id_of(tokenizer)) if wanted else []
    seen = {(tuple(r.prefix), normalized(r.original)) for r in wanted}
    examples: list[tuple[list[int], list[int]]] = []
    dropped: Counter = Counter()
    unfinished = 0
    for index, output in enumerate(outputs):
        request = wanted[index // copies]
        end = next((t for t, token in enumerate(output) if token in end_ids), None)
        content = output if end is None else output[:end]
        unfinished += end is None
        key = (tuple(request.prefix), normalized(tokenizer.decode(content, skip_special_tokens=True)))
        reason = rejection(content, key, seen)
        if reason is not None:
            dropped[reason] += 1
            continue
        seen.add(key)
        written = content + [output[end]] if request.kind == "answer" and end is not None else content
        examples.append((request.prefix + written, [IGNORE] * len(request.prefix) + written))
    record = {
        "rows_in": len(rows),
        "prompts": len(wanted),
        "kinds": dict(Counter(r.kind for r in wanted)),
        "generated": len(outputs),
        "kept": len(examples),
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dict(dropped),
        "cut_at_budget": unfinished,
        "seconds": time.perf_counter() - start,
    }
    if not examples:
        return rows, record
    pad_id = pad_id_of(tokenizer)
    return concat_rows(rows, pad_rows(examples, pad_id, f"{len(examples)} teacher-written rows"), pad_id), record


def augment_training(
    rows: Rows, model: nn.Module, tokenizer, settings: FinetuneSettings, model_source: str, allow_pickle: bool = False
) -> tuple[Rows, dict]:
    """The training rows with `settings.augment` teacher-written rows per example, and the record for the manifest.
    The teacher is `settings.augment_teacher` (loaded beside `model`, refused unless it shares the tokenizer) or
    `model` itself, before any adapter is added."""
    from slimlm.serve.backends import turn_end_ids

    teacher, teacher_tokenizer, source = model, tokenizer, model_source
    if settings.augment_teacher is not None:
        from slimlm.distill.stage import same_tokenizer
        from slimlm.models.load import load_model

        loaded = load_model(
            settings.augment_teacher, allow_pickle=allow_pickle, device=str(next(model.parameters()).device)
        )
        if not same_tokenizer(tokenizer, loaded.tokenizer):
            raise SlimlmError(
                f"the augmentation teacher {settings.augment_teacher} does not share the tokenizer of {model_source} (the same text gives other token ids)",
                "augment with a model of the same family and tokenizer, or drop --augment-teacher (the model then teaches itself)",
            )
        teacher, teacher_tokenizer, source = loaded.model, loaded.tokenizer, settings.augment_teacher
    sampling = SamplingSettings(temperature=settings.augment_temperature, top_p=AUGMENT_TOP_P, greedy_tokens=0)
    augmented, record = augment_rows(
        rows,
        teacher,
        teacher_tokenizer,
        turn_end_ids(teacher, teacher_tokenizer),
        settings.augment,
        settings.augment_tokens,
        settings.seqlen,
        sampling,
        settings.seed,
    )
    return augmented, {
        "teacher": source,
        "per_example": settings.augment,
        "new_tokens": settings.augment_tokens,
        "sampling": asdict(sampling),
        **record,
    }
