"""Validate a GGUF file's structure against its size before any library parses it.

A truncated or hostile file otherwise reaches transformers' reader as a struct.error, a utf-8 decode error, or an
allocation sized by a forged count. The header is read by hand (magic, version, counts, bounded by the bytes the
file has), then `gguf.GGUFReader` parses the rest inside one guard, and every tensor's data must end inside the file.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

from slimlm.errors import SlimlmError

HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key/value count
MIN_TENSOR_INFO = 8 + 1 + 4 + 8 + 4 + 8  # name length + 1-byte name, n_dims, one dim, type, offset
MIN_KV = 8 + 1 + 4 + 1  # key length + 1-byte key, value type, a 1-byte value


def check_gguf_file(path: Path) -> None:
    """Raise a one-line SlimlmError naming what is wrong with `path` as a GGUF file; return if it is well formed."""
    size = path.stat().st_size
    fix = "re-download or re-export the file: it is truncated or not a GGUF model"
    with path.open("rb") as file:
        head = file.read(HEADER.size)
    if len(head) < HEADER.size:
        raise SlimlmError(f"GGUF file '{path}' is {size} bytes, shorter than a GGUF header ({HEADER.size} bytes)", fix)
    magic, version, n_tensors, n_kv = HEADER.unpack(head)
    if magic != b"GGUF":
        raise SlimlmError(f"'{path}' does not start with the GGUF magic (found {magic!r})", fix)
    if version not in (2, 3):
        raise SlimlmError(f"GGUF file '{path}' has version {version}; slimlm reads versions 2 and 3", fix)
    room = size - HEADER.size
    if n_tensors * MIN_TENSOR_INFO + n_kv * MIN_KV > room:
        raise SlimlmError(
            f"GGUF file '{path}' claims {n_tensors} tensors and {n_kv} metadata entries, more than its {size} bytes can hold",
            fix,
        )
    try:
        reader = read_gguf(path)
    except (ValueError, struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError, KeyError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise SlimlmError(f"GGUF file '{path}' is malformed: {reason}", fix) from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise SlimlmError(
                f"GGUF file '{path}': tensor '{tensor.name}' ends at byte {end}, past the file's {size} bytes", fix
            )


def read_gguf(path: Path):
    """`gguf.GGUFReader` of `path`, parsed once per process and file version: parsing a 49k-token vocabulary takes
    ~3 s, and a search on the embedded model checks, loads and sizes the same file."""
    stat = path.stat()
    return _parsed(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)
