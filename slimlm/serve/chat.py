"""`slimlm chat`: a terminal conversation with one model, or two side by side (`--compare`).

Each answer streams as it is generated and ends with a line of TTFT (request to first token: prefill plus one
step, the on-device latency figure) and decode tok/s. A model with a chat template keeps the conversation's
history (system prompt first) and renders it through its own template every turn; a base model without one runs
as plain completion, each line continued on its own. Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt leaves.

`--compare`: both models answer each prompt with the same sampling and seed; then the base's greedy continuation
is scored through both models (teacher forcing, one forward each) to show where their greedy outputs first part,
and the KL divergence KL(p_base ‖ p_other) at every token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from slimlm.errors import SlimlmError
from slimlm.serve.backends import Backend, Generation, check_chat_template, generate
from slimlm.serve.sampling import SamplingSettings
from slimlm.serve.settings import COMPARE_KL_TOKENS

HELP = "Ctrl-C stops an answer · Ctrl-C or Ctrl-D here leaves · /reset clears the conversation · /exit"


class Conversation:
    """The turns so far and how they become a prompt for one backend."""

    def __init__(self, backend: Backend, system: str | None):
        self.backend, self.system = backend, system
        self.turns: list[dict] = []

    @property
    def chat(self) -> bool:
        return bool(self.backend.chat_template)

    def prompt(self, text: str) -> list[int]:
        if not self.chat:
            return self.backend.encode(text)
        head = [{"role": "system", "content": self.system}] if self.system else []
        return self.backend.render_chat(head + self.turns + [{"role": "user", "content": text}])

    def add(self, text: str, answer: str) -> None:
        if self.chat:
            self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def run_chat(
    backend: Backend,
    settings: SamplingSettings,
    system: str | None = None,
    compare: Backend | None = None,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> None:
    """The loop: read a line, answer it (streaming), print the figures; until /exit, Ctrl-D or Ctrl-C."""
    for each in (backend, compare) if compare is not None else (backend,):
        check_chat_template(each)
    say = _writer(out)
    say(f"{backend.description}\n", dim=True)
    if compare is not None:
        _check_same_tokens(backend, compare)
        say(f"compared with: {compare.description}\n", dim=True)
    mode = (
        "chat, the model's own template"
        if backend.chat_template
        else "plain completion (the model has no chat template)"
    )
    if system and not backend.chat_template:
        say("--system is ignored: this model has no chat template\n", dim=True)
    say(f"{mode} · {HELP}\n", dim=True)
    conversations = [Conversation(b, system) for b in ((backend, compare) if compare is not None else (backend,))]
    _ctrl_c_interrupts()
    while True:
        try:
            text = read("> ")
        except (EOFError, KeyboardInterrupt):
            say("\nbye\n", dim=True)
            return
        if text.strip() in ("/exit", "/quit"):
            say("bye\n", dim=True)
            return
        if text.strip() == "/reset":
            for conversation in conversations:
                conversation.turns.clear()
            say("(conversation cleared)\n", dim=True)
            continue
        if not text.strip():
            continue
        try:
            if compare is None:
                _answer(conversations[0], text, settings, say)
            else:
                _compare(conversations, text, settings, say, out)
        except SlimlmError as err:
            say(f"error: {err}\n", dim=True)
        except KeyboardInterrupt:  # between the line and the first token (rendering, prefill)
            say("\n[stopped]\n", dim=True)


def _ctrl_c_interrupts() -> None:
    """Ctrl-C in the chat's own terminal stops an answer, even when the process was started with SIGINT ignored (a
    shell's background job passes that on to what it runs): at a terminal, the user pressing it means it."""
    import signal
    import threading

    if (
        sys.stdin.isatty()
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _writer(out: TextIO) -> Callable[..., None]:
    dim_on, dim_off = ("\x1b[2m", "\x1b[0m") if out.isatty() else ("", "")

    def say(text: str, dim: bool = False) -> None:
        out.write(f"{dim_on}{text}{dim_off}" if dim else text)
        out.flush()

    return say


def _answer(
    conversation: Conversation, text: str, settings: SamplingSettings, say, stream: bool = True
) -> Generation | None:
    """One answer, streamed when `stream`; Ctrl-C stops it (nothing is added to the history then)."""
    answer = generate(conversation.backend, conversation.prompt(text), settings)
    if stream and not conversation.chat:
        say(text)
    try:
        for piece in answer:
            if stream:
                say(piece)
    except KeyboardInterrupt:
        say("\n[stopped]\n", dim=True)
        return None
    if stream:
        say(f"\n[{answer.summary()}]\n", dim=True)
    conversation.add(text, answer.text)
    return answer


def _compare(conversations: list[Conversation], text: str, settings: SamplingSettings, say, out: TextIO) -> None:
    """Both answers (same settings and seed) side by side, then where greedy decoding parts and the KL per token."""
    import random
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    seeded = settings if settings.seed != -1 else replace(settings, seed=random.randrange(2**31))
    answers = []
    for conversation in conversations:
        say(f"({conversation.backend.source} answering…)\n", dim=True)
        answer = _answer(conversation, text, seeded, say, stream=False)
        if answer is None:
            return
        answers.append(answer)
    table = Table(show_lines=True, expand=True)
    for conversation, answer in zip(conversations, answers):
        table.add_column(f"{conversation.backend.source}\n{answer.summary()}", ratio=1)
    table.add_row(*((text if not c.chat else "") + a.text for c, a in zip(conversations, answers)))
    Console(file=out, highlight=False).print(table)
    say(f"(seed {seeded.seed}) " + divergence_line(conversations[0], conversations[1], text, settings) + "\n", dim=True)


def divergence_line(base: Conversation, other: Conversation, text: str, settings: SamplingSettings) -> str:
    """Where the two models' greedy outputs first differ, and KL(p_base ‖ p_other) per token over the base's greedy
    continuation (teacher forcing: both read the same tokens)."""
    report = compare_greedy(base.backend, other.backend, base.prompt(text), settings.max_tokens)
    kl = report["kl"]
    where = (
        f"greedy outputs agree on all {len(kl)} tokens"
        if report["diverges_at"] is None
        else f"greedy outputs diverge at token {report['diverges_at'] + 1}: {report['base_token']!r} vs {report['other_token']!r}"
    )
    shown = " ".join(f"{value:.3f}" for value in kl[:24]) + (" …" if len(kl) > 24 else "")
    return f"{where} · KL per token (mean {sum(kl) / max(len(kl), 1):.4f}, max {max(kl, default=0):.4f}): {shown}"


def compare_greedy(base: Backend, other: Backend, prompt_ids: list[int], max_tokens: int = -1) -> dict:
    """The base's greedy continuation of `prompt_ids`, scored by both: the first position where the other model's
    argmax differs (its own greedy output parts there, since both read the same prefix up to it) and the KL per
    token."""
    limit = COMPARE_KL_TOKENS if max_tokens == -1 else min(max_tokens, COMPARE_KL_TOKENS)
    answer = generate(base, prompt_ids, SamplingSettings(temp=0.0, max_tokens=limit))
    for _ in answer:
        pass
    continuation = answer.token_ids
    if not continuation:
        return {"kl": [], "diverges_at": None, "tokens": 0}
    ids = prompt_ids + continuation
    p, q = base.log_probs(ids, len(prompt_ids)), other.log_probs(ids, len(prompt_ids))  # (T, V) each
    vocab = min(p.shape[-1], q.shape[-1])  # padded embedding rows hold no token
    p, q = p[:, :vocab], q[:, :vocab]
    kl = (p.exp() * (p - q)).sum(-1).clamp(min=0.0).tolist()
    disagree = [i for i, (token, guess) in enumerate(zip(continuation, q.argmax(-1).tolist())) if token != guess]
    at = disagree[0] if disagree else None
    report = {"kl": kl, "diverges_at": at, "tokens": len(continuation)}
    if at is not None:
        report["base_token"] = base.detokenize([continuation[at]])
        report["other_token"] = other.detokenize([int(q[at].argmax())])
    return report


def _check_same_tokens(base: Backend, other: Backend) -> None:
    probe = "Compare: the same text must give the same token ids in both models. 1234 ünïcode"
    if base.encode(probe) != other.encode(probe):
        raise SlimlmError(
            f"{other.source} does not share the tokenizer of {base.source}: their tokens cannot be compared one by one",
            "compare models of the same family and tokenizer (e.g. a model and its slimlm-compressed copy)",
        )
