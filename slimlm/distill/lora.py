"""LoRA recovery through `peft` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Each adapted linear computes  y = x Wᵀ + (α / r) · x Aᵀ Bᵀ  with A (r, in) random and B (out, r) zero at the start,
so the adapted model starts exactly equal to the original; only A and B train. `merge_lora` folds
W ← W + (α / r) B A into the plain linears and removes the adapters: the result is an ordinary Hugging Face model.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import block_linears, decoder_blocks, is_linear


def require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise SlimlmError(
            "LoRA needs the optional package 'peft'",
            "pip install 'slimlm[train]' (or pip install peft), or set lora: null for full fine-tuning",
        )


def lora_targets(model: nn.Module, selects=lambda name: True) -> list[str]:
    """Fully-qualified names of the dense decoder-block linears to adapt (those `selects` accepts)."""
    names = [
        name
        for index in range(len(decoder_blocks(model)))
        for name, module in block_linears(model, index).items()
        if selects(name) and is_linear(module)
    ]
    if not names:
        raise SlimlmError(
            "no dense decoder-block linear matches the LoRA targets (quantized layers cannot take adapters)",
            "fix the 'targets' regex; names look like 'model.layers.0.mlp.up_proj'",
        )
    return names


def lora_config(
    model: nn.Module, rank: int, alpha: float, targets: list[str], dora: bool = False, task_type: str | None = None
):
    """The peft LoraConfig adapting the linears named `targets`; `dora` adds DoRA's learned magnitudes (Liu et al.
    2024), `task_type="CAUSAL_LM"` makes the saved adapter loadable by peft's AutoPeftModelForCausalLM."""
    require_peft()
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets,
        use_dora=dora,
        task_type=task_type,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores (in, out)
    )


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Wrap `model` in a peft LoRA model adapting the linears named `targets` (in place: the adapters are injected
    into `model`'s own modules); only the adapters are trainable."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, rank, alpha, targets))


def merge_lora(adapted: nn.Module) -> nn.Module:
    """Fold every adapter into its linear (W ← W + (α/r)·B·A) and return the plain model the adapters were injected into."""
    return adapted.merge_and_unload()
