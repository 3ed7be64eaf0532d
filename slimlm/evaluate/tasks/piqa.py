"""PIQA (Bisk et al., 2020): physical commonsense, pick the better of two solutions. Validation split, 1,838.

Prompt (lm-eval `piqa`): context "Question: {goal}\\nAnswer:", choices " {sol1}", " {sol2}"; acc and acc_norm.
Layouts: the official `valid.jsonl` (`goal`, `sol1`, `sol2`) with its line-aligned `valid-labels.lst` beside it
(`<stem>-labels.lst`), or a jsonl / hub rows that carry `label` themselves.
"""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimlmError
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


def parse(rows: Rows) -> list[MultipleChoice]:
    examples = []
    for where, row in rows:
        label = str(field(row, "label", where, (int, str))).strip()
        if label not in ("0", "1"):
            raise bad_row(where, f"label {label!r} is not 0 or 1", "PIQA labels are 0 (sol1) or 1 (sol2)")
        choices = (field(row, "sol1", where), field(row, "sol2", where))
        examples.append(MultipleChoice(f"Question: {field(row, 'goal', where)}\nAnswer:", choices, int(label)))
    return examples


def rows(path: Path) -> Rows:
    if path.is_dir():
        path = path / "valid.jsonl"
    labels_path = path.with_name(path.name.split(".")[0] + "-labels.lst")
    if not labels_path.is_file():
        return read_jsonl(path)
    with open_text(labels_path) as handle:
        labels = [line.strip() for line in handle if line.strip()]
    data = list(read_jsonl(path))
    if len(data) != len(labels):
        raise SlimlmError(
            f"{path} has {len(data)} examples but {labels_path} has {len(labels)} labels",
            "the labels file must have one label per line of the jsonl",
        )
    return [
        (
            f"{where} (label: {labels_path.name} line {i + 1})",
            {**row, "label": int(label) if label.isdigit() else label} if isinstance(row, dict) else row,
        )
        for i, ((where, row), label) in enumerate(zip(data, labels))
    ]


TASK = Task(
    name="piqa",
    summary="PIQA validation (1,838): physical commonsense, 2 choices; acc, acc_norm",
    local="piqa/valid.jsonl",
    size=1838,
    hub=("baber/piqa", None, "validation"),
    rows=rows,
    parse=parse,
    requests=choice_requests,
    score=choice_score,
)
