"""BoolQ (Clark et al., 2019): yes/no questions about a Wikipedia passage. Validation split, 3,270.

Prompt (lm-eval `boolq`): context "{passage}\\nQuestion: {question}?\\nAnswer:", choices " no", " yes"; acc.
Layouts: the original jsonl (`passage`, `question`, `answer`: true/false) or SuperGLUE's / the hub's rows
(`passage`, `question`, `label`: 0 = no, 1 = yes).
"""

from __future__ import annotations

from pathlib import Path

from slimlm.evaluate.tasks.common import (
    MultipleChoice,
    Rows,
    Task,
    bad_row,
    choice_requests,
    field,
    rows_file,
)
from slimlm.evaluate.tasks.scoring import LogLikelihood


def parse(rows: Rows) -> list[MultipleChoice]:
    examples = []
    for where, row in rows:
        gold = field(row, "label", where, int)
        if gold not in (0, 1):
            raise bad_row(where, f"field 'label' is {gold}, not 0 (no) or 1 (yes)", "fix that line")
        context = f"{field(row, 'passage', where)}\nQuestion: {field(row, 'question', where)}?\nAnswer:"
        examples.append(MultipleChoice(context, ("no", "yes"), gold))
    return examples


def score(example: MultipleChoice, results: list[LogLikelihood]) -> dict[str, float]:
    no, yes = (r.logprob for r in results)
    return {"acc": float((1 if yes > no else 0) == example.gold)}  # a tie picks "no", as numpy.argmax


def rows(path: Path) -> Rows:
    """The original jsonl's `answer` (true/false) becomes SuperGLUE's `label` (1/0)."""
    for where, row in rows_file(path):
        if isinstance(row, dict) and "answer" in row and "label" not in row:
            row = {**row, "label": int(field(row, "answer", where, bool))}
        yield where, row


TASK = Task(
    name="boolq",
    summary="BoolQ validation (3,270): yes/no reading comprehension; acc",
    local="boolq/dev.jsonl",
    size=3270,
    hub=("aps/super_glue", "boolq", "validation"),
    rows=rows,
    parse=parse,
    requests=choice_requests,
    score=score,
    aggregation=(("acc", "mean"),),
)
