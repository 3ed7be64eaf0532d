"""Validate a GGUF file's structure against its size before any library parses it.

A truncated or hostile file otherwise reaches transformers' reader as a struct.error, a utf-8 decode error, or an
allocation sized by a forged count. The whole layout is walked by hand, every read bounded by the bytes the file
has: the header (magic, version, counts), each metadata value (arrays skipped by their element sizes, never
allocated), each tensor's description, and every tensor's data must end inside the file. The walk reads no value
it does not need, so it takes milliseconds where `gguf.GGUFReader` takes seconds on a 49k-token vocabulary (every
llama.cpp run checks its file first, and a search times a dozen). `read_gguf` is the full parse, for the callers
that need tensors or arrays.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

from slimlm.errors import SlimlmError

HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key/value count
MIN_TENSOR_INFO = 8 + 1 + 4 + 8 + 4 + 8  # name length + 1-byte name, n_dims, one dim, type, offset
MIN_KV = 8 + 1 + 4 + 1  # key length + 1-byte key, value type, a 1-byte value


def check_gguf_file(path: Path) -> dict:
    """Raise a one-line SlimlmError naming what is wrong with `path` as a GGUF file; if it is well formed, return
    its scalar and string metadata (general.architecture, ...; arrays are walked, not read)."""
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
        scalars, tensors, data_start = _walk(path, n_tensors, n_kv)
    except (ValueError, struct.error, UnicodeDecodeError, KeyError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise SlimlmError(f"GGUF file '{path}' is malformed: {reason}", fix) from None
    for name, offset, n_bytes in tensors:
        end = data_start + offset + n_bytes
        if end > size:
            raise SlimlmError(
                f"GGUF file '{path}': tensor '{name}' ends at byte {end}, past the file's {size} bytes", fix
            )
    return scalars


# GGUF metadata value types (gguf.GGUFValueType): fixed sizes by struct code; 8 = string, 9 = array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class _Cursor:
    """Reads little-endian values from a memory map; a read past the end raises ValueError."""

    def __init__(self, data, position: int):
        self.data, self.position = data, position

    def take(self, n: int) -> memoryview:
        if n < 0 or self.position + n > len(self.data):
            raise ValueError(f"a value at byte {self.position} runs past the end of the file")
        view = memoryview(self.data)[self.position : self.position + n]
        self.position += n
        return view

    def unpack(self, code: str):
        size = struct.calcsize("<" + code)
        return struct.unpack("<" + code, self.take(size))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("Q"))).decode("utf-8")

    def skip_array(self) -> None:
        """Past an array value (element type, count, elements), reading none of its elements."""
        element, count = self.unpack("I"), self.unpack("Q")
        if element in SCALARS:
            self.take(count * struct.calcsize("<" + SCALARS[element]))
        elif element == STRING:
            if count * 8 > len(self.data) - self.position:
                raise ValueError(f"an array claims {count} strings, more than the file can hold")
            for _ in range(count):
                self.take(self.unpack("Q"))
        else:
            raise ValueError(f"an array of unknown value type {element}")


def _walk(path: Path, n_tensors: int, n_kv: int) -> tuple[dict, list[tuple[str, int, int]], int]:
    """(scalar and string metadata, (tensor name, data offset, data bytes) each, the data section's start)."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor, scalars = _Cursor(data, HEADER.size), {}
        for _ in range(n_kv):
            key, kind = cursor.string(), cursor.unpack("I")
            if kind in SCALARS:
                scalars[key] = cursor.unpack(SCALARS[kind])
            elif kind == STRING:
                scalars[key] = cursor.string()
            elif kind == ARRAY:
                cursor.skip_array()
            else:
                raise ValueError(f"unknown metadata value type {kind}")
        tensors = []
        for _ in range(n_tensors):
            name, n_dims = cursor.string(), cursor.unpack("I")
            if n_dims > 4:
                raise ValueError(f"tensor '{name}' claims {n_dims} dimensions (GGUF holds at most 4)")
            dims = [cursor.unpack("Q") for _ in range(n_dims)]
            kind, offset = cursor.unpack("I"), cursor.unpack("Q")
            block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            elements = 1
            for dim in dims:
                elements *= dim
            if dims and dims[0] % block:
                raise ValueError(f"tensor '{name}' rows of {dims[0]} do not split into blocks of {block}")
            tensors.append((name, offset, elements // block * type_bytes))
        alignment = int(scalars.get("general.alignment", 32)) or 32
        start = -(-cursor.position // alignment) * alignment
    return scalars, tensors, start


def read_gguf(path: Path):
    """`gguf.GGUFReader` of `path`, parsed once per process and file version: parsing a 49k-token vocabulary takes
    ~3 s, and a search on the embedded model loads and sizes the same file."""
    stat = path.stat()
    return _parsed(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)
