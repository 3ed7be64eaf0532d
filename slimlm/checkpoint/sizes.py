"""The bytes of a saved model: of a safetensors file from its entries (exactly, before anything is written, as the
search's budget needs), per module from a written file's headers, and of whole directories.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor to its dtype, shape
and `data_offsets` [begin, end) (plus `__metadata__`), padded with spaces to a multiple of 8, then the data.
"""

from __future__ import annotations

import json
import math
import struct
from collections import defaultdict
from pathlib import Path

import torch

from slimlm.errors import SlimlmError

Entry = tuple[str, str, tuple[int, ...]]  # (tensor name, safetensors dtype, shape)
METADATA = {"format": "pt"}  # what slimlm writes into every weights file's `__metadata__`

DTYPE_NAMES = {
    torch.int64: "I64",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_BYTES = {"I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_RANK = {
    "I64": 18,
    "F32": 15,
    "I32": 13,
    "BF16": 12,
    "F16": 11,
    "I8": 5,
    "U8": 4,
    "BOOL": 0,
}  # safetensors writes tensors by dtype (its enum, largest first), then by name; offsets follow that order
OFFSET_DIGITS = 12  # an upper bound counts an entry's offsets at this width (files under 1 TB)


def entry_of(name: str, tensor: torch.Tensor) -> Entry:
    return name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape)


def data_bytes(entry: Entry) -> int:
    return DTYPE_BYTES[entry[1]] * math.prod(entry[2])


def entry_json(name: str, dtype: str, shape: tuple[int, ...], start: int, end: int) -> str:
    return (
        f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":[{",".join(map(str, shape))}],"data_offsets":[{start},{end}]}}'
    )


def widest_header_bytes(entry: Entry) -> int:
    """The tensor's header entry at the widest offsets, and its comma: at least what it adds to any file's header."""
    wide = 10**OFFSET_DIGITS - 1
    return len(entry_json(*entry, wide, wide)) + 1


def header_base_bytes() -> int:
    """Length prefix, braces, the metadata entry and at most 7 bytes of padding: what a file costs beyond its entries."""
    return 8 + len(f'{{"__metadata__":{json.dumps(METADATA, separators=(",", ":"))}}}') + 7


def safetensors_bytes(entries: list[Entry]) -> int:
    """Exact size of the safetensors file holding `entries`, as safetensors (Rust) lays it out."""
    ordered = sorted(entries, key=lambda e: (-_DTYPE_RANK[e[1]], e[0]))
    parts, offset = [f'"__metadata__":{json.dumps(METADATA, separators=(",", ":"))}'], 0
    for name, dtype, shape in ordered:
        size = data_bytes((name, dtype, shape))
        parts.append(entry_json(name, dtype, shape, offset, offset + size))
        offset += size
    header = len("{" + ",".join(parts) + "}")
    return 8 + -(-header // 8) * 8 + offset


def module_of(tensor_name: str) -> str:
    """`model.layers.0.mlp.down_proj.weight_packed` -> `model.layers.0.mlp.down_proj`: bytes are counted per module."""
    return tensor_name.rpartition(".")[0] or tensor_name


def bytes_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Data bytes per module of tensors about to be written (what `tensor_bytes_by_module` reads back)."""
    sizes: dict[str, int] = defaultdict(int)
    for name, tensor in tensors.items():
        sizes[module_of(name)] += tensor.numel() * tensor.element_size()
    return dict(sizes)


def tensor_bytes_by_module(path: str | Path) -> dict[str, int]:
    """Bytes per module of a written model, summed over shards, read from the safetensors headers only."""
    files = sorted(_directory(path).glob("*.safetensors"))
    if not files:
        raise SlimlmError(f"'{path}' holds no .safetensors files", "pass the directory a model was saved to")
    sizes: dict[str, int] = defaultdict(int)
    for file in files:
        for name, entry in safetensors_header(file).items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                sizes[module_of(name)] += end - begin
    return dict(sizes)


def directory_bytes(path: str | Path) -> int:
    """Bytes of every file under `path`, recursively: what a user downloads."""
    return sum(file.stat().st_size for file in _directory(path).rglob("*") if file.is_file())


def weight_file_bytes(path: str | Path) -> int:
    """Bytes of the `*.safetensors` files directly in `path`: the weights without tokenizer and configs."""
    return sum(file.stat().st_size for file in _directory(path).glob("*.safetensors"))


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file; a file without a readable one is refused in one line."""
    return _read_header(file)[1]


def promised_bytes(file: Path) -> int:
    """The size the header promises (length prefix, header, data up to the last tensor's end): a file shorter than
    this is truncated."""
    length, header = _read_header(file)
    return (
        8
        + length
        + max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    )


def _read_header(file: Path) -> tuple[int, dict]:
    with file.open("rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        raw = handle.read(length) if 0 < length <= 100_000_000 else b""  # the format caps headers at 100 MB
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None  # reported below, with the non-dict case
    if not isinstance(header, dict):
        raise SlimlmError(
            f"'{file}' has no readable safetensors header",
            "the file is truncated or not safetensors; save the model again",
        )
    return length, header


def _directory(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise SlimlmError(f"'{directory}' is not a directory", "pass the directory a model was saved to")
    return directory
