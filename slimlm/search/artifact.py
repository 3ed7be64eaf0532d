"""The exported file: its exact bytes before it is written, and the writing of a chosen configuration.

A GGUF file is its header (key-values: hyperparameters, tokenizer; one info record per tensor), padded to the
alignment, then each tensor's data padded to the alignment (gguf's GGUFWriter, llama.cpp's reader). The header
does not depend on the tensors' types, so it is measured once per block layout by writing it alone; a
configuration's file size is then that plus Σ pad(bytes) of its tensors, equal to the written file's size.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

SEARCH_NAME = "slimlm search"  # general.name of the files a search writes (its length is part of the header)
GGUF_ALIGNMENT = 32  # gguf.GGUF_DEFAULT_ALIGNMENT; a file may set general.alignment, slimlm's never do


def padded(n: int, alignment: int = GGUF_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class Layout:
    """What a file of the model with `removed` blocks costs beside the searched tensors."""

    removed: tuple[int, ...]
    header_bytes: int  # header + key-values + tensor infos, padded
    fixed_bytes: int  # tensors the search does not choose (norms, biases as F32), padded
    tensors: tuple[str, ...]  # GGUF names of every tensor in the file, in the file's numbering


def pruned_copy(model: nn.Module, removed: tuple[int, ...]) -> nn.Module:
    """A copy of `model` without the `removed` blocks (the base is left alone)."""
    from slimlm.prune.depth import remove_blocks_

    pruned = copy.deepcopy(model)
    if removed:
        remove_blocks_(pruned, list(removed))
    return pruned


def renumber(tensor: str, removed: tuple[int, ...]) -> str:
    """blk.N.* at the base model's numbering -> the name in a file without the `removed` blocks."""
    if not tensor.startswith("blk."):
        return tensor
    _, index, rest = tensor.split(".", 2)
    index = int(index)
    return f"blk.{index - sum(r < index for r in removed)}.{rest}"


def measure_layout(
    model: nn.Module, tokenizer, source_gguf: Path | None, removed: tuple[int, ...], searched: set[str]
) -> Layout:
    """Write the header of the file alone (a temporary file) and count the tensors the search does not choose
    (1-D tensors as F32, any other 2-D tensor as F16: what `write_configuration` writes for them)."""
    import gguf

    from slimlm.export.gguf import (
        _add_hparams,
        check_gguf_model,
        copy_tokenizer_metadata,
        hf_tokenizer_metadata,
        tensor_layout,
    )

    pruned = pruned_copy(model, removed)
    arch, _ = check_gguf_model(pruned, "f16")
    writer = gguf.GGUFWriter(path=None, arch=arch)
    _add_hparams(writer, pruned, arch, "f16", SEARCH_NAME)
    if source_gguf is None or not copy_tokenizer_metadata(writer, source_gguf, pruned.config.vocab_size):
        hf_tokenizer_metadata(writer, tokenizer, pruned.config)
    searched_here = {renumber(t, removed) for t in searched if not _in_removed(t, removed)}
    fixed = 0
    layout = tensor_layout(pruned)
    for name, shape in layout.items():
        nbytes = int(np.prod(shape)) * (4 if len(shape) == 1 else 2)
        writer.add_tensor_info(name, shape, np.float32 if len(shape) == 1 else np.float16, nbytes)
        if name not in searched_here:
            fixed += padded(nbytes)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "header.gguf"
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        header = padded(path.stat().st_size)
    return Layout(tuple(removed), header, fixed, tuple(layout))


def _in_removed(tensor: str, removed: tuple[int, ...]) -> bool:
    return tensor.startswith("blk.") and int(tensor.split(".")[1]) in removed


def write_configuration(
    model: nn.Module,
    tokenizer,
    source_gguf: Path | None,
    removed: tuple[int, ...],
    packed: dict[str, tuple[str, np.ndarray]],
    out: Path,
    overwrite: bool = False,
):
    """Write the GGUF of `model` without `removed` blocks, each searched tensor as its database bytes."""
    from slimlm.export.gguf import write_gguf

    pruned = pruned_copy(model, removed)
    kept = {renumber(t, removed): value for t, value in packed.items() if not _in_removed(t, removed)}
    return write_gguf(
        pruned,
        tokenizer,
        out,
        gguf_type="f16",
        source_gguf=source_gguf,
        name=SEARCH_NAME,
        overwrite=overwrite,
        tensor_types={t: type_ for t, (type_, _) in kept.items()},
        packed={t: data for t, (_, data) in kept.items()},
    )


def file_bytes(path: str | Path) -> int:
    return os.stat(path).st_size
