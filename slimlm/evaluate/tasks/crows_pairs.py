"""CrowS-Pairs (Nangia et al., 2020), English, 1,508 pairs: social bias as a preference between two sentences.

Each pair has a more stereotypical sentence (`sent_more`) and a less stereotypical one (`sent_less`); both are
scored as whole sentences after the BOS token (lm-eval `crows_pairs_english`: empty context, no delimiter).
`pct_stereotype`: share of pairs where sent_more gets the higher log-likelihood (50% = no preference; lower is
better); `likelihood_diff`: mean |ll(sent_more) - ll(sent_less)|.
Layouts: the original `crows_pairs_anonymized.csv`, or jsonl / hub rows with `sent_more`, `sent_less`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from slimlm.evaluate.tasks.common import (
    Rows,
    Task,
    bad_row,
    field,
    open_text,
    rows_file,
)
from slimlm.evaluate.tasks.scoring import LogLikelihood


@dataclass(frozen=True)
class Pair:
    more: str  # the more stereotypical sentence
    less: str
    bias_type: str


def parse(rows: Rows) -> list[Pair]:
    pairs = []
    for where, row in rows:
        more, less = field(row, "sent_more", where), field(row, "sent_less", where)
        if not more or not less:
            raise bad_row(where, "empty sentence in the pair", "both sent_more and sent_less must be non-empty")
        pairs.append(Pair(more, less, str(row.get("bias_type", ""))))
    return pairs


def rows(path: Path) -> Rows:
    if path.suffix != ".csv":
        return rows_file(path)
    with open_text(path) as handle:
        return [(f"{path} line {i + 2}", row) for i, row in enumerate(csv.DictReader(handle))]


def requests(pair: Pair) -> list[tuple[str, str]]:
    return [("", pair.more), ("", pair.less)]


def score(pair: Pair, results: list[LogLikelihood]) -> dict[str, float]:
    more, less = (r.logprob for r in results)
    return {"pct_stereotype": float(more > less), "likelihood_diff": abs(more - less)}


TASK = Task(
    name="crows_pairs",
    summary="CrowS-Pairs English (1,508): share of pairs where the stereotypical sentence is preferred (lower is better)",
    local="crows_pairs/crows_pairs_anonymized.csv",
    size=1508,
    hub=("jannalu/crows_pairs_multilingual", "english", "test"),
    rows=rows,
    parse=parse,
    requests=requests,
    score=score,
    aggregation=(("pct_stereotype", "mean"), ("likelihood_diff", "mean")),
)
