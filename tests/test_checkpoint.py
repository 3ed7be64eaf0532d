"""The saved-model format's room: its declared layout is what the writer writes, its byte count is the file's size
before the file exists, the manifest it returns is the one on disk, and compress -> save -> export reads nothing back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CORE_ARCHS, tiny_model, tiny_tokenizer

from slimlm.checkpoint.layout import pack_quantized_linear, packed_entries
from slimlm.checkpoint.manifest import WRITER_KEYS, callers_part, read_manifest
from slimlm.checkpoint.save import WEIGHTS, save_model, weight_tensors
from slimlm.checkpoint.sizes import entry_of, safetensors_bytes, tensor_bytes_by_module
from slimlm.pipeline import compress_
from slimlm.quantize.linear import QuantizedLinear
from slimlm.recipes import parse_recipe


def rtn(model: torch.nn.Module, bits: int = 4, group_size: int | None = 32, symmetric: bool = False) -> torch.nn.Module:
    compress_(
        model, parse_recipe([{"method": "rtn", "bits": bits, "group_size": group_size, "symmetric": symmetric}], "rtn")
    )
    return model


@pytest.mark.parametrize(
    "bits,group_size,symmetric", [(4, 32, True), (4, 64, False), (8, None, True), (8, 32, False), (3, None, False)]
)
def test_the_declared_layout_is_what_the_packer_writes(bits, group_size, symmetric):
    model = rtn(tiny_model("llama"), bits, group_size, symmetric)
    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert quantized
    for name, module in quantized:
        written = pack_quantized_linear(name, module)
        declared = packed_entries(name, module.grid, (module.out_features, module.in_features))
        assert sorted(entry_of(key, tensor) for key, tensor in written.items()) == sorted(declared)


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("quantized", [False, True])
def test_bytes_are_known_exactly_before_the_file_is_written(arch, quantized, tmp_path):
    model = tiny_model(arch)
    if quantized:
        rtn(model)
    tensors = weight_tensors(model)
    predicted = safetensors_bytes([entry_of(name, tensor) for name, tensor in tensors.items()])
    saved = save_model(model, tiny_tokenizer(), tmp_path / "m", {"note": "bytes"})
    assert (saved.path / WEIGHTS).stat().st_size == predicted


def test_the_returned_manifest_is_the_one_on_disk(tmp_path):
    model = tiny_model("qwen2")
    rtn(model, symmetric=True)
    saved = save_model(
        model, tiny_tokenizer(), tmp_path / "m", {"recipe": {"name": "rtn"}, "storage": "stale, replaced by the writer"}
    )
    assert saved.manifest == read_manifest(saved.path)
    assert saved.manifest["recipe"] == {"name": "rtn"}
    by_module = tensor_bytes_by_module(saved.path)  # the headers, read back
    assert saved.manifest["storage"]["weight_bytes"] == sum(by_module.values())
    assert saved.manifest["storage"]["quantized_linear_bytes"] == sum(
        by_module[name] for name in saved.manifest["quantized_linears"]
    )
    assert set(WRITER_KEYS) >= set(saved.manifest) - set(callers_part(saved.manifest))
    assert callers_part(saved.manifest) == {"recipe": {"name": "rtn"}}


@pytest.mark.parametrize("target", ["gguf", "compressed-tensors", "hf"])
def test_compress_then_export_reads_nothing_back(hf_dir, tmp_path, monkeypatch, target):
    """After the base is loaded, the export step gets the model and the manifest from memory: reading a manifest
    or a saved model directory from disk fails the run."""
    import slimlm.checkpoint.load
    import slimlm.checkpoint.manifest
    import slimlm.models.load
    from slimlm.api import compress

    recipe = tmp_path / "rtn.yaml"
    recipe.write_text(
        f"stages:\n  - method: rtn\n    bits: 4\n    group_size: 32\n    symmetric: false\nexport: {target}\n"
    )

    def read_back(*args, **kwargs):
        raise AssertionError(f"read from disk: {args[:1]}")

    for module in (slimlm.checkpoint.manifest, slimlm.models.load):
        monkeypatch.setattr(module, "read_manifest", read_back)
    for module in (slimlm.checkpoint.load, slimlm.models.load):
        monkeypatch.setattr(module, "load_slimlm_dir", read_back)
    manifest = compress(model=str(hf_dir), recipe=str(recipe), out=tmp_path / "smol", evaluation=None)
    written = Path(manifest["export"]["path"])
    assert written.exists()
    if target != "gguf":
        exported = json.loads((written / "slimlm.json").read_text())
        assert exported["recipe"] == manifest["recipe"] and exported["export"]["from"]["kind"] == "slimlm-dir"
