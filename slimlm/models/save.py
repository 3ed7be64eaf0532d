"""The saved-model format: a Hugging Face directory plus the `slimlm.json` manifest, written atomically, and read
back (`load_slimlm_dir`, `from_pretrained_checked`); `models/load.py` finds a model's source and calls in here.

Everything is written into a hidden sibling directory and renamed into place at the end, so an
interrupted or failed run never leaves a directory that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quantize.linear import QuantizedLinear

MANIFEST = "slimlm.json"
WEIGHTS = "model.safetensors"


DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def disk_error(err: OSError, path: Path, needed: int | None = None) -> SlimlmError | None:
    """One line for a write that the destination refused (full, read-only, not permitted); None for other errors."""
    if err.errno not in DISK_ERRORS:
        return None
    amount = f" (this output needs about {needed / 2**20:.0f} MiB)" if needed else ""
    return SlimlmError(f"cannot write '{path}': {DISK_ERRORS[err.errno]}{amount}", "free space there, or choose another --out on a writable disk")


def check_writable(out: Path) -> None:
    """Before any work: the destination's folder exists or can be made, and a file can be created in it."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise disk_error(err, parent) or SlimlmError(f"cannot write into '{parent}': {err.strerror}", "choose another --out on a writable disk") from None


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output directory up front, before any expensive work."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SlimlmError(
            f"output path '{out}' exists and is a file, not a directory",
            "choose a new directory path for --out (slimlm saves a model as a directory and never replaces a file with one)",
        )
    if out.exists() and not overwrite:
        raise SlimlmError(f"output directory '{out}' already exists", "choose another --out, or pass --overwrite to replace it")
    check_writable(out)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the hidden partial outputs (`.NAME.partial-PID`) that a killed run left beside `out`, where PID is
    no longer alive; say so in one line. A live run's partial is left alone."""
    removed = []
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
            removed.append(partial)
    if removed:
        print(f"removed {len(removed)} partial output(s) left by an interrupted run: {', '.join(p.name for p in removed)}")
    return removed


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out_dir` only if the body finishes."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(trash)
        partial.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        partial.rename(out)


def _weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to save: dense parameters/buffers as they are, quantized linears packed; tied copies once."""
    from slimlm.quantize.storage import quantized_linear_tensors

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


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("slimlm", "torch", "transformers", "safetensors", "compressed-tensors", "gguf"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def save_model(model: nn.Module, tokenizer, out_dir: str | Path, manifest: dict, overwrite: bool = False, sparsity: dict | None = None) -> Path:
    """Write safetensors + config + generation config + tokenizer + slimlm.json; return the final path.

    `sparsity`: a compressed-tensors `sparsity_config` recorded in config.json's quantization_config (export)."""
    tensors = _weight_tensors(model)
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
            _write_directory(model, tokenizer, staging, tensors, manifest, sparsity)
    except OSError as err:
        refused = disk_error(err, Path(out_dir), needed)
        if refused is None:
            raise
        raise refused from None
    return Path(out_dir)


def _write_directory(model: nn.Module, tokenizer, staging: Path, tensors: dict, manifest: dict, sparsity: dict | None) -> None:
    from safetensors.torch import save_file

    from slimlm.quantize.kv_cache import kv_cache_manifest
    from slimlm.quantize.storage import quantization_config

    save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
    os.chmod(staging / WEIGHTS, 0o666 & ~_umask())  # safetensors creates it 0600; the other files follow the umask
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
    quantized = {name: [m.out_features, m.in_features] for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    storage = storage_summary(staging, quantized)
    full_manifest = {"slimlm_manifest_version": 1, **manifest, "quantized_linears": quantized, "storage": storage, "versions": library_versions()}
    full_manifest.update(activation_quantization(model))
    full_manifest.update(kv_cache_manifest(model))
    (staging / MANIFEST).write_text(json.dumps(full_manifest, indent=2) + "\n")


def activation_quantization(model: nn.Module) -> dict:
    """For W8A8 models: how activations are quantized and which matmul path (int8 or simulated) the linears run."""
    from slimlm.quantize.w8a8 import Int8Linear

    paths = [m.matmul for m in model.modules() if isinstance(m, Int8Linear)]
    if not paths:
        return {}
    return {"activation_quantization": {"scheme": "int8 per token, dynamic, symmetric", "matmul": {path: paths.count(path) for path in sorted(set(paths))}}}


def storage_summary(model_dir: Path, quantized: dict[str, list[int]]) -> dict:
    """Bytes of the saved weights, and of the quantized linears against what they would take in fp16."""
    from slimlm.evaluate.footprint import tensor_bytes_by_module

    by_module = tensor_bytes_by_module(model_dir)
    summary = {"weight_bytes": sum(by_module.values())}
    if quantized:
        packed = sum(by_module[name] for name in quantized)
        fp16 = sum(2 * out_features * in_features for out_features, in_features in quantized.values())
        summary.update(quantized_linear_bytes=packed, quantized_linear_fp16_bytes=fp16, quantized_share_of_fp16=packed / fp16)
    return summary


def read_manifest(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / MANIFEST).read_text())


def from_pretrained_checked(path: Path, dtype: torch.dtype, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained`, refusing weights that do not cover the config: transformers would
    fill the gaps with random values and only log it."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, trust_remote_code=False, **kwargs)
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
    from slimlm.quantize.storage import (
        grids_by_module,
        rebuild_quantized_linear,
        w8a8_modules,
    )

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
    dense = {key: value.to(dtype) if value.is_floating_point() else value for key, value in tensors.items() if key.rpartition(".")[0] not in grids}
    _, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]  # not in the file
    if missing or unexpected:
        raise SlimlmError(f"'{model_dir}' does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})", "re-create the model with slimlm compress")
    return model, tokenizer
