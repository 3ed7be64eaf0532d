"""What every zero-shot task shares: the Task row, example types with lm-eval's scoring rules, data reading.

A task is one file in this folder: how to read its data (local files in the standard public formats, or hub rows)
and the prompt that turns an example into (context, continuation) requests. Scoring follows lm-eval 0.4.x:
- multiple choice: `acc` = argmax_i loglik_i is the gold choice; `acc_norm` = argmax_i loglik_i / len(choice_i) is
  the gold choice, with `len` the choice's length in characters *without* the delimiter (lm-eval's
  `completion_len`); ties go to the first choice (numpy's argmax);
- standard error of a mean metric: sample standard deviation (n - 1) / sqrt(n) (lm-eval's `mean_stderr`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.evaluate.tasks.scoring import LogLikelihood

Rows = Iterable[tuple[str, dict]]  # (where: "file line N" or "hub row N", the row)


@dataclass(frozen=True)
class Task:
    """One registered task: where its data lives and how an example is prompted and scored."""

    name: str
    summary: str  # data set, split, prompt, metrics: one line for --help and reports
    local: str  # default file or folder under the data root (e.g. "piqa/valid.jsonl")
    hub: tuple[str, str | None, str] | None  # (dataset id, config, split) lm-eval reads; used when online
    rows: Callable[[Path], Rows]  # a local file or folder, in any layout the task reads -> rows in the hub's layout
    parse: Callable[[Rows], list]  # rows in the hub's layout -> examples
    requests: Callable[[Any], list[tuple[str, str]]]  # example -> (context, continuation) pairs
    score: Callable[[Any, list[LogLikelihood]], dict[str, float]]  # example, its requests' results -> metrics
    aggregation: tuple[tuple[str, str], ...] = (("acc", "mean"), ("acc_norm", "mean"))  # metric, "mean" | "perplexity"
    layouts: tuple[str, ...] = ()  # given a folder: the released file inside it, tried in this order
    size: int | None = None  # examples in the released split lm-eval scores; another count is warned about
    revisions: tuple[tuple[int, str], ...] = ()  # (count, what it is) of known other revisions: refused


def released_file(task: Task, path: Path) -> Path:
    """The file to read for `path`: itself, or for a folder the first of the task's released layouts inside it
    (a folder without one is read as a folder, for tasks that read folders)."""
    if not path.is_dir() or not task.layouts:
        return path
    for layout in task.layouts:
        if (path / layout).is_file():
            return path / layout
    raise SlimlmError(
        f"folder '{path}' holds none of the files task '{task.name}' is released as ({', '.join(task.layouts)})",
        f"pass the file itself: --tasks {task.name}:FILE",
    )


def check_revision(task: Task, count: int, source: str) -> str | None:
    """Refuse a known other revision of the data set; return a warning when the count is not the released one."""
    for size, what in task.revisions:
        if count == size:
            raise SlimlmError(
                f"{source} holds {count} examples: {what}, not the {task.size} lm-eval scores for '{task.name}'",
                f"pass the released file ({' or '.join(task.layouts) or task.local}): --tasks {task.name}:FILE",
            )
    if task.size is not None and count != task.size:
        return (
            f"{count} examples where the released split has {task.size}: scores are not comparable with published ones"
        )
    return None


# ---- examples and their lm-eval scoring rules -------------------------------------------------------------------


@dataclass(frozen=True)
class MultipleChoice:
    """One context, several choices scored as `delimiter + choice`, one gold index (HellaSwag, PIQA, ARC, ...)."""

    context: str
    choices: tuple[str, ...]
    gold: int
    delimiter: str = " "


def choice_requests(example: MultipleChoice) -> list[tuple[str, str]]:
    return [(example.context, example.delimiter + choice) for choice in example.choices]


def choice_score(example: MultipleChoice, results: list[LogLikelihood]) -> dict[str, float]:
    lls = [r.logprob for r in results]
    normalized = [ll / len(choice) for ll, choice in zip(lls, example.choices)]
    return {"acc": float(argmax(lls) == example.gold), "acc_norm": float(argmax(normalized) == example.gold)}


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def aggregate(name: str, how: str, values: list[float]) -> tuple[float, float | None]:
    """The task-level value of one metric and its standard error.

    "mean": mean and lm-eval's `mean_stderr` (sample std with n - 1, over sqrt(n); None for one example).
    "perplexity": exp(-mean log-likelihood) and its delta-method standard error ppl * stderr(mean ll) (lm-eval
    bootstraps this one instead; the two agree for large n).
    """
    n = len(values)
    mean = sum(values) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    if how == "mean":
        return mean, stderr
    if how == "perplexity":
        value = math.exp(-mean)
        return value, (value * stderr if stderr is not None else None)
    raise ValueError(f"unknown aggregation {how!r} for {name}")  # a programming error in a task file


# ---- reading data -------------------------------------------------------------------------------------------------


def bad_row(where: str, problem: str, fix: str) -> SlimlmError:
    return SlimlmError(f"{where}: {problem}", fix)


def field(row: dict, name: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """`row[name]`, checked to exist and to have type `kind`; errors name the line and the field."""
    if not isinstance(row, dict):
        raise bad_row(where, f"expected a JSON object, got {type(row).__name__}", "each line must be one JSON object")
    if name not in row:
        raise bad_row(
            where,
            f"missing field '{name}' (has: {', '.join(sorted(row)) or 'nothing'})",
            "is this file in the task's format? see `slimlm eval --help`",
        )
    value = row[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        wanted = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise bad_row(
            where,
            f"field '{name}' should be {wanted}, got {type(value).__name__} {str(value)[:40]!r}",
            "fix that line of the file",
        )
    return value


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for every non-blank line of a JSON-lines file."""
    with open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise bad_row(
                    f"{path} line {number}",
                    f"not valid JSON ({err.msg} at column {err.colno})",
                    "each line must be one JSON object",
                ) from None
            yield f"{path} line {number}", row


def read_json(path: Path) -> Any:
    with open_text(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise bad_row(
                f"{path} line {err.lineno}", f"not valid JSON ({err.msg})", "pass the file in the task's format"
            ) from None


def open_text(path: Path):
    if not path.is_file():
        raise SlimlmError(f"'{path}' is not a file", "pass the path of the task's data file")
    if path.suffix == ".bz2":
        import bz2

        return bz2.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def rows_file(path: Path) -> Rows:
    """(where, row) of a .jsonl file, or of a .json file holding a list of objects."""
    if path.suffix != ".json":
        return read_jsonl(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise SlimlmError(
            f"'{path}' holds a JSON {type(data).__name__}, not a list of examples",
            "pass a .jsonl file or a JSON list of objects",
        )
    return ((f"{path} item {i}", row) for i, row in enumerate(data))


def ai2_to_hub(row: dict, where: str) -> dict:
    """AI2's nested layout (ARC, OpenBookQA) -> the hub's: question text, choices as {text: [...], label: [...]}."""
    question = field(row, "question", where, (str, dict))
    if isinstance(question, str):
        return row
    choices = field(question, "choices", f"{where}, field 'question'", list)
    return {
        **row,
        "question": field(question, "stem", f"{where}, field 'question'"),
        "choices": {
            "text": [field(c, "text", f"{where}, question.choices") for c in choices],
            "label": [field(c, "label", f"{where}, question.choices") for c in choices],
        },
    }


def keyed_choices(row: dict, where: str, lstrip_key: bool = False) -> tuple[tuple[str, ...], int]:
    """The hub's `choices: {text, label}` and `answerKey` (ARC, OpenBookQA) -> (option texts, gold index), as
    lm-eval's `choices.label.index(answerKey)` (`answerKey.lstrip()` with `lstrip_key`, as its OpenBookQA does)."""
    choices = field(row, "choices", where, dict)
    texts, labels = (
        field(choices, "text", f"{where}, field 'choices'", list),
        field(choices, "label", f"{where}, field 'choices'", list),
    )
    key = field(row, "answerKey", where)
    if lstrip_key:
        key = key.lstrip()
    if key not in labels:
        raise bad_row(where, f"answerKey {key!r} is not one of the option labels {labels}", "fix the answer key")
    return tuple(texts), labels.index(key)


def default_data_root() -> Path | None:
    """Where local evaluation data is looked for: $SLIMLM_DATA, else a `shared/data` beside the working directory
    or beside this checkout (the layout of the project's own machines)."""
    if os.environ.get("SLIMLM_DATA"):
        return Path(os.environ["SLIMLM_DATA"])
    for candidate in (
        Path.cwd() / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path(__file__).resolve().parents[4] / "shared" / "data",
    ):
        if candidate.is_dir():
            return candidate
    return None


def hub_rows(task: Task) -> Rows:
    """The rows lm-eval reads for `task`, from the Hugging Face hub (needs `datasets` and a network)."""
    from slimlm.models.load import hub_reachable

    if task.hub is None:
        raise SlimlmError(f"task '{task.name}' has no hub data set", f"pass its file: --tasks {task.name}:PATH")
    try:
        import datasets
    except ImportError:
        raise SlimlmError(
            f"no local data for '{task.name}', and the hub fallback needs the 'datasets' package",
            f"pass a file (--tasks {task.name}:PATH), set SLIMLM_DATA, or pip install datasets",
        ) from None
    if not hub_reachable():
        raise SlimlmError(
            f"no local data for '{task.name}' and the Hugging Face hub is unreachable",
            f"pass a file: --tasks {task.name}:PATH, or set SLIMLM_DATA to a folder holding {task.local}",
        )
    name, config, split = task.hub
    rows = datasets.load_dataset(name, config, split=split)
    return ((f"{name} row {i}", dict(row)) for i, row in enumerate(rows))
