"""What a model in memory costs to keep: parameters, sparsity, shipped bytes and peak memory (a saved model's bytes on
disk are the saved format's: `slimlm.checkpoint.sizes`)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

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
    return sum(
        p.numel() * (min(p.element_size(), 2) if p.is_floating_point() else p.element_size())
        for p in model.parameters()
    )


def sparsity(model: nn.Module, linear_names: Iterable[str]) -> float:
    """Share of exact zeros in the `.weight` of the named modules (quantized codes are not counted: a zero code
    need not dequantize to zero)."""
    modules = dict(model.named_modules())
    for name in linear_names:
        if name not in modules:
            raise SlimlmError(
                f"the model has no module '{name}'", "pass fully-qualified module names from model.named_modules()"
            )
    weights = [getattr(modules[name], "weight", None) for name in linear_names]
    zeros, total = _zero_share(weight for weight in weights if isinstance(weight, torch.Tensor))
    if total == 0:
        raise SlimlmError(
            "none of the named modules has a .weight tensor to measure sparsity on",
            "measure sparsity before quantizing",
        )
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


def peak_memory() -> dict:
    """Process-wide peak memory since start: resident set size (CPU) and, with CUDA, the allocator's peak."""
    import resource  # POSIX only, so imported where used

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"cpu_peak_rss_mb": rss_mb, "cuda_max_allocated_mb": cuda_mb, "note": "process-wide peak since start"}
