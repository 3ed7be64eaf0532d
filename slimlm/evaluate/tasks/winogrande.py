"""WinoGrande (Sakaguchi et al., 2020): fill the blank of a Winograd sentence with one of two options.
Validation split (`winogrande_xl` dev), 1,267.

Partial scoring (Trinh & Le, 2018; lm-eval `winogrande`): the sentence is cut at "_"; each option completes the
*context* (`sentence[:blank] + option`), and the shared *continuation* " " + the rest after the blank (stripped)
is scored under each context; acc = the gold option's context gives the continuation the higher log-likelihood.
Layout: jsonl (`sentence`, `option1`, `option2`, `answer` "1"/"2"), the file and the hub rows alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.evaluate.tasks.common import (
    Rows,
    Task,
    argmax,
    bad_row,
    field,
    rows_file,
)
from slimlm.evaluate.tasks.scoring import LogLikelihood


@dataclass(frozen=True)
class Blank:
    contexts: tuple[str, str]  # sentence up to the blank, with option 1 / option 2
    continuation: str  # " " + the rest of the sentence after the blank
    gold: int


def parse(rows: Rows) -> list[Blank]:
    examples = []
    for where, row in rows:
        sentence = field(row, "sentence", where)
        if "_" not in sentence:
            raise bad_row(where, "field 'sentence' has no '_' blank", "WinoGrande sentences mark the blank with '_'")
        answer = str(field(row, "answer", where, (str, int))).strip()
        if answer not in ("1", "2"):
            raise bad_row(
                where,
                f"field 'answer' is {answer!r}, not '1' or '2'",
                "use a labelled split (the test split has no answers)",
            )
        blank = sentence.index("_")
        rest = sentence[blank + 1 :].strip()
        if not rest:
            raise bad_row(
                where,
                "nothing follows the blank, so partial scoring has no continuation",
                "WinoGrande sentences continue after '_'",
            )
        options = (sentence[:blank] + field(row, "option1", where), sentence[:blank] + field(row, "option2", where))
        examples.append(Blank(options, " " + rest, int(answer) - 1))
    return examples


def requests(example: Blank) -> list[tuple[str, str]]:
    return [(context, example.continuation) for context in example.contexts]


def score(example: Blank, results: list[LogLikelihood]) -> dict[str, float]:
    return {"acc": float(argmax([r.logprob for r in results]) == example.gold)}


TASK = Task(
    name="winogrande",
    summary="WinoGrande dev (1,267): pronoun resolution, partial scoring; acc",
    local="winogrande/dev.jsonl",
    size=1267,
    hub=("allenai/winogrande", "winogrande_xl", "validation"),
    rows=rows_file,
    parse=parse,
    requests=requests,
    score=score,
    aggregation=(("acc", "mean"),),
)
