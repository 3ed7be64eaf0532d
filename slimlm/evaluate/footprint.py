"""What a model costs to keep: parameters, sparsity, bytes on disk (per module too), and peak memory."""

from __future__ import annotations

import json
import struct
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError


def parameter_count(model: nn.Module) -> int:
    """Parameters, tied weights counted once (`parameters()` dedups them), plus the integer codes that quantized
    linears keep as `weight_q` buffers in place of a `weight` parameter."""
    codes = sum(buffer.numel() for name, buffer in model.named_buffers() if name.rpartition(".")[2] == "weight_q")
    return sum(p.numel() for p in model.parameters()) + codes


def _zero_share(weights: Iterable[torch.Tensor]) -> tuple[int, int]:
    zeros = total = 0
    for weight in weights:
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros, total


def shipped_bytes(model: nn.Module) -> int:
    """Bytes of the model as a user ships a dense checkpoint: floating-point weights at 16 bits (fp16/bf16, as
    models are released) even when loaded in fp32, integers as they are; tied weights once. The base row of a
    report is counted this way, so a compression ratio is against what one would otherwise download."""
    return sum(p.numel() * (min(p.element_size(), 2) if p.is_floating_point() else p.element_size()) for p in model.parameters())


def sparsity(model: nn.Module, linear_names: Iterable[str]) -> float:
    """Share of exact zeros in the `.weight` of the named modules (quantized codes are not counted: a zero code
    need not dequantize to zero)."""
    modules = dict(model.named_modules())
    for name in linear_names:
        if name not in modules:
            raise SlimlmError(f"the model has no module '{name}'", "pass fully-qualified module names from model.named_modules()")
    weights = [getattr(modules[name], "weight", None) for name in linear_names]
    zeros, total = _zero_share(weight for weight in weights if isinstance(weight, torch.Tensor))
    if total == 0:
        raise SlimlmError("none of the named modules has a .weight tensor to measure sparsity on", "measure sparsity before quantizing")
    return zeros / total


def linear_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights over all decoder-block linears (quantized ones after dequantization)."""
    from slimlm.models.adapters import block_linears, decoder_blocks
    from slimlm.quantize.linear import QuantizedLinear

    def weights() -> Iterable[torch.Tensor]:
        for index in range(len(decoder_blocks(model))):
            for module in block_linears(model, index).values():
                yield module.dequantized_weight() if isinstance(module, QuantizedLinear) else module.weight

    zeros, total = _zero_share(weights())
    return zeros / total


def directory_bytes(path: str | Path) -> int:
    """Bytes of every file under `path`, recursively: what a user downloads."""
    return sum(file.stat().st_size for file in _directory(path).rglob("*") if file.is_file())


def weight_file_bytes(path: str | Path) -> int:
    """Bytes of the `*.safetensors` files directly in `path`: the weights without tokenizer and configs."""
    return sum(file.stat().st_size for file in _directory(path).glob("*.safetensors"))


def tensor_bytes_by_module(path: str | Path) -> dict[str, int]:
    """Bytes per module (tensor name minus its last component, e.g. `model.layers.0.mlp.down_proj`), summed over
    shards, read from the safetensors headers only: an 8-byte little-endian header length, then JSON mapping each
    tensor to its dtype, shape and `data_offsets` [begin, end)."""
    files = sorted(_directory(path).glob("*.safetensors"))
    if not files:
        raise SlimlmError(f"'{path}' holds no .safetensors files", "pass the directory a model was saved to")
    sizes: dict[str, int] = defaultdict(int)
    for file in files:
        for name, entry in _safetensors_header(file).items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                sizes[name.rpartition(".")[0] or name] += end - begin
    return dict(sizes)


def peak_memory() -> dict:
    """Process-wide peak memory since start: resident set size (CPU) and, with CUDA, the allocator's peak."""
    import resource  # POSIX only, so imported where used

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"cpu_peak_rss_mb": rss_mb, "cuda_max_allocated_mb": cuda_mb, "note": "process-wide peak since start"}


def _directory(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise SlimlmError(f"'{directory}' is not a directory", "pass the directory a model was saved to")
    return directory


def _safetensors_header(file: Path) -> dict:
    with file.open("rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        raw = handle.read(length) if 0 < length <= 100_000_000 else b""  # the format caps headers at 100 MB
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None  # reported below, with the non-dict case
    if not isinstance(header, dict):
        raise SlimlmError(f"'{file}' has no readable safetensors header", "the file is truncated or not safetensors; save the model again")
    return header
