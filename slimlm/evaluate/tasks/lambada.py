"""LAMBADA (Paperno et al., 2016), OpenAI's detokenized test file (`lambada_openai`, 5,153 passages).

Predict the last word of a passage: context = every space-separated word but the last, continuation =
" " + last word (lm-eval `lambada_openai`). `acc`: the whole last word is the model's greedy continuation (every
one of its tokens is the argmax); `perplexity`: exp(-mean log p(last word | context)) over examples.
Layout: jsonl with `text` (the file and the hub rows alike).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.evaluate.tasks.common import Rows, Task, bad_row, field, rows_file
from slimlm.evaluate.tasks.scoring import LogLikelihood


@dataclass(frozen=True)
class Cloze:
    context: str
    target: str  # " " + the last word


def parse(rows: Rows) -> list[Cloze]:
    examples = []
    for where, row in rows:
        words = field(row, "text", where).split(" ")
        if len(words) < 2 or not words[-1]:
            raise bad_row(
                where,
                "field 'text' needs at least two space-separated words and must not end in a space",
                "LAMBADA passages end with the target word",
            )
        examples.append(Cloze(" ".join(words[:-1]), " " + words[-1]))
    return examples


def requests(example: Cloze) -> list[tuple[str, str]]:
    return [(example.context, example.target)]


def score(example: Cloze, results: list[LogLikelihood]) -> dict[str, float]:
    (result,) = results
    return {"acc": float(result.is_greedy), "perplexity": result.logprob}


TASK = Task(
    name="lambada",
    summary="LAMBADA OpenAI test (5,153): last word; acc (greedy), perplexity of the last word",
    local="lambada_openai/lambada_test.jsonl",
    size=5153,
    hub=("EleutherAI/lambada_openai", "default", "test"),
    rows=rows_file,
    parse=parse,
    requests=requests,
    score=score,
    aggregation=(("acc", "mean"), ("perplexity", "perplexity")),
)
