"""Outputs that appear whole or not at all: everything is written into a hidden sibling (`.NAME.partial-PID`) and
renamed into place at the end, so an interrupted or failed run never leaves a directory that looks complete."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimlm.errors import SlimlmError

DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def disk_error(err: OSError, path: Path, needed: int | None = None) -> SlimlmError | None:
    """One line for a write that the destination refused (full, read-only, not permitted); None for other errors."""
    if err.errno not in DISK_ERRORS:
        return None
    amount = f" (this output needs about {needed / 2**20:.0f} MiB)" if needed else ""
    return SlimlmError(
        f"cannot write '{path}': {DISK_ERRORS[err.errno]}{amount}",
        "free space there, or choose another --out on a writable disk",
    )


def check_writable(out: Path) -> None:
    """Before any work: the destination's folder exists or can be made, and a file can be created in it."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise disk_error(err, parent) or SlimlmError(
            f"cannot write into '{parent}': {err.strerror}", "choose another --out on a writable disk"
        ) from None


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output directory up front, before any expensive work."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SlimlmError(
            f"output path '{out}' exists and is a file, not a directory",
            "choose a new directory path for --out (slimlm saves a model as a directory and never replaces a file with one)",
        )
    if out.exists() and not overwrite:
        raise SlimlmError(
            f"output directory '{out}' already exists", "choose another --out, or pass --overwrite to replace it"
        )
    check_writable(out)
    return out


def file_mode() -> int:
    """The mode a new file gets under this process's umask (safetensors creates its files 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the hidden partial outputs (`.NAME.partial-PID`) that a killed run left beside `out`, where PID is
    no longer alive; say so in one line. A live run's partial is left alone."""
    removed = []
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
            removed.append(partial)
    if removed:
        print(
            f"removed {len(removed)} partial output(s) left by an interrupted run: {', '.join(p.name for p in removed)}"
        )
    return removed


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out_dir` only if the body finishes."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(trash)
        partial.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        partial.rename(out)
