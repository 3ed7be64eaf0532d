"""QLoRA (Dettmers et al. 2023) on slimlm's own packed layers: LoRA adapters on frozen QuantizedLinear codes.

    y = x · dequant(codes)ᵀ + (α/r) · x Aᵀ Bᵀ

The base layer keeps only its integer codes and scales; each forward dequantizes one layer's weight, uses it and
drops it, and the backward pass dequantizes it again (`slimlm.quantize.linear._CodesMatmul`) instead of keeping it,
so the float weights of the whole model never exist at once. peft wraps the packed layer with its own LoRA `Linear`
through its custom-module mechanism; the adapters are saved in peft's format like any LoRA adapter and are loaded
back onto the same quantized model with `slimlm.finetune.api.load_adapter`. They are not merged: folding B·A into
the codes would re-quantize the update away.
"""

from __future__ import annotations


def register_quantized_lora(config) -> None:
    """Tell this peft LoraConfig to adapt slimlm's QuantizedLinear with peft's LoRA Linear (which only calls the
    base layer and adds the low-rank path, so it never needs a dense weight)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from slimlm.quantize.linear import QuantizedLinear

    config._register_custom_module({QuantizedLinear: LoraLinear})
