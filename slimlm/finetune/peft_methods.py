"""Parameter-efficient methods through `peft`, and the loss they all train on.

- LoRA (Hu et al. 2021): y = x Wᵀ + (α/r)·x Aᵀ Bᵀ on the block linears, B = 0 at the start.
- DoRA (Liu et al. 2024): W' = m · (W + (α/r)·B A) / ‖W + (α/r)·B A‖ (column norms), the magnitude m learned too.
- Prompt tuning (Lester et al. 2021): N learned embeddings prepended to every input; the model is untouched.
- Adaption prompt (LLaMA-Adapter, Zhang et al. 2023): learned prompts attended to by the top layers' attention
  through a zero-initialised gate, so training starts from the base model exactly (peft: llama, mistral, gpt2).
- full: every parameter trains (no peft).

Only the adapters train: the norms (HF's LlamaRMSNorm and kin, not `nn.RMSNorm`) and the tied embedding stay
frozen, which is what lets Opacus compute per-sample gradients of everything that trains (slimlm.finetune.privacy).
On a model whose linears are slimlm's packed QuantizedLinear, LoRA adapts them in place (QLoRA,
slimlm.finetune.qlora).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.distill.lora import lora_config, require_peft
from slimlm.errors import SlimlmError
from slimlm.finetune.data import IGNORE
from slimlm.finetune.settings import FinetuneSettings
from slimlm.models.adapters import block_linears, decoder_blocks, is_linear
from slimlm.quantize.linear import QuantizedLinear


def adapter_targets(model: nn.Module, pattern: str | None) -> list[str]:
    """Fully-qualified names of the block linears (dense or packed) whose name matches `pattern` (all when None)."""
    import re

    names = [
        name
        for index in range(len(decoder_blocks(model)))
        for name, module in block_linears(model, index).items()
        if (is_linear(module) or isinstance(module, QuantizedLinear)) and (pattern is None or re.search(pattern, name))
    ]
    if not names:
        raise SlimlmError(
            f"no decoder-block linear matches the targets '{pattern}'",
            "names look like 'model.layers.0.mlp.up_proj'; try --targets 'proj'",
        )
    return names


def apply_method(model: nn.Module, settings: FinetuneSettings) -> nn.Module:
    """`model` with the method's trainable parts added (in place for peft methods); everything else frozen."""
    if settings.method == "full":
        if any(isinstance(m, QuantizedLinear) for m in model.modules()):
            raise SlimlmError(
                "full fine-tuning cannot train packed quantized layers",
                "use --method lora (QLoRA) on a quantized model",
            )
        return model.requires_grad_(True)
    require_peft()
    from peft import AdaptionPromptConfig, PromptTuningConfig, get_peft_model

    quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    if settings.method in ("lora", "dora"):
        if quantized and settings.method == "dora":
            raise SlimlmError(
                "DoRA needs the dense weight's column norms, which a packed quantized layer does not hold",
                "use --method lora (QLoRA) on a quantized model",
            )
        rank = settings.rank
        config = lora_config(
            model,
            rank,
            settings.alpha or 2.0 * rank,
            adapter_targets(model, settings.targets),
            dora=settings.method == "dora",
            task_type="CAUSAL_LM",
        )
        if quantized:
            from slimlm.finetune.qlora import register_quantized_lora

            register_quantized_lora(config)
        return get_peft_model(model, config)
    if quantized:
        raise SlimlmError(
            f"{settings.method} on a quantized model is not offered", "use --method lora (QLoRA) on a quantized model"
        )
    if settings.method == "prompt-tuning":
        return get_peft_model(
            model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=settings.virtual_tokens)
        )
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    model_type = model.config.model_type
    if model_type not in TRANSFORMERS_MODEL_CONFIG:
        raise SlimlmError(
            f"peft's adaption prompts support {', '.join(TRANSFORMERS_MODEL_CONFIG)}, not '{model_type}'",
            "use --method lora or prompt-tuning for this model",
        )
    layers = min(settings.adapter_layers or len(decoder_blocks(model)), len(decoder_blocks(model)))
    return get_peft_model(
        model, AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=settings.adapter_len, adapter_layers=layers)
    )


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def per_sample_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of each row over its labelled tokens, and how many there are: both (B,).

    Prompt tuning prepends virtual tokens to the logits; the last T positions are the text's."""
    ids, labels = batch["input_ids"], batch["labels"]
    length = ids.shape[1]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits[
        :, -length:
    ]  # (B, T, V)
    targets = labels[:, 1:]  # position t predicts token t + 1
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return nll.view(targets.shape).sum(1), (targets != IGNORE).sum(1)


def finetune_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over rows of each row's mean token NLL (rows of weight 0, DP's empty draws, add nothing): with one
    loss per row, per-sample gradients (DP-SGD) are the gradients of these row losses."""
    total, count = per_sample_nll(model, batch)
    per_row = total / count.clamp(min=1)
    weight = batch.get("weight")
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    return per_row.mean()
