"""LoRA adapters as GGUF files llama.cpp loads beside its base model (`llama-cli -m base.gguf --lora adapter.gguf`,
llama-cpp-python's `Llama(model_path=..., lora_path=...)`), written as llama.cpp's convert_lora_to_gguf.py does:

    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = α
    blk.N.<tensor>.weight.lora_a  (r, in)     blk.N.<tensor>.weight.lora_b  (out, r)     (torch shapes, F32)

llama.cpp adds scale · (α / r) · B (A x) to each adapted matmul, r read from lora_b: the same update peft trains.
For Llama-family bases the q/k rows are permuted into llama.cpp's RoPE layout (as the base's own export does), so
lora_b of q_proj/k_proj is permuted the same way; lora_a reads the unpermuted input and stays as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.export.gguf import ARCHITECTURES, permute_rope_rows
from slimlm.models.adapters import decoder_blocks

ADAPTER_NAME = "default"  # peft's name for the one adapter slimlm trains


def lora_tensors(peft_model: nn.Module) -> tuple[str, float, list[tuple[str, torch.Tensor]]]:
    """(llama.cpp architecture, α, [(gguf name, tensor)]) of a peft LoRA model, in llama.cpp's names and layout."""
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise SlimlmError(
            f"a GGUF LoRA adapter for '{config.model_type}' is not offered",
            f"slimlm writes GGUF for {', '.join(ARCHITECTURES)}; keep the peft adapter for this model",
        )
    lora = peft_model.peft_config[ADAPTER_NAME]
    if getattr(lora, "use_dora", False):
        raise SlimlmError(
            "llama.cpp's LoRA adapters cannot hold DoRA's magnitudes",
            "use --method lora for a GGUF adapter, or --merge and export the merged model",
        )
    if getattr(lora, "use_rslora", False):
        raise SlimlmError(
            "llama.cpp scales adapters by α/r, not rsLoRA's α/√r", "train without rsLoRA for a GGUF adapter"
        )
    arch = ARCHITECTURES[config.model_type]
    tensors = []
    for index, block in enumerate(decoder_blocks(model)):
        for rel, base in arch.block:
            module = block.get_submodule(rel)
            if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
                continue
            a = module.lora_A[ADAPTER_NAME].weight.detach().float().cpu()  # (r, in)
            b = module.lora_B[ADAPTER_NAME].weight.detach().float().cpu()  # (out, r)
            rows = arch.rope_rows(rel, config)
            if rows:
                b = permute_rope_rows(b, rows)
            tensors += [(f"blk.{index}.{base}.weight.lora_a", a), (f"blk.{index}.{base}.weight.lora_b", b)]
    if not tensors:
        raise SlimlmError("the model holds no LoRA adapter on a block linear", "train with --method lora")
    return arch.name, float(lora.lora_alpha), tensors


def check_base_gguf(base_gguf: Path, model: nn.Module) -> None:
    """Refuse an adapter for another base: the GGUF's architecture, depth and width must be this model's."""
    from gguf import GGUFReader

    reader = GGUFReader(str(base_gguf))

    def field(key: str):
        entry = reader.fields.get(key)
        if entry is None:
            return None
        value = entry.parts[entry.data[0]]
        return bytes(value).decode() if entry.types and entry.types[0].name == "STRING" else int(value[0])

    arch = field("general.architecture")
    config = model.config
    wanted_arch = ARCHITECTURES[config.model_type].name if config.model_type in ARCHITECTURES else config.model_type
    theirs = (arch, field(f"{arch}.block_count"), field(f"{arch}.embedding_length"))
    ours = (wanted_arch, len(decoder_blocks(model)), config.hidden_size)
    if theirs != ours:
        raise SlimlmError(
            f"the adapter was trained for a {ours[0]} model with {ours[1]} blocks of width {ours[2]}, but '{base_gguf}' is a {theirs[0]} model with {theirs[1]} blocks of width {theirs[2]}",
            "load the adapter with the GGUF of the model it was fine-tuned from",
        )


def write_lora_gguf(peft_model: nn.Module, out: str | Path, base_gguf: str | Path | None = None) -> dict:
    """Write the LoRA adapter as a GGUF adapter file (atomically); with `base_gguf`, first check it is this base."""
    from gguf import GGUFWriter

    out = Path(out)
    if base_gguf is not None:
        check_base_gguf(Path(base_gguf), peft_model.get_base_model())
    arch, alpha, tensors = lora_tensors(peft_model)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = GGUFWriter(str(partial), arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, tensor in tensors:
        writer.add_tensor(name, tensor.numpy())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {
        "path": str(out),
        "architecture": arch,
        "alpha": alpha,
        "tensors": len(tensors),
        "bytes": out.stat().st_size,
    }
