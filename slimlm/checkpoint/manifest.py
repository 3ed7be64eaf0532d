"""slimlm.json, the manifest beside a saved model's weights: the caller's part (base model, recipe, what each stage
did, metrics, an export's provenance) and what the writer adds, declared here once:

    slimlm_manifest_version  MANIFEST_VERSION
    quantized_linears        module -> [out_features, in_features], for every quantized linear
    storage                  weight_bytes, and for quantized linears their bytes against fp16
    versions                 python and the libraries that wrote the file
    activation_quantization  W8A8 models: the scheme and which matmul path the linears run
    kv_cache                 a model carrying a kv-cache setting: the setting and its bytes against float16
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from torch import nn

from slimlm.quantize.linear import QuantizedLinear

MANIFEST = "slimlm.json"
MANIFEST_VERSION = 1
WRITER_KEYS = (
    "slimlm_manifest_version",
    "quantized_linears",
    "storage",
    "versions",
    "activation_quantization",
    "kv_cache",
)
KV_CONTEXT = 2048  # tokens at which a kv-cache setting's bytes are recorded


def read_manifest(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / MANIFEST).read_text())


def callers_part(manifest: dict) -> dict:
    """The manifest without what the writer adds: what a re-save of the same model (an export) carries over."""
    return {key: value for key, value in manifest.items() if key not in WRITER_KEYS}


def written_manifest(model: nn.Module, bytes_by_module: dict[str, int], manifest: dict) -> dict:
    """The whole manifest of `model` saved with tensors of `bytes_by_module`: the caller's part and the writer's."""
    quantized = {
        name: [m.out_features, m.in_features] for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
    }
    written = {
        "slimlm_manifest_version": MANIFEST_VERSION,
        **callers_part(manifest),
        "quantized_linears": quantized,
        "storage": storage_summary(bytes_by_module, quantized),
        "versions": library_versions(),
    }
    written.update(activation_quantization(model))
    written.update(kv_cache_entry(model))
    return written


def storage_summary(bytes_by_module: dict[str, int], quantized: dict[str, list[int]]) -> dict:
    """Bytes of the saved weights, and of the quantized linears against what they would take in fp16."""
    summary = {"weight_bytes": sum(bytes_by_module.values())}
    if quantized:
        packed = sum(bytes_by_module[name] for name in quantized)
        fp16 = sum(2 * out_features * in_features for out_features, in_features in quantized.values())
        summary.update(
            quantized_linear_bytes=packed, quantized_linear_fp16_bytes=fp16, quantized_share_of_fp16=packed / fp16
        )
    return summary


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("slimlm", "torch", "transformers", "safetensors", "compressed-tensors", "gguf"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def activation_quantization(model: nn.Module) -> dict:
    """For W8A8 models: how activations are quantized and which matmul path (int8 or simulated) the linears run."""
    from slimlm.quantize.w8a8 import Int8Linear

    paths = [m.matmul for m in model.modules() if isinstance(m, Int8Linear)]
    if not paths:
        return {}
    return {
        "activation_quantization": {
            "scheme": "int8 per token, dynamic, symmetric",
            "matmul": {path: paths.count(path) for path in sorted(set(paths))},
        }
    }


def kv_cache_entry(model: nn.Module, context_len: int = KV_CONTEXT) -> dict:
    """For a model carrying a kv-cache setting (empty without one): the setting, where it is recorded, who uses it,
    and the cache bytes at `context_len` against float16."""
    from slimlm.quantize.kv_cache import CONFIG_KEY, DEFAULT_CHUNK, kv_cache_setting, kv_cache_summary

    config = kv_cache_setting(model)
    if config is None:
        return {}
    return {
        "kv_cache": {
            **kv_cache_summary(config, model.config, context_len),
            "scheme": config.describe(),
            "recorded_in": f"config.json '{CONFIG_KEY}'",
            "used_by": f"slimlm evaluation (windows fed {DEFAULT_CHUNK} tokens at a time through the cache); generation via model.generate(..., past_key_values=slimlm.quantize.kv_cache.kv_cache_for(model))",
        }
    }
