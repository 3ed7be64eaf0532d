"""`save_model`: a model in memory -> the saved-model directory (see this package's docstring), atomically, and the
manifest that was written, so a caller goes on (to export, to a report) without reading anything back."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimlm.checkpoint.atomic import atomic_directory, disk_error, file_mode
from slimlm.checkpoint.layout import quantization_config, quantized_linear_tensors
from slimlm.checkpoint.manifest import MANIFEST, written_manifest
from slimlm.checkpoint.sizes import METADATA, bytes_by_module
from slimlm.errors import SlimlmError
from slimlm.quantize.linear import QuantizedLinear

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Saved:
    """What `save_model` wrote: the directory and its whole manifest (slimlm.json as written)."""

    path: Path
    manifest: dict


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to save: dense parameters/buffers as they are, quantized linears packed; tied copies once."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized.items():
        tensors.update(quantized_linear_tensors(name, module))
    seen: set[int] = set()
    persistent = {name for name, _ in model.named_buffers()} - _non_persistent_buffers(model)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update({name: buf for name, buf in model.named_buffers() if name in persistent})
    for name, tensor in state.items():
        owner = name.rpartition(".")[0]
        if owner in quantized or tensor is None:
            continue
        if tensor.data_ptr() in seen:  # tied (e.g. lm_head = embed_tokens): transformers re-ties on load
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for buffer in module._non_persistent_buffers_set:
            names.add(f"{module_name}.{buffer}" if module_name else buffer)
    return names


def save_model(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    manifest: dict,
    overwrite: bool = False,
    sparsity: dict | None = None,
) -> Saved:
    """Write safetensors + config + generation config + tokenizer + slimlm.json (`manifest` plus what the writer
    adds, `checkpoint.manifest`); return the final path and the manifest written.

    `sparsity`: a compressed-tensors `sparsity_config` recorded in config.json's quantization_config (export)."""
    tensors = weight_tensors(model)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            index = tuple(int(i) for i in (~torch.isfinite(tensor)).nonzero()[0])
            raise SlimlmError(
                f"not saving: weight '{name}' holds {tensor[index].item()} at index {list(index)}",
                "a stage produced NaN/Inf weights (or the input model had them); nothing was written",
            )
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        with atomic_directory(out_dir, overwrite) as staging:
            written = _write_directory(model, tokenizer, staging, tensors, manifest, sparsity)
    except OSError as err:
        refused = disk_error(err, Path(out_dir), needed)
        if refused is None:
            raise
        raise refused from None
    return Saved(Path(out_dir), written)


def _write_directory(
    model: nn.Module, tokenizer, staging: Path, tensors: dict, manifest: dict, sparsity: dict | None
) -> dict:
    from safetensors.torch import save_file

    save_file(tensors, str(staging / WEIGHTS), metadata=METADATA)
    os.chmod(staging / WEIGHTS, file_mode())  # safetensors creates it 0600; the other files follow the umask
    config = model.config.to_dict()
    # Engines that dispatch on the class name (vLLM) need it; a model built from a config or a GGUF has none.
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config.pop("quantization_config", None)
    quant = quantization_config(model)
    if sparsity:
        quant = {**(quant or {"quant_method": "compressed-tensors", "format": "dense"}), "sparsity_config": sparsity}
    if quant:
        config["quantization_config"] = quant
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    written = written_manifest(model, bytes_by_module(tensors), manifest)
    (staging / MANIFEST).write_text(json.dumps(written, indent=2) + "\n")
    return written
