"""The `sparsity_config` a pruned model's config.json carries, found from the weights themselves:

    structure "2:4" / "4:8"  every decoder-block linear has at most n non-zeros in each m consecutive inputs
    "unstructured"           otherwise, when at least MIN_UNSTRUCTURED of the block weights are exactly zero

The weights are stored dense (`format: dense`). compressed-tensors' compressed sparse layouts (`sparse-bitmask`,
`sparse-24-bitmask`) are gone from compressed-tensors > 0.14 ("sparsity is removed for now") and from vLLM
(vllm-project/vllm#36799 removed the Sparse24 integration), so a bitmask checkpoint would load in neither; the
dense layout loads everywhere and the config still tells tools what the zeros are.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.models.adapters import block_linears, decoder_blocks, linear_weight
from slimlm.quantize.linear import QuantizedLinear

PATTERNS = ((2, 4), (4, 8))  # n:m structures checked, most restrictive first
MIN_UNSTRUCTURED = 0.25  # below this, exact zeros are what rounding to a grid leaves, not pruning


def block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """(out, in) weight of every decoder-block linear, quantized ones dequantized (their zeros stay exact zeros)."""
    weights = {}
    for index in range(len(decoder_blocks(model))):
        for name, module in block_linears(model, index).items():
            weights[name] = (
                module.dequantized_weight() if isinstance(module, QuantizedLinear) else linear_weight(module).detach()
            )
    return weights


def follows_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """At most n non-zeros in every m consecutive input columns of every row."""
    out_features, in_features = weight.shape
    if in_features % m:
        return False
    return bool(((weight != 0).reshape(out_features, in_features // m, m).sum(dim=2) <= n).all())


def sparsity_config(model: nn.Module) -> dict | None:
    """compressed-tensors' DenseSparsityConfig for `model`'s pruning, or None when it is not sparse."""
    from compressed_tensors.config import DenseSparsityConfig

    weights = block_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    structure = next((f"{n}:{m}" for n, m in PATTERNS if all(follows_pattern(w, n, m) for w in weights.values())), None)
    if structure is None and zeros / total < MIN_UNSTRUCTURED:
        return None
    config = DenseSparsityConfig(
        global_sparsity=zeros / total, sparsity_structure=structure or "unstructured", targets=sorted(weights)
    )
    return config.model_dump()
