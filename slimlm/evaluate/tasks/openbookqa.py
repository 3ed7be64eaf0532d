"""OpenBookQA (Mihaylov et al., 2018): elementary science questions, 4 choices. Test split, 500.

Prompt (lm-eval `openbookqa`): context = the question stem alone, choices " {text}"; acc and acc_norm.
Layouts: AI2's jsonl (`question: {stem, choices: [{text, label}]}`, `answerKey`) or the hub's rows
(`question_stem`, `choices: {text, label}`, `answerKey`). A folder is read as AI2 releases it:
`Main/test.jsonl` (also under `Data/` or `OpenBookQA-V1-Sep2018/Data/`), else a `test.jsonl` in it.
"""

from __future__ import annotations

from pathlib import Path

from slimlm.evaluate.tasks.common import (
    MultipleChoice,
    Rows,
    Task,
    ai2_to_hub,
    choice_requests,
    choice_score,
    field,
    keyed_choices,
    rows_file,
)


def parse(rows: Rows) -> list[MultipleChoice]:
    examples = []
    for where, row in rows:
        texts, gold = keyed_choices(row, where, lstrip_key=True)
        examples.append(MultipleChoice(field(row, "question_stem", where), texts, gold))
    return examples


def rows(path: Path) -> Rows:
    """AI2's nested jsonl (`question: {stem, choices}`) becomes the hub's layout (`question_stem`, `choices`)."""
    for where, row in rows_file(path):
        if isinstance(row, dict) and "question" in row and "question_stem" not in row:
            hub = ai2_to_hub(row, where)
            row = {**{k: v for k, v in hub.items() if k != "question"}, "question_stem": hub["question"]}
        yield where, row


TASK = Task(
    name="openbookqa",
    summary="OpenBookQA test (500): science questions, 4 choices, no prompt prefix; acc, acc_norm",
    local="openbookqa",
    layouts=("Main/test.jsonl", "Data/Main/test.jsonl", "OpenBookQA-V1-Sep2018/Data/Main/test.jsonl", "test.jsonl"),
    size=500,
    hub=("allenai/openbookqa", "main", "test"),
    rows=rows,
    parse=parse,
    requests=choice_requests,
    score=choice_score,
)
