"""Hand a (compressed) model to the engines people run: one file per format.

    hf                  dense Hugging Face checkpoint (quantized linears dequantized)        export/hf.py
    compressed-tensors  transformers + compressed-tensors, vLLM: packed int codes, sparsity   export/compressed_tensors.py
    gguf                llama.cpp: F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, 4/5/8-bit codes kept    export/gguf.py, gguf_types.py

`export_model` loads any model slimlm loads (alias, directory, .gguf, hub id) and writes it atomically.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from torch import nn

from slimlm.errors import SlimlmError

FORMATS = ("hf", "compressed-tensors", "gguf")


def auto_gguf_type(model: nn.Module) -> str:
    """The GGUF type that keeps the model's quantized codes (q4_0 over q4_1 for symmetric 4-bit), else f16."""
    from slimlm.export.gguf import CODE_BITS, code_layout_problem
    from slimlm.quantize.linear import QuantizedLinear

    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not quantized:
        return "f16"
    for gguf_type in CODE_BITS:
        if all(code_layout_problem(m.grid, m.in_features, gguf_type) is None for m in quantized):
            return gguf_type
    return "f16"


def _check_gguf_source_config(model: str) -> None:
    """A model directory's architecture is refused from its config.json, before minutes of loading weights."""
    config_path = Path(model).expanduser() / "config.json"
    if not config_path.is_file():
        return  # an alias, a .gguf file (llama.cpp's own architectures) or a hub id: checked once loaded
    from transformers import AutoConfig

    from slimlm.export.gguf import check_gguf_config

    try:
        config = AutoConfig.from_pretrained(config_path.parent, trust_remote_code=False)
    except (ValueError, OSError, KeyError):
        return  # load_model says what is wrong with the directory
    check_gguf_config(config)


def _source_gguf(loaded) -> Path | None:
    """The GGUF file the model came from (directly, or as the base of a slimlm directory), if it still exists."""
    from slimlm.models.save import read_manifest

    if loaded.kind in ("gguf", "alias-gguf"):
        return Path(loaded.resolved)
    if loaded.kind == "slimlm-dir":
        base = read_manifest(loaded.resolved).get("base_model", {})
        if base.get("kind") in ("gguf", "alias-gguf") and Path(base.get("resolved", "")).is_file():
            return Path(base["resolved"])
    return None


def export_model(
    model: str,
    format: str,
    out: str | Path,
    gguf_type: str = "auto",
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Export `model` to `format` ("hf", "compressed-tensors" or "gguf") at `out` (a directory, or a .gguf file),
    atomically. This is the API's `export` verb (`slimlm.api.export`).

    `gguf_type`: "auto" keeps the model's quantized codes when a GGUF block format holds them (else f16), or one of
    f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1. Returns what was written (path, bytes, tensor types, codes kept / re-quantized).
    """
    from slimlm.models.load import load_model
    from slimlm.models.save import check_output_dir, check_writable

    if format not in FORMATS:
        raise SlimlmError(f"unknown export format '{format}'", f"use one of: {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if format == "gguf":
        from slimlm.export.gguf import GGUF_TYPES

        if gguf_type != "auto" and gguf_type not in GGUF_TYPES:
            raise SlimlmError(f"unknown GGUF type '{gguf_type}'", f"use auto or one of: {', '.join(GGUF_TYPES)}")
        if out.suffix != ".gguf":
            raise SlimlmError(f"GGUF output '{out}' does not end in .gguf", "name the output file, e.g. --out model-q4_0.gguf")
        if out.exists() and (not overwrite or out.is_dir()):
            raise SlimlmError(f"output '{out}' already exists", "choose another --out, or pass --overwrite to replace the file")
        check_writable(out)
        _check_gguf_source_config(model)
    else:
        check_output_dir(out, overwrite)
    loaded = load_model(model, allow_pickle=allow_pickle, device="cpu")
    return export_loaded(loaded, format, out, gguf_type=gguf_type, overwrite=overwrite)


def export_loaded(loaded, format: str, out: Path, gguf_type: str = "auto", overwrite: bool = False) -> dict:
    """`export_model` for a model already in memory (a `LoadedModel` on the CPU; `compress` hands over the model it
    just saved instead of reading it back). Quantized linears may be dequantized in place (hf)."""
    from slimlm.models.save import read_manifest

    source_manifest = read_manifest(loaded.resolved) if loaded.kind == "slimlm-dir" else {}
    result: dict = {"model": loaded.source, "format": format, "path": str(out)}
    if format == "gguf":
        from slimlm.export.gguf import write_gguf

        chosen = auto_gguf_type(loaded.model) if gguf_type == "auto" else gguf_type
        recipe = source_manifest.get("recipe", {}).get("name")
        name = f"{Path(loaded.resolved).stem}" + (f" ({recipe})" if recipe else "")
        summary = write_gguf(loaded.model, loaded.tokenizer, out, chosen, _source_gguf(loaded), name=name, overwrite=overwrite)
        result.update({key: value for key, value in asdict(summary).items() if key != "path"})
        return result
    manifest = {key: value for key, value in source_manifest.items() if key not in ("quantized_linears", "storage", "versions", "slimlm_manifest_version")}
    manifest["export"] = {"format": format, "from": {"source": loaded.source, "resolved": loaded.resolved, "kind": loaded.kind}}
    if format == "hf":
        from slimlm.export.hf import write_hf

        write_hf(loaded.model, loaded.tokenizer, out, manifest, overwrite)
    else:
        from slimlm.export.compressed_tensors import write_compressed_tensors

        write_compressed_tensors(loaded.model, loaded.tokenizer, out, manifest, overwrite)
    written = read_manifest(out)
    result.update(bytes=written["storage"]["weight_bytes"], quantized_linears=len(written["quantized_linears"]))
    return result
