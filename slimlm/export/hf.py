"""Plain Hugging Face checkpoints: every quantized linear dequantized back to an nn.Linear in the model's dtype.

For tools that read neither compressed-tensors nor GGUF. The values are the quantized model's (what it computes),
only stored dense; W8A8 linears lose their activation quantization.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from slimlm.checkpoint.save import Saved, save_model
from slimlm.models.swap import replace_module_
from slimlm.quantize.linear import QuantizedLinear


def dequantize_linears_(model: nn.Module) -> int:
    """Replace every QuantizedLinear by an nn.Linear holding its dequantized weight; returns how many."""
    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, module in quantized:
        dense = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            dtype=module.compute_dtype,
            device=module.weight_q.device,
        )
        dense.weight.data.copy_(module.dequantized_weight())
        if module.bias is not None:
            dense.bias.data.copy_(module.bias.data)
        replace_module_(model, name, dense)
    return len(quantized)


def write_hf(model: nn.Module, tokenizer, out: str | Path, manifest: dict, overwrite: bool = False) -> Saved:
    """Save `model` (dequantized in place) as a dense Hugging Face checkpoint, atomically."""
    dequantize_linears_(model)
    return save_model(model, tokenizer, out, manifest, overwrite=overwrite)
