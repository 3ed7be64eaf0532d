"""A saved-model directory back into a model: `load_slimlm_dir` rebuilds quantized linears from their packed codes;
`from_pretrained_checked` reads a dense one through transformers. `models/load.py` (where a model comes from) calls
in here; this room never calls it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimlm.checkpoint.layout import grids_by_module, rebuild_quantized_linear, w8a8_modules
from slimlm.checkpoint.save import WEIGHTS
from slimlm.errors import SlimlmError


def from_pretrained_checked(path: Path, dtype: torch.dtype, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained`, refusing weights that do not cover the config: transformers would
    fill the gaps with random values and only log it."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, output_loading_info=True, trust_remote_code=False, **kwargs
    )
    missing = sorted(info["missing_keys"])
    if missing:
        raise SlimlmError(
            f"the weights in '{path}' do not match its config.json: {len(missing)} tensors are missing (e.g. {missing[0]})",
            "re-save the model, or fix config.json to describe the weights",
        )
    return model


def load_slimlm_dir(model_dir: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """Load a directory written by `save_model`, rebuilding quantized linears from their packed codes. The model is
    built with its parameters on the meta device and given the file's tensors as they are, so loading an int4 model
    never holds a dense fp32 copy of it (SmolLM2: 540 MB less at load, what QLoRA's memory figure is about)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from slimlm.models.swap import replace_module_

    config_dict = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    quant = config_dict.get("quantization_config")
    if quant is None or not quant.get("config_groups"):  # dense, or dense with only a sparsity_config
        return from_pretrained_checked(model_dir, dtype), tokenizer
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    del config.quantization_config
    tensors = load_file(str(model_dir / WEIGHTS))
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed, not stored
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    grids = grids_by_module(quant)
    w8a8 = w8a8_modules(quant)
    for name, grid in grids.items():
        replace_module_(model, name, rebuild_quantized_linear(name, tensors, grid, name in w8a8, dtype))
    dense = {
        key: value.to(dtype) if value.is_floating_point() else value
        for key, value in tensors.items()
        if key.rpartition(".")[0] not in grids
    }
    _, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [
        name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta
    ]  # not in the file
    if missing or unexpected:
        raise SlimlmError(
            f"'{model_dir}' does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})",
            "re-create the model with slimlm compress",
        )
    return model, tokenizer
