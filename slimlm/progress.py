"""Progress for long work, on stderr: rich bars on a terminal, plain timestamped lines when piped to a file or a CI
log (a bar redrawn in place is unreadable there, and rich hides it, so a piped run would show no sign of life).
SLIMLM_QUIET=1 silences both."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Logs and CI are not terminals: give them a width that fits the report table instead of rich's 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
PLAIN_EVERY_S = 30.0  # off a terminal, a bar's "still working" line at most this often (plus its start and end)


def quiet() -> bool:
    return os.environ.get("SLIMLM_QUIET", "0") not in ("0", "")


def bar_columns(*extra: ProgressColumn) -> tuple[ProgressColumn, ...]:
    """slimlm's bar: description, bar, done/total, then `extra` (e.g. the training loss), elapsed, remaining."""
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def plain_line(message: str) -> None:
    """One unstyled line on stderr, flushed at once (a log tail shows it while the work goes on)."""
    print(f"[slimlm {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def stage(message: str) -> Iterator[None]:
    """Announce a step of a job ("compressing with gptq-w4 (2/4)") and, when it ends, how long it took; on a
    terminal too (dim), since between bars nothing else says what is running."""
    if quiet():
        yield
        return
    start = time.perf_counter()
    _say(f"{message} …")
    yield
    _say(f"{message}: done in {time.perf_counter() - start:.1f}s")


@contextmanager
def progress_bar(description: str, total: int, unit: str = "steps", show: bool = True) -> Iterator[Callable[[], None]]:
    """Yield an `advance()` callable: a bar on a terminal; off one, a line at the start, one at most every
    PLAIN_EVERY_S seconds and one at the end, each with the count and the elapsed time. Nothing when quiet or
    `show` is False."""
    if quiet() or not show:
        yield lambda: None
        return
    if not console.is_terminal:
        yield from _plain_progress(description, total, unit)
        return
    with Progress(*bar_columns(), console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def _plain_progress(description: str, total: int, unit: str) -> Iterator[Callable[[], None]]:
    start = last = time.perf_counter()
    done = 0
    plain_line(f"{description}: 0/{total} {unit}")

    def advance() -> None:
        nonlocal done, last
        done += 1
        now = time.perf_counter()
        if now - last >= PLAIN_EVERY_S and done < total:
            last = now
            plain_line(f"{description}: {done}/{total} {unit}, {now - start:.0f}s elapsed")

    yield advance
    plain_line(f"{description}: {done}/{total} {unit} in {time.perf_counter() - start:.1f}s")


def _say(message: str) -> None:
    if console.is_terminal:
        console.print(f"[dim]{message}[/dim]")
    else:
        plain_line(message)
