"""ARC (Clark et al., 2018): grade-school science questions, Easy and Challenge sets. Test splits: 2,376 / 1,172.

Prompt (lm-eval `arc_easy`, `arc_challenge`): context "Question: {question}\\nAnswer:", choices " {text}" for each
option (3 to 5); gold = position of `answerKey` among the option labels; acc and acc_norm.
Layouts:
- the hub's rows (`question`, `choices: {text: [...], label: [...]}`, `answerKey`) or AI2's jsonl
  (`question: {stem, choices: [{text, label}]}`, `answerKey`);
- the LLM-Adapters conversion in a folder: `test.json` (a list of `instruction` = "Please choose the correct answer
  to the question: {stem}\\n\\nAnswer1: {opt1} Answer2: {opt2} ...\\n\\nAnswer format: ...", `answer` = "answerK")
  with AI2's `question-answers.jsonl` (`id`, `answerKey`) beside it, line-aligned; the official key decides gold.
"""

from __future__ import annotations

import re
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.evaluate.tasks.common import (
    MultipleChoice,
    Rows,
    Task,
    ai2_to_hub,
    bad_row,
    choice_requests,
    choice_score,
    field,
    keyed_choices,
    read_json,
    read_jsonl,
    rows_file,
)

_PREFIX = "Please choose the correct answer to the question: "
_OPTION = re.compile(r"(?:^| )Answer(\d+): ")


def parse(rows: Rows) -> list[MultipleChoice]:
    examples = []
    for where, row in rows:
        texts, gold = keyed_choices(row, where)
        examples.append(MultipleChoice(f"Question: {field(row, 'question', where)}\nAnswer:", texts, gold))
    return examples


def converted_rows(folder: Path) -> Rows:
    items = read_json(folder / "test.json")
    if not isinstance(items, list):
        raise SlimlmError(
            f"{folder / 'test.json'} holds a JSON {type(items).__name__}, not a list",
            "pass the LLM-Adapters ARC test.json",
        )
    keys_path = folder / "question-answers.jsonl"
    keys = (
        [(field(row, "id", where), field(row, "answerKey", where)) for where, row in read_jsonl(keys_path)]
        if keys_path.is_file()
        else None
    )
    if keys is not None and len(keys) != len(items):
        raise SlimlmError(
            f"{folder / 'test.json'} has {len(items)} questions but {keys_path} has {len(keys)} keys",
            "the two files must be line-aligned",
        )
    out = []
    for i, item in enumerate(items):
        where = f"{folder / 'test.json'} item {i}"
        head, sep, rest = field(item, "instruction", where).partition("\n\nAnswer1: ")
        if not head.startswith(_PREFIX) or not sep:
            raise bad_row(
                where,
                "field 'instruction' is not 'Please choose the correct answer to the question: Q\\n\\nAnswer1: ...'",
                "pass the LLM-Adapters ARC conversion",
            )
        texts = _OPTION.split("Answer1: " + rest.partition("\n\nAnswer format:")[0])[
            2::2
        ]  # ['', '1', text, '2', text, ...]
        answer = field(item, "answer", where)
        if not answer.startswith("answer") or not answer[6:].isdigit() or not 1 <= int(answer[6:]) <= len(texts):
            raise bad_row(
                where,
                f"field 'answer' is {answer!r}, not answer1..answer{len(texts)}",
                "pass the LLM-Adapters ARC conversion",
            )
        gold = int(answer[6:]) - 1
        labels = [chr(ord("A") + k) for k in range(len(texts))]
        row = {
            "id": f"item-{i}",
            "question": head[len(_PREFIX) :],
            "choices": {"text": texts, "label": labels},
            "answerKey": labels[gold],
        }
        if keys is not None:  # AI2's key: letters A.. or, for a few questions, digits 1..
            key_id, key = keys[i]
            official = ord(key) - ord("A") if key.isalpha() else int(key) - 1 if key.isdigit() else -1
            if official != gold:
                raise bad_row(
                    f"{keys_path} line {i + 1}",
                    f"answerKey {key!r} disagrees with test.json's {answer!r}",
                    "the two files must describe the same questions in the same order",
                )
            if key.isdigit():
                labels = [str(k + 1) for k in range(len(texts))]
            row = {**row, "id": key_id, "choices": {"text": texts, "label": labels}, "answerKey": key}
        out.append((where, row))
    return out


def rows(path: Path) -> Rows:
    if path.is_dir():
        return converted_rows(path)
    return ((where, ai2_to_hub(row, where)) for where, row in rows_file(path))


def _task(name: str, subset: str, count: int) -> Task:
    return Task(
        name=name,
        summary=f"{subset} test ({count:,}): science questions, 3-5 choices; acc, acc_norm",
        local=f"arc/{subset}",
        size=count,
        hub=("allenai/ai2_arc", subset, "test"),
        rows=rows,
        parse=parse,
        requests=choice_requests,
        score=choice_score,
    )


EASY = _task("arc_easy", "ARC-Easy", 2376)
CHALLENGE = _task("arc_challenge", "ARC-Challenge", 1172)
