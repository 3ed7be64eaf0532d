"""Progress bars for long work (rich), silenced with SLIMLM_QUIET=1 or when not asked for."""

from __future__ import annotations

import os
import sys
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


def quiet() -> bool:
    return os.environ.get("SLIMLM_QUIET", "0") not in ("0", "")


def bar_columns(*extra: ProgressColumn) -> tuple[ProgressColumn, ...]:
    """slimlm's bar: description, bar, done/total, then `extra` (e.g. the training loss), elapsed, remaining."""
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn(), TimeRemainingColumn())


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[], None]]:
    """Yield an `advance()` callable; draws a bar on stderr unless quiet."""
    if quiet():
        yield lambda: None
        return
    with Progress(*bar_columns(), console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)
