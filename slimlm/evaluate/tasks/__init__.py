"""Zero-shot tasks scored by log-likelihood, as lm-evaluation-harness 0.4.x scores them, one file per task.

    from slimlm.evaluate.tasks import evaluate_tasks
    results = evaluate_tasks(model, tokenizer, ["hellaswag", "piqa"], limit=500)

`TASKS` is the registry (name -> Task). Data: `name` reads the task's file under the data root ($SLIMLM_DATA or a
`shared/data` folder nearby), or its hub data set when online; `name:PATH` reads PATH (a file or folder in one of
the layouts the task's module describes).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.evaluate.tasks import (
    arc,
    boolq,
    crows_pairs,
    hellaswag,
    lambada,
    openbookqa,
    piqa,
    truthfulqa,
    winogrande,
)
from slimlm.evaluate.tasks.common import (
    Task,
    aggregate,
    check_revision,
    default_data_root,
    hub_rows,
    released_file,
)
from slimlm.evaluate.tasks.scoring import score_requests

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        hellaswag.TASK,
        piqa.TASK,
        arc.EASY,
        arc.CHALLENGE,
        lambada.TASK,
        boolq.TASK,
        winogrande.TASK,
        openbookqa.TASK,
        truthfulqa.MC1,
        truthfulqa.MC2,
        crows_pairs.TASK,
    )
}
ALIASES = {
    "lambada_openai": "lambada",
    "crows_pairs_english": "crows_pairs",
    "arc_e": "arc_easy",
    "arc_c": "arc_challenge",
}
DEFAULT_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "lambada")


@dataclass(frozen=True)
class TaskData:
    task: Task
    rows: list[tuple[str, dict]]  # (where, row) in the hub's layout: what lm-eval would read
    examples: list  # parsed from rows, one per row
    source: str  # the file, folder or hub data set read
    warning: str | None = None  # e.g. not the released split's example count


@dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]  # standard error of each metric (None with a single example)
    examples: int  # examples scored
    total: int  # examples in the data set
    requests: int  # (context, continuation) pairs scored
    seconds: float  # wall time of the scoring (not the data loading)
    examples_per_s: float
    source: str
    protocol: str  # one line: what exactly was scored
    device: str
    per_example: list[dict] = field(default_factory=list, repr=False)  # {"index", "where", metric: value} per example


def parse_task_spec(spec: str) -> tuple[Task, Path | None]:
    """'name' or 'name:PATH' -> the task and an explicit data path."""
    name, sep, path = spec.partition(":")
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in TASKS:
        raise SlimlmError(f"unknown task '{spec}'", f"known tasks: {', '.join(TASKS)}")
    if sep and not path:
        raise SlimlmError(f"task '{spec}' names no path after ':'", f"write {name}:PATH, or just {name}")
    return TASKS[name], Path(path).expanduser() if sep else None


def load_task_data(spec: str, data_root: str | Path | None = None) -> TaskData:
    """Read a task's examples: the path given in the spec, else its default file under the data root, else the hub."""
    task, path = parse_task_spec(spec)
    if path is None:
        root = Path(data_root) if data_root is not None else default_data_root()
        if root is not None and (root / task.local).exists():
            path = root / task.local
    if path is not None:
        if not path.exists():
            raise SlimlmError(f"data for task '{task.name}' not found: '{path}'", "check the path after the task name")
        path = released_file(task, path)
        rows, source = list(task.rows(path)), str(path)
    else:
        rows, source = list(hub_rows(task)), f"hub:{task.hub[0]}"  # hub_rows raises without a hub
    if not rows:
        raise SlimlmError(
            f"the data for task '{task.name}' ({source}) holds no examples", "pass a file with at least one example"
        )
    warning = check_revision(task, len(rows), source)
    _say_read(task.name, source, len(rows), warning)
    return TaskData(task, rows, task.parse(rows), source, warning)


def _say_read(name: str, source: str, count: int, warning: str | None) -> None:
    from slimlm.progress import console, quiet

    if warning or not quiet():  # a warning is shown even when quiet
        console.print(
            f"{name}: read {source} ({count} examples)" + (f" [yellow]warning: {warning}[/yellow]" if warning else ""),
            highlight=False,
            soft_wrap=True,
        )


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise SlimlmError(
            f"--limit must be at least 1, got {limit}",
            "pass a positive number of examples per task, or leave it out for all",
        )


def select(total: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the examples to score: all, or a seeded random subset of `limit` in data-set order."""
    check_limit(limit)
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    limit: int | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
    token_budget: int = 2048,
    progress: bool = True,
) -> list[TaskResult]:
    """Score `model` on each task (zero-shot, log-likelihood), `limit` examples per task drawn with `seed`.
    Every task's data is read (and checked) before any scoring starts."""
    check_limit(limit)
    if not tasks:
        raise SlimlmError("no task given", f"known tasks: {', '.join(TASKS)}")
    loaded = [load_task_data(spec, data_root) for spec in tasks]
    return [score_task(model, tokenizer, data, limit, seed, token_budget, progress) for data in loaded]


def score_task(
    model: nn.Module,
    tokenizer,
    data: TaskData,
    limit: int | None,
    seed: int,
    token_budget: int = 2048,
    progress: bool = True,
) -> TaskResult:
    from slimlm.progress import progress_bar, quiet

    task = data.task
    indices = select(len(data.examples), limit, seed)
    chosen = [data.examples[i] for i in indices]
    per_example_requests = [task.requests(example) for example in chosen]
    flat = [request for requests in per_example_requests for request in requests]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    start = time.perf_counter()
    try:
        with progress_bar(task.name, len(flat), unit="requests") as advance:
            show = progress and not quiet()
            results = score_requests(
                model,
                tokenizer,
                flat,
                token_budget,
                advance=(lambda n: [advance() for _ in range(n)]) if show else None,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    scores, offset = [], 0
    for example, requests in zip(chosen, per_example_requests):
        scores.append(task.score(example, results[offset : offset + len(requests)]))
        offset += len(requests)
    metrics, stderr = {}, {}
    for name, how in task.aggregation:
        metrics[name], stderr[name] = aggregate(name, how, [s[name] for s in scores])
    subset = f"a seeded subset (seed {seed}) of {len(chosen)}" if len(chosen) < len(data.examples) else "all"
    protocol = f"{task.summary}; {subset} of {len(data.examples)} examples from {data.source}; zero-shot, lm-eval 0.4 prompts and scoring"
    if data.warning:
        protocol += f"; warning: {data.warning}"
    return TaskResult(
        task=task.name,
        metrics=metrics,
        stderr=stderr,
        examples=len(chosen),
        total=len(data.examples),
        requests=len(flat),
        seconds=seconds,
        examples_per_s=len(chosen) / seconds if seconds > 0 else float("inf"),
        source=data.source,
        protocol=protocol,
        device=str(device),
        per_example=[{"index": i, "where": data.rows[i][0], **score} for i, score in zip(indices, scores)],
    )
