"""Fine-tuning data: a user's file as padded (input_ids, labels) rows, addressed by global sample index.

Accepted files:
- `.txt` (or any slimlm text source: wikitext2:DIR, hf:NAME): plain text, tokenized once and cut into
  non-overlapping `seqlen` windows (causal LM, loss on every token).
- `.jsonl`: one JSON object a line, either `{"text": "..."}` (one example, loss on every token) or
  `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}`, rendered by the
  model's chat template, with the loss on the assistant answers only.

Rows are right-padded to the longest example (at most `seqlen`); `labels` is -100 wherever no loss is taken (padding,
prompts), so `labels[t]` is the token the model should predict at position t - 1. Which answer tokens a chat
message covers is found from character offsets: the template rendered up to the message (with the generation
prompt) and up to its end bound the answer's characters in the full rendering, and the tokens whose first character
falls inside are the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slimlm.data.calibration import ids_sha256, tokenize_text
from slimlm.data.text import jsonl_lines, load_text
from slimlm.errors import SlimlmError

IGNORE = -100  # labels no loss is taken on (torch's cross_entropy ignore_index)


@dataclass(frozen=True, eq=False)
class Rows:
    """Padded examples: input_ids, labels (-100: no loss) and attention_mask, each (N, T)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    label: str  # where the rows came from, for reports

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, index: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.int64)
        return {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "attention_mask": self.attention_mask[index],
        }

    def loss_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def subset(self, index: torch.Tensor, label: str) -> Rows:
        return Rows(self.input_ids[index], self.labels[index], self.attention_mask[index], label)

    def describe(self) -> dict:
        n, length = self.input_ids.shape
        return {
            "source": self.label,
            "rows": n,
            "length": length,
            "loss_tokens": self.loss_tokens(),
            "sha256": ids_sha256(self.input_ids)[:16],
        }


def pad_rows(examples: list[tuple[list[int], list[int]]], pad_id: int, label: str) -> Rows:
    """(ids, labels) pairs of varying length -> right-padded Rows."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.int64)
    mask = torch.zeros((len(examples), length), dtype=torch.int64)
    for row, (ids, targets) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(targets)
        mask[row, : len(ids)] = 1
    return Rows(input_ids, labels, mask, label)


def concat_rows(first: Rows, second: Rows, pad_id: int) -> Rows:
    """Both sets of rows, padded to the longer length."""
    length = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def widen(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=fill)

    return Rows(
        torch.cat([widen(first.input_ids, pad_id), widen(second.input_ids, pad_id)]),
        torch.cat([widen(first.labels, IGNORE), widen(second.labels, IGNORE)]),
        torch.cat([widen(first.attention_mask, 0), widen(second.attention_mask, 0)]),
        f"{first.label} + {second.label}",
    )


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# --- reading files ------------------------------------------------------------------------------------------------


def read_rows(source: str | Path, tokenizer, seqlen: int) -> Rows:
    """A .jsonl file as Rows (see the module docstring), or any slimlm text source (a .txt file, wikitext2:DIR,
    'default', hf:NAME; its training split) cut into windows."""
    if seqlen < 2:
        raise SlimlmError(f"seqlen is {seqlen}, must be at least 2", "pass e.g. --seqlen 256")
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise SlimlmError(
                f"fine-tuning data '{path}' is not a file",
                'pass a .txt file or a .jsonl file with "text" or "messages" on each line',
            )
        return _jsonl_rows(path, tokenizer, seqlen)
    text = load_text(str(source), "calibration")
    return text_windows(text.text, tokenizer, seqlen, text.label)


def text_windows(text: str, tokenizer, seqlen: int, label: str) -> Rows:
    """Non-overlapping windows of the tokenized text; the tail shorter than a window is dropped."""
    ids = tokenize_text(tokenizer, text)
    n = ids.numel() // seqlen
    if n < 1:
        raise SlimlmError(
            f"{label} has {ids.numel()} tokens, fewer than one window of {seqlen}",
            "use a shorter --seqlen or more text",
        )
    windows = ids[: n * seqlen].view(n, seqlen)
    return Rows(windows, windows.clone(), torch.ones_like(windows), f"{label}: {n} windows x {seqlen} tokens")


def _jsonl_rows(path: Path, tokenizer, seqlen: int) -> Rows:
    examples = []
    for number, row in jsonl_lines(path):
        where = f"{path} line {number}"
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            ids = tokenizer(row["text"], add_special_tokens=False, verbose=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            examples.append((ids[:seqlen], ids[:seqlen]))
        elif isinstance(row, dict) and "messages" in row:
            examples.append(chat_example(row["messages"], tokenizer, seqlen, where))
        else:
            got = ", ".join(f'"{key}"' for key in row) if isinstance(row, dict) else type(row).__name__
            raise SlimlmError(
                f'{where} has neither a string field "text" nor a "messages" list (it has {got or "nothing"})',
                'write {"text": "..."} or {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
            )
    if not examples:
        raise SlimlmError(f"{path} holds no examples", "write one JSON object per line")
    if all(all(t == IGNORE for t in labels[1:]) for _, labels in examples):
        raise SlimlmError(f"{path}: after cutting to seqlen {seqlen} no example has a token to learn", "raise --seqlen")
    return pad_rows(examples, pad_id_of(tokenizer), f"jsonl file {path}: {len(examples)} examples")


def chat_example(messages: object, tokenizer, seqlen: int, where: str) -> tuple[list[int], list[int]]:
    """One conversation -> (ids, labels) with labels only on the assistant messages' tokens (and what the template
    closes each answer with up to the next message)."""
    if not isinstance(messages, list) or not messages:
        raise SlimlmError(
            f'{where}: "messages" is not a non-empty list',
            'write "messages": [{"role": "user", "content": "..."}, ...]',
        )
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise SlimlmError(
                f'{where}: messages[{index}] needs string fields "role" and "content"',
                'write {"role": "assistant", "content": "..."}',
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise SlimlmError(
            f'{where}: no message has role "assistant", so there is no answer to learn',
            'add the assistant\'s answer, or use {"text": ...}',
        )
    if not getattr(tokenizer, "chat_template", None):
        raise SlimlmError(
            f"{where} holds chat messages, but the model's tokenizer has no chat template",
            'use {"text": ...} rows, or a model with a chat template',
        )
    full = render_chat(tokenizer, messages, False, where)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], True, where) if index else ""
        through = render_chat(tokenizer, messages[: index + 1], False, where)
        if not full.startswith(through) or not through.startswith(before):
            raise SlimlmError(
                f"{where}: the chat template does not render a conversation's beginning as a prefix of the whole",
                'use a template that renders messages in order (most do), or {"text": ...} rows',
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [token if any(lo <= start < hi for lo, hi in spans) else IGNORE for token, (start, _) in zip(ids, offsets)]
    return ids[:seqlen], labels[:seqlen]


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    """The conversation as the model's chat template writes it (with the assistant's opening when
    `generation_prompt`), a template error said as one line naming `where`."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2's TemplateError and whatever the template raises itself
        raise SlimlmError(
            f"{where}: the model's chat template does not render these messages ({type(err).__name__}: {str(err)[:120]})",
            'check the roles and their order (e.g. user/assistant alternating), or use {"text": ...} rows',
        ) from None


def split_heldout(rows: Rows, share: float, seed: int) -> tuple[Rows, Rows]:
    """A seeded random `share` of the rows (at least one) held out for evaluation; the rest train."""
    if not 0 < share < 1:
        raise SlimlmError(f"held-out share {share} is outside (0, 1)", "pass e.g. --heldout 0.1, or --eval-data FILE")
    if len(rows) < 2:
        raise SlimlmError(
            f"{rows.label} has {len(rows)} example, too few to hold one out", "add data, or pass --eval-data FILE"
        )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(len(rows) * share))
    return rows.subset(order[n_held:].sort().values, f"{rows.label} (train)"), rows.subset(
        order[:n_held].sort().values, f"{rows.label} (held out)"
    )


# --- batch sources for the trainer --------------------------------------------------------------------------------


class ShuffledRows:
    """Sample i is row perm_e[i mod N] of epoch e = i // N (a seeded permutation per epoch)."""

    def __init__(self, rows: Rows, seed: int):
        self.rows, self.seed = rows, seed

    def batch(self, samples: range) -> dict[str, torch.Tensor]:
        n = len(self.rows)
        perms: dict[int, torch.Tensor] = {}
        index = []
        for i in samples:
            epoch = i // n
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            index.append(int(perms[epoch][i % n]))
        return self.rows.take(index)

    def describe(self) -> dict:
        return {"kind": "shuffled", "seed": self.seed, **self.rows.describe()}


class PoissonRows:
    """Poisson sampling for DP-SGD (Abadi et al. 2016): at every step each row joins the batch independently with
    probability q = batch_size / N, seeded by (seed, step). The trainer addresses step s by samples starting at
    s · batch_size. An empty draw yields one row of weight 0 (its gradient is exactly zero), so the step still adds
    noise, as DP-SGD with an empty batch does."""

    def __init__(self, rows: Rows, batch_size: int, seed: int):
        if batch_size > len(rows):
            raise SlimlmError(
                f"DP batch size {batch_size} exceeds the {len(rows)} training rows (sampling rate above 1)",
                f"use --batch-size {len(rows)} or less, or more data",
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed

    @property
    def sample_rate(self) -> float:
        return self.batch_size / len(self.rows)

    def batch(self, samples: range) -> dict[str, torch.Tensor]:
        step = samples.start // self.batch_size
        draw = torch.rand(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step))
        index = (draw < self.sample_rate).nonzero().flatten()
        if index.numel() == 0:
            out = self.rows.take([0])
            return {**out, "weight": torch.zeros(1)}
        out = self.rows.take(index)
        return {**out, "weight": torch.ones(index.numel())}

    def describe(self) -> dict:
        return {"kind": "poisson", "sample_rate": self.sample_rate, "seed": self.seed, **self.rows.describe()}
