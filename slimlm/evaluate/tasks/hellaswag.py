"""HellaSwag (Zellers et al., 2019): pick the ending of a video caption or WikiHow step. Validation split, 10,042.

Prompt (lm-eval `hellaswag`): context `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`,
choices ` preprocess(ending)`; acc and acc_norm. `preprocess` strips, turns " [title]" into ". ", deletes every
"[...]" tag and collapses double spaces.

Two layouts are read:
- the original jsonl (`ctx_a`, `ctx_b`, `activity_label`, `endings`, `label`), also the hub's rows;
- llama.cpp's 6-line text (`.txt` or `.txt.bz2`): `label: ctx`, gold, four endings. It keeps `ctx = ctx_a + " " +
  ctx_b` without lm-eval's capitalisation of ctx_b, so the trailing fragment after the last sentence end, when it
  starts lower-case (ActivityNet items: "... on a roof. he"), is taken as ctx_b and capitalised as lm-eval does.
"""

from __future__ import annotations

import re
from pathlib import Path

from slimlm.evaluate.tasks.common import (
    MultipleChoice,
    Rows,
    Task,
    bad_row,
    choice_requests,
    choice_score,
    field,
    open_text,
    read_jsonl,
)

_CTX_B = re.compile(r"(?<=[.!?] )([^.!?]+)$")  # the unfinished sentence after the last sentence end


def preprocess(text: str) -> str:
    """lm-eval's `hellaswag/utils.py::preprocess`, verbatim."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def parse(rows: Rows) -> list[MultipleChoice]:
    examples = []
    for where, row in rows:
        endings = field(row, "endings", where, list)
        label = field(row, "label", where, (int, str))
        if not str(label).isdigit() or not 0 <= int(label) < len(endings):
            raise bad_row(
                where, f"field 'label' is {label!r}, not an index into the {len(endings)} endings", "labels are 0..3"
            )
        ctx = field(row, "ctx_a", where) + " " + field(row, "ctx_b", where).capitalize()
        query = preprocess(field(row, "activity_label", where) + ": " + ctx)
        examples.append(MultipleChoice(query, tuple(preprocess(e) for e in endings), int(label)))
    return examples


def text_rows(path: Path) -> Rows:
    """llama.cpp's `--hellaswag` file (6 lines per task) as rows in the original layout."""
    with open_text(path) as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise bad_row(
            f"{path}",
            f"{len(lines)} lines is not a multiple of 6",
            "the llama.cpp HellaSwag format has 6 lines per task: context, gold label, 4 endings",
        )
    for start in range(0, len(lines), 6):
        query, gold, *endings = lines[start : start + 6]
        if gold.strip() not in ("0", "1", "2", "3"):
            raise bad_row(
                f"{path} line {start + 2}",
                f"gold label {gold[:20]!r} is not 0..3",
                "line 2 of every 6-line task is the gold ending's index",
            )
        label, colon, ctx = query.partition(": ")
        if not colon:
            raise bad_row(
                f"{path} line {start + 1}",
                "no 'activity_label: ' before the context",
                "line 1 of every 6-line task is 'label: context'",
            )
        fragment = _CTX_B.search(ctx)
        ctx_a, ctx_b = (
            (ctx[: fragment.start()].rstrip(), fragment.group(1))
            if fragment and fragment.group(1)[:1].islower()
            else (ctx, "")
        )
        yield (
            f"{path} line {start + 1}",
            {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings, "label": int(gold)},
        )


def rows(path: Path) -> Rows:
    return read_jsonl(path) if path.name.endswith((".jsonl", ".jsonl.bz2")) else text_rows(path)


TASK = Task(
    name="hellaswag",
    summary="HellaSwag validation (10,042): sentence completion; acc, acc_norm",
    local="hellaswag/hellaswag_val_full.txt.bz2",
    size=10042,
    hub=("Rowan/hellaswag", None, "validation"),
    rows=rows,
    parse=parse,
    requests=choice_requests,
    score=choice_score,
)
