"""Speculative decoding measured: how often a draft's tokens are the target's, and what that buys in speed.

One set of prompts for both measurements: the first `prompts` of QUESTIONS, each a user turn through the target's
chat template (plain completion when it has none), answered greedily with at most `new_tokens` tokens.

- `speculative_table` runs the real speculative path (`slimlm.serve.speculative.speculative_tokens` through
  `slimlm.serve.backends.generate`, what `slimlm chat --draft` runs). Per k (tokens drafted per round):
  identical: every answer is the target's own greedy answer, token for token (checked against the target alone);
  acceptance = accepted / drafted; accepted per round = mean accepted length per target verify step; tokens per
  target forward = (accepted + rounds) / rounds, the speed-up if drafting were free; decode tok/s (tokens after the
  first over the seconds from first token to last, summed over the prompts) and speed-up against the target alone.
  Wall time on a shared CPU: the table carries the load average before and after.
- `greedy_acceptance` gives the same acceptance counts exactly, with no speculative loop. Greedy speculative
  decoding commits the target's greedy tokens y₁ y₂ …; a round that starts after y₁..y_c proposes
  d_i = argmax q(· | prompt, y₁..y_c, d₁..d_{i-1}) and accepts d_i iff d_i = y_{c+i}. While it accepts, the draft's
  context *is* the target's answer, so d_i is the draft's teacher-forced argmax at position c+i: one draft forward
  over prompt + y gives every match m_t = [argmax q(· | prompt, y_<t) = y_t], and a round accepts the run of matches
  from position c+1 on (at most k), then commits one more target token. The rounds are replayed with
  `speculative_tokens`'s context cap and `generate`'s stopping (end of turn or `new_tokens`; the last round's drafts
  may look past the stop, so the target's answer is decoded k tokens further), so the counts are the real loop's
  (up to argmax near-ties between a cached and a one-pass forward). The target's answers are decoded once and
  reused for every draft: `slimlm eval --base` and `slimlm run` report the acceptance of each compressed model
  drafting for its parent as a fidelity figure (how often it picks the parent's next token) at a few seconds' cost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from slimlm.errors import SlimlmError
from slimlm.serve.settings import DRAFT_TOKENS
from slimlm.settings import SettingError

QUESTIONS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
    "What is machine learning?",
    "How do I boil an egg?",
)
WARMUP_TOKENS = 8  # greedy tokens of one untimed answer per configuration before the timed ones


@dataclass(frozen=True)
class SpeculativeSettings:
    """What a speculative-decoding measurement runs: greedy answers to the fixed QUESTIONS."""

    draft_tokens: tuple[int, ...] = (2, 4)  # k, tokens the draft proposes per target forward: one row (or figure) each
    prompts: int = 4  # the first N of QUESTIONS
    new_tokens: int = 64  # greedy tokens per answer at most (an end-of-turn token ends one sooner)

    def __post_init__(self) -> None:
        ks = self.draft_tokens
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise SettingError(
                "SpeculativeSettings", "draft_tokens", ks, "must be one or more whole numbers of at least 1", "2,4"
            )
        if (
            isinstance(self.prompts, bool)
            or not isinstance(self.prompts, int)
            or not 1 <= self.prompts <= len(QUESTIONS)
        ):
            raise SettingError(
                "SpeculativeSettings",
                "prompts",
                self.prompts,
                f"must be 1 to {len(QUESTIONS)} (the fixed questions)",
                "2",
            )
        if isinstance(self.new_tokens, bool) or not isinstance(self.new_tokens, int) or self.new_tokens < 1:
            raise SettingError("SpeculativeSettings", "new_tokens", self.new_tokens, "must be at least 1", "64")

    def describe(self) -> str:
        return f"{self.prompts} chat prompts × ≤{self.new_tokens} greedy tokens, k = {', '.join(map(str, self.draft_tokens))}"


SPECULATIVE = SpeculativeSettings()  # `slimlm eval --draft`
# The fidelity figure of `slimlm eval --base` and `slimlm run`: the serving default k, two short answers. It costs
# prompts × (new_tokens + k) decode steps of the base, once, plus one forward over each answer per compressed model.
ACCEPTANCE = SpeculativeSettings(draft_tokens=(DRAFT_TOKENS,), prompts=2, new_tokens=32)


def question_prompts(tokenizer, count: int) -> list[list[int]]:
    """The first `count` QUESTIONS as prompt ids: a user turn through the tokenizer's chat template, ending where the
    assistant speaks (as `TransformersBackend.render_chat` renders it), or the bare question without a template."""
    prompts = []
    for question in QUESTIONS[:count]:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            prompts.append(tokenizer(question)["input_ids"])
    return prompts


# --- exact greedy acceptance (no speculative loop) --------------------------------------------------------------


@dataclass(frozen=True)
class TokensOf:
    """What `check_draft` compares of a model (its tokenizer and end-of-turn ids), for a model kept as it is:
    a `TransformersBackend` would unpack its int4 linears in place, changing what is evaluated after."""

    source: str
    tokenizer: object
    end_ids: frozenset[int]

    @classmethod
    def of(cls, loaded) -> TokensOf:
        from slimlm.serve.backends import turn_end_ids

        return cls(loaded.source, loaded.tokenizer, frozenset(turn_end_ids(loaded.model, loaded.tokenizer)))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


@dataclass(frozen=True)
class GreedyAnswers:
    """The target's greedy answers, decoded k tokens past where `generate` stops: what drafts are scored on."""

    prompts: list[list[int]]
    continuations: list[list[int]]  # the target's greedy tokens after each prompt, end-of-turn tokens included
    stops: list[int]  # tokens `generate` consumes per answer (its end-of-turn token included)
    context_length: int
    settings: SpeculativeSettings


@dataclass(frozen=True)
class Acceptance:
    """Greedy speculative-decoding counts of one draft for one target at one k."""

    draft_tokens: int  # k
    drafted: int
    accepted: int
    rounds: int  # target verify steps that checked drafts
    answer_tokens: int  # tokens of the target's answers (end-of-turn tokens included)
    acceptance: float  # accepted / drafted
    accepted_per_round: float  # mean accepted length per target verify step
    prompts: int
    new_tokens: int


def greedy_answers(
    model, tokenizer, settings: SpeculativeSettings = ACCEPTANCE, end_ids: set[int] | frozenset[int] = frozenset()
) -> GreedyAnswers:
    """Decode the target `model` greedily on the settings' prompts (one token per forward over a KV cache, as
    `slimlm chat` does), `max(draft_tokens)` tokens past each answer's stop (an `end_ids` token or new_tokens)."""
    from slimlm.quantize.kv_cache import make_cache
    from slimlm.serve.forward import forward
    from slimlm.serve.speculative import context_positions

    context, k_max = context_positions(model), max(settings.draft_tokens)
    prompts = question_prompts(tokenizer, settings.prompts)
    continuations, stops = [], []
    for prompt in prompts:
        if len(prompt) >= context:
            raise SlimlmError(
                f"a fixed prompt is {len(prompt)} tokens, the model's context holds {context}",
                "use a model with a longer context",
            )
        limit, room = min(settings.new_tokens, context - len(prompt)), context - len(prompt)
        cache, tokens, stop = make_cache(model, None), [], None
        logits = forward(model, prompt, cache)[-1]
        while True:
            tokens.append(int(logits.argmax()))
            if stop is None and (tokens[-1] in end_ids or len(tokens) == limit):
                stop = len(tokens)
            if len(tokens) >= room or (stop is not None and len(tokens) >= stop - 1 + k_max):
                break
            logits = forward(model, tokens[-1:], cache)[-1]
        continuations.append(tokens)
        stops.append(stop or len(tokens))
    return GreedyAnswers(prompts, continuations, stops, context, settings)


def greedy_acceptance(draft, answers: GreedyAnswers) -> list[Acceptance]:
    """The acceptance of `draft` (a module) for the target whose greedy `answers` these are, one figure per k of
    `answers.settings`: one teacher-forced draft forward per answer, the rounds replayed exactly (module docstring)."""
    import torch

    from slimlm.serve.forward import forward

    matches = []
    for prompt, tokens in zip(answers.prompts, answers.continuations):
        logits = forward(draft, prompt + tokens[:-1], None)[
            len(prompt) - 1 :
        ]  # (len(tokens), V): row t predicts tokens[t]
        matches.append((logits.argmax(-1).cpu() == torch.tensor(tokens)).tolist())
    results = []
    for k in answers.settings.draft_tokens:
        drafted = accepted = rounds = 0
        for prompt, match, stop in zip(answers.prompts, matches, answers.stops):
            counts = _replay_rounds(match, stop, len(prompt), answers.context_length, k)
            drafted, accepted, rounds = drafted + counts[0], accepted + counts[1], rounds + counts[2]
        results.append(
            Acceptance(
                k,
                drafted,
                accepted,
                rounds,
                sum(answers.stops),
                accepted / drafted if drafted else 0.0,
                accepted / rounds if rounds else 0.0,
                len(answers.prompts),
                answers.settings.new_tokens,
            )
        )
    return results


def _replay_rounds(match: list[bool], stop: int, prompt_len: int, context: int, k: int) -> tuple[int, int, int]:
    """(drafted, accepted, rounds) of `speculative_tokens` until `stop` tokens are out; match[t]: the draft's
    teacher-forced argmax is the target's token t."""
    drafted = accepted = rounds = 0
    committed = 1  # the first token comes from the target's prefill, before any round
    while committed < stop:
        k_round = max(0, min(k, context - (prompt_len + committed) - 1))  # the verify forward must fit the positions
        run = 0
        while run < k_round and match[committed + run]:
            run += 1
        if k_round:
            drafted, accepted, rounds = drafted + k_round, accepted + run, rounds + 1
        committed += run + 1  # the accepted drafts, then the target's own token
    return drafted, accepted, rounds


# --- the real speculative path, timed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeculativeRow:
    """One configuration: the target alone (draft None, k 0) or the target with a draft proposing k per round."""

    draft: str | None
    draft_tokens: int
    tokens: int  # answer tokens over every prompt
    decode_s: float  # first token to last, summed over the prompts
    decode_tokens_per_s: float | None  # tokens after each answer's first over decode_s
    speedup: float | None  # decode tok/s over the target alone's
    identical: bool | None  # every answer is the target's own greedy answer, token for token
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    acceptance: float | None = None
    accepted_per_round: float | None = None
    tokens_per_target_forward: float = 1.0


def speculative_table(
    target, drafts: Sequence, settings: SpeculativeSettings = SPECULATIVE, progress: Callable[[str], None] | None = None
) -> dict:
    """Greedy answers of `target` (a `TransformersBackend`) alone, then with each draft backend at each k of
    `settings`: the rows of `SpeculativeRow` and what they were measured under (JSON-ready)."""
    import torch

    from slimlm.evaluate.llama_cpp import load_average
    from slimlm.serve.backends import check_draft, generate
    from slimlm.serve.sampling import SamplingSettings

    if target.kv_cache is not None:
        raise SlimlmError(
            f"{target.source} carries a quantized KV-cache setting, which cannot be rolled back for speculative decoding",
            "measure a copy of the model without the kv-cache stage",
        )
    for draft in drafts:
        check_draft(target, draft)  # before any timing
    answer_settings = SamplingSettings(temp=0.0, max_tokens=settings.new_tokens)
    warmup = SamplingSettings(temp=0.0, max_tokens=WARMUP_TOKENS)
    prompts = question_prompts(target.tokenizer, settings.prompts)

    def answers(backend) -> list:
        list(generate(backend, prompts[0], warmup))  # first-call allocations and kernel choices stay out of the timing
        out = [generate(backend, prompt, answer_settings) for prompt in prompts]
        for result in out:  # one at a time: a Generation streams when iterated
            list(result)
        return out

    load_before = load_average()
    started = time.perf_counter()
    alone = answers(target)
    rows = [_row(None, 0, alone, None, None)]
    for draft in drafts:
        for k in settings.draft_tokens:
            runs = answers(target.with_draft(draft, k))
            rows.append(_row(draft.source, k, runs, alone, rows[0]))
            if progress:  # a slow machine: one line per configuration
                progress(
                    f"measured {draft.source} k={k}: {rows[-1].accepted}/{rows[-1].drafted} drafts accepted, {rows[-1].decode_s:.1f} s decoding"
                )
    return {
        "target": target.source,
        "description": target.description,
        "settings": asdict(settings),
        "prompt_tokens": [len(p) for p in prompts],
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "load": [load_before, load_average()],
        "seconds": time.perf_counter() - started,
        "drafts": [f"{draft.source} in {draft.engine}" for draft in drafts],
        "rows": [asdict(row) for row in rows],
    }


def _row(
    draft: str | None, k: int, runs: list, alone: list | None = None, base: SpeculativeRow | None = None
) -> SpeculativeRow:
    """The row of one configuration's answers; `alone` and `base`: the target alone's answers and row (None: this is it)."""
    tokens, seconds = sum(r.completion_tokens for r in runs), sum(r.decode_s for r in runs)
    decoded = sum(max(r.completion_tokens - 1, 0) for r in runs)
    speed = decoded / seconds if seconds > 0 else None
    if alone is None or base is None:
        return SpeculativeRow(None, 0, tokens, seconds, speed, 1.0 if speed else None, None)
    drafted, accepted, rounds = (
        sum((r.speculative or {}).get(key, 0) for r in runs) for key in ("drafted", "accepted", "rounds")
    )
    return SpeculativeRow(
        draft,
        k,
        tokens,
        seconds,
        speed,
        speedup=speed / base.decode_tokens_per_s if speed and base.decode_tokens_per_s else None,
        identical=[r.token_ids for r in runs] == [a.token_ids for a in alone],
        drafted=drafted,
        accepted=accepted,
        rounds=rounds,
        acceptance=accepted / drafted if drafted else None,
        accepted_per_round=accepted / rounds if rounds else None,
        tokens_per_target_forward=(accepted + rounds) / rounds if rounds else 1.0,
    )


def evaluate_speculative(
    target: str,
    drafts: Sequence[str],
    settings: SpeculativeSettings = SPECULATIVE,
    device: str | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    allow_pickle: bool = False,
) -> dict:
    """`speculative_table` for models named as `slimlm chat` names them: the target in transformers on `threads` torch
    threads (restored after), each draft where `serve.backends.load_draft` puts it (a .gguf in llama.cpp on as many
    threads). A draft with another tokenizer is refused before any timing."""
    import torch

    from slimlm.models.load import load_model
    from slimlm.progress import stage
    from slimlm.serve.backends import TransformersBackend, load_draft

    if threads is not None and threads < 1:
        raise SlimlmError(f"threads must be at least 1, got {threads}", "pass e.g. --threads 2")
    previous = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with stage(f"loading {target} and {', '.join(drafts)}"):
            target_backend = TransformersBackend(load_model(target, allow_pickle=allow_pickle, device=device))
            draft_backends = [
                load_draft(draft, device=device, threads=threads, allow_pickle=allow_pickle) for draft in drafts
            ]
        with stage(f"speculative decoding: {settings.describe()}"):
            return speculative_table(target_backend, draft_backends, settings, progress)
    finally:
        torch.set_num_threads(previous)


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of a `speculative_table` result (the CLI prints them with rich, the benchmark as Markdown)."""
    headers = [
        "draft",
        "k",
        "identical to target",
        "acceptance",
        "accepted per round",
        "tokens per target forward",
        "decode tok/s",
        "speed-up",
    ]
    rows = []
    for row in result["rows"]:
        speed = "—" if row["decode_tokens_per_s"] is None else f"{row['decode_tokens_per_s']:.1f}"
        speedup = "—" if row["speedup"] is None else f"{row['speedup']:.2f}×"
        if row["draft"] is None:
            rows.append([f"(target alone) {result['target']}", "–", "–", "–", "–", "1.00", speed, speedup])
            continue
        rows.append(
            [
                row["draft"],
                str(row["draft_tokens"]),
                "yes" if row["identical"] else "NO",
                "—" if row["acceptance"] is None else f"{row['acceptance']:.1%}",
                "—" if row["accepted_per_round"] is None else f"{row['accepted_per_round']:.2f}",
                f"{row['tokens_per_target_forward']:.2f}",
                speed,
                speedup,
            ]
        )
    return headers, rows


def describe(result: dict) -> str:
    """The line printed with every table: what was run, and how loaded the shared machine was."""
    settings = result["settings"]
    return (
        f"target {result['target']} (transformers, {result['threads']} threads; drafts: {', '.join(result['drafts'])}), {len(result['prompt_tokens'])} prompts × ≤{settings['new_tokens']} "
        f"greedy tokens; decode tok/s = tokens after the first / seconds from first token to last; load average {result['load'][0]} → "
        f"{result['load'][1]} on {result['cores']} cores"
    )
