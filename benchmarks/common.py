"""What the benchmark scripts share (not part of slimlm): running a compression in its own measured process."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

# The environment as the user started the benchmark: slimlm's command line turns on PyTorch's huge-page allocator
# (THP_MEM_ALLOC_ENABLE) in its own process; other tools' children run in this one, as shipped.
USER_ENVIRONMENT = dict(os.environ)


def run_child(command: list[str], log: Path) -> tuple[float, float, int]:
    """Run a command in the user's environment (`USER_ENVIRONMENT`), return (wall seconds, its own peak RSS in MiB,
    exit status).

    The peak comes from GNU time around the command: a child forked (vforked) from this large process would
    inherit this process's RSS high-water mark in its own ru_maxrss.
    """
    rss_file = log.with_suffix(".maxrss")
    start = time.perf_counter()
    with log.open("w") as handle:
        status = subprocess.call(
            ["/usr/bin/time", "-o", str(rss_file), "-f", "%M", *command],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**USER_ENVIRONMENT, "SLIMLM_QUIET": "1"},
        )
    return time.perf_counter() - start, int(rss_file.read_text().split()[-1]) / 1024, status
