"""Export to the engines: GGUF (llama.cpp) and compressed-tensors / plain HF (transformers, vLLM).

Each export is read back by the other side's own code: `gguf.GGUFReader` + `gguf.quants` (llama.cpp's
reference block formats), transformers' GGUF loader, transformers + compressed-tensors; logits are compared
with slimlm's model holding the same weights.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import WIKITEXT, run_cli, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from slimlm.checkpoint.save import save_model
from slimlm.checkpoint.sparsity import follows_pattern, sparsity_config
from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.export import auto_gguf_type, export_model
from slimlm.export.gguf import (
    code_layout_problem,
    pack_codes,
    permute_rope_rows,
    write_gguf,
)
from slimlm.models.adapters import decoder_blocks
from slimlm.pipeline import compress_
from slimlm.prune.depth import DepthConfig, prune_depth_
from slimlm.prune.width import WidthConfig, prune_width_
from slimlm.quantize.grid import QuantGrid, choose_qparams, dequantize, quantize_with
from slimlm.recipes import parse_recipe

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 64, 200, 31]])
GGUF_ARCHS = ["llama", "qwen2", "mistral"]


@functools.cache
def tokenizer():
    return tiny_tokenizer()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def compressed(arch: str, *stages: dict, seed: int = 0) -> torch.nn.Module:
    model = tiny_model(arch, seed)
    compress_(model, parse_recipe(list(stages), "test"))
    return model


def load_gguf_in_transformers(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def with_q8_0_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """What the 4-bit GGUF types hold for the embedding / tied output: its Q8_0 reference round trip."""
    embed = model.get_input_embeddings().weight
    q8 = gguf.quants.dequantize(
        gguf.quants.quantize(embed.detach().numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    with torch.no_grad():
        embed.copy_(torch.from_numpy(q8))
        if not model.config.tie_word_embeddings:
            head = model.get_output_embeddings().weight
            head.copy_(
                torch.from_numpy(
                    gguf.quants.dequantize(
                        gguf.quants.quantize(head.detach().numpy(), gguf.GGMLQuantizationType.Q8_0),
                        gguf.GGMLQuantizationType.Q8_0,
                    )
                )
            )
    return model


# --- block kernels against llama.cpp's reference formats --------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "gguf_type"),
    [
        (4, 32, True, "q4_0"),
        (4, 64, True, "q4_0"),
        (4, None, True, "q4_0"),
        (4, 32, False, "q4_1"),
        (4, 64, False, "q4_1"),
        (4, 128, True, "q4_1"),
        (8, None, True, "q8_0"),
        (8, 64, True, "q8_0"),
    ],
)
def test_codes_written_as_blocks_dequantize_to_slimlm_weights(bits, group, symmetric, gguf_type):
    torch.manual_seed(0)
    weight = torch.randn(8, 256) * torch.logspace(-2, 1, 8).unsqueeze(1)  # rows of very different scales
    grid = QuantGrid(bits, group, symmetric)
    scale, zero_point = choose_qparams(weight, grid)
    codes = quantize_with(weight, scale, zero_point, grid)
    packed = pack_codes(codes, scale, zero_point, gguf_type)
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type.upper())
    assert packed.shape == (8, 256 // 32 * gguf.GGML_QUANT_SIZES[qtype][1])
    ours = dequantize(codes, scale, zero_point).numpy()
    reference = gguf.quants.dequantize(packed, qtype)
    if gguf_type == "q4_1":  # m = −(z + 8)·s is rounded to fp16: at most half an fp16 ulp of |m| ≤ 16·s
        bound = 16 * scale.float().repeat_interleave(256 // scale.shape[1], dim=1).numpy() * 2.0**-11
        assert (np.abs(reference - ours) <= bound + 1e-12).all()
    else:
        assert np.array_equal(reference, ours)  # exact: d·(u − 8) = s·q in float32


def test_code_layouts_that_blocks_cannot_hold_are_named():
    assert code_layout_problem(QuantGrid(3, 32, True), 256, "q4_0") == "Q4_0 stores 4-bit codes, these are 3-bit"
    assert "no zero point" in code_layout_problem(QuantGrid(4, 32, False), 256, "q4_0")
    assert "no zero point" in code_layout_problem(QuantGrid(8, None, False), 256, "q8_0")
    assert "32-weight blocks" in code_layout_problem(QuantGrid(4, 16, True), 256, "q4_0")
    assert "32-weight blocks" in code_layout_problem(QuantGrid(4, None, True), 80, "q4_1")
    assert code_layout_problem(QuantGrid(4, 64, False), 256, "q4_1") is None
    assert code_layout_problem(QuantGrid(3, 32, True), 256, "f16") is None


def test_rope_permutation_is_undone_by_transformers_gguf_loader():
    rows = torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8 * 16, 3)  # 8 heads of 16
    permuted = permute_rope_rows(rows, 8)
    assert not torch.equal(permuted, rows)
    undone = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), 8, 8)
    assert np.array_equal(undone, rows.numpy())


# --- GGUF files, read back by gguf and by transformers -------------------------------------------------------------


@pytest.mark.parametrize("arch", GGUF_ARCHS)
@pytest.mark.parametrize("gguf_type", ["f16", "bf16"])
def test_float_gguf_loads_in_transformers_with_the_same_logits(arch, gguf_type, tmp_path):
    model = tiny_model(arch)
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, tokenizer(), path, gguf_type)
    assert summary.bytes == path.stat().st_size
    loaded = load_gguf_in_transformers(path)
    expected = logits(model)
    tolerance = 2e-3 if gguf_type == "f16" else 2e-2
    assert (logits(loaded) - expected).abs().max() < tolerance * expected.abs().max()


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0", "q4_1"])
def test_requantized_gguf_is_llama_cpp_reference_quantization(gguf_type, tmp_path):
    """A dense model re-quantized on export = the tensors gguf.quants (ggml's *_ref quantizers) gives."""
    model = tiny_model("llama")
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, tokenizer(), path, gguf_type)
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type.upper())
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    up = decoder_blocks(model)[1].mlp.up_proj.weight.detach().numpy()
    assert tensors["blk.1.ffn_up.weight"].tensor_type == qtype
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_up.weight"].data), gguf.quants.quantize(up, qtype))
    embed_type = gguf.GGMLQuantizationType.Q8_0  # 4-bit types keep the (tied) embedding / output at 8 bits
    assert tensors["token_embd.weight"].tensor_type == embed_type
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert summary.requantized == 7 * 2 + 1
    # transformers dequantizes the same blocks: logits agree with the reference-dequantized weights
    reference = tiny_model("llama")
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.dim() == 2:
                param.copy_(
                    torch.from_numpy(
                        gguf.quants.dequantize(
                            gguf.quants.quantize(param.detach().numpy(), embed_type if "embed" in name else qtype),
                            embed_type if "embed" in name else qtype,
                        )
                    )
                )
    assert torch.allclose(logits(load_gguf_in_transformers(path)), logits(reference), atol=1e-4)


@pytest.mark.parametrize("arch", GGUF_ARCHS)
@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "gguf_type"),
    [
        (4, 32, True, "q4_0"),
        (4, 64, False, "q4_1"),
        (8, None, True, "q8_0"),
        (5, 32, True, "q5_0"),
        (5, 64, False, "q5_1"),
    ],
)
def test_quantized_codes_are_kept_and_load_in_transformers(arch, bits, group, symmetric, gguf_type, tmp_path):
    model = compressed(arch, {"method": "rtn", "bits": bits, "group_size": group, "symmetric": symmetric})
    assert auto_gguf_type(model) == gguf_type
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, tokenizer(), path, gguf_type)
    assert summary.codes_kept == 14 and summary.requantized == (
        1 if model.config.tie_word_embeddings else 2
    )  # embedding (+ output)
    expected = logits(with_q8_0_embedding(model))
    tolerance = 1e-3 if gguf_type in ("q4_1", "q5_1") else 1e-4  # Q4_1/Q5_1's fp16 block minimum
    assert (logits(load_gguf_in_transformers(path)) - expected).abs().max() < tolerance * expected.abs().max()
    # the codes themselves, not a re-quantization: bytes equal packing slimlm's codes (q/k rows permuted for llama)
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    down = decoder_blocks(model)[0].mlp.down_proj
    zero = getattr(down, "weight_zero_point", None)
    assert np.array_equal(
        np.asarray(reader["blk.0.ffn_down.weight"].data), pack_codes(down.weight_q, down.weight_scale, zero, gguf_type)
    )


def test_per_tensor_types_and_importance_are_written_and_listed(tmp_path):
    from slimlm.export.gguf_types import dequantize_tensor, quantize_tensor

    model = tiny_model("llama")
    path = tmp_path / "m.gguf"
    importance = torch.rand(model.config.intermediate_size) * 10
    types = {"blk.0.ffn_down.weight": "q5_1", "token_embd.weight": "q5_0", "blk.1.attn_q.weight": "f16"}
    summary = write_gguf(
        model, tokenizer(), path, "q4_0", tensor_types=types, importance={"blk.0.ffn_down.weight": importance}
    )
    table = {row["name"]: row for row in summary.tensors}
    assert {name: table[name]["type"] for name in types} == types
    assert table["blk.0.ffn_up.weight"]["type"] == "q4_0"
    header = path.stat().st_size - sum(row["bytes"] for row in summary.tensors)
    assert 0 < header < 64 * 1024  # the table's bytes are the file's tensor bytes
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    down = decoder_blocks(model)[0].mlp.down_proj.weight
    assert np.array_equal(np.asarray(reader["blk.0.ffn_down.weight"].data), quantize_tensor(down, "q5_1", importance))
    back = dequantize_tensor(np.asarray(reader["blk.0.ffn_down.weight"].data), "q5_1", down.shape)
    assert (back - down).abs().max() < down.abs().max() / 16
    with pytest.raises(SlimlmError, match="'blk.99.ffn_down.weight' does not exist"):
        write_gguf(model, tokenizer(), tmp_path / "x.gguf", "q4_0", tensor_types={"blk.99.ffn_down.weight": "q8_0"})
    assert not (tmp_path / "x.gguf").exists()


def test_metadata_describes_the_model(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer(), path, "f16")
    fields = gguf.GGUFReader(path).fields

    def value(key):
        return fields[key].contents()

    config = model.config
    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == config.num_hidden_layers
    assert value("llama.embedding_length") == config.hidden_size
    assert value("llama.feed_forward_length") == config.intermediate_size
    assert (value("llama.attention.head_count"), value("llama.attention.head_count_kv")) == (4, 2)
    assert value("llama.context_length") == config.max_position_embeddings
    assert value("llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert value("llama.rope.dimension_count") == 16
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    assert value("tokenizer.ggml.eos_token_id") == tokenizer().eos_token_id
    # transformers rebuilds the same tokenizer from the file
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "small language models are compressed, 1234 times."
    assert rebuilt(text).input_ids == tokenizer()(text).input_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_structured_pruned_models_export_with_their_own_shapes(arch, tmp_path):
    calibration = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    model = tiny_model(arch)
    # transformers' GGUF loader reads no head size for qwen2 (llama.cpp does: attention.key_length), so the
    # round trip through transformers prunes qwen2's MLP only; the metadata is checked for both
    heads = 0.5 if arch == "llama" else 0.0
    prune_width_(model, WidthConfig(mlp=0.25, heads=heads), calibration)
    prune_depth_(model, DepthConfig(blocks=1), calibration)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer(), path, "f16")
    fields = gguf.GGUFReader(path).fields
    assert fields[f"{arch}.block_count"].contents() == 1
    assert fields[f"{arch}.feed_forward_length"].contents() == 96
    assert [t.shape.tolist() for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight"] == [[96, 64]]
    if heads:
        assert (
            fields[f"{arch}.attention.head_count"].contents(),
            fields[f"{arch}.attention.head_count_kv"].contents(),
        ) == (2, 1)
        assert fields[f"{arch}.attention.key_length"].contents() == 16  # head_dim != hidden / heads now
    expected = logits(model)
    assert (logits(load_gguf_in_transformers(path)) - expected).abs().max() < 2e-3 * expected.abs().max()


def test_refusals_name_the_formats_that_hold_the_model(tmp_path):
    three_bit = compressed("llama", {"method": "rtn", "bits": 3, "group_size": 32, "symmetric": True})
    with pytest.raises(
        SlimlmError,
        match=r"cannot be written as GGUF q4_0.*3-bit.*f16/bf16 \(dequantized\), --format compressed-tensors",
    ):
        write_gguf(three_bit, tokenizer(), tmp_path / "a.gguf", "q4_0")
    asym = compressed("llama", {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False})
    with pytest.raises(SlimlmError, match=r"no zero point.*--gguf-type q4_1 \(codes kept\)"):
        write_gguf(asym, tokenizer(), tmp_path / "b.gguf", "q4_0")
    int8 = compressed("llama", {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True})
    with pytest.raises(SlimlmError, match=r"--gguf-type q8_0 \(codes kept\)"):
        write_gguf(int8, tokenizer(), tmp_path / "c.gguf", "q4_1")
    with pytest.raises(SlimlmError, match="llama.cpp has no OPT architecture"):
        write_gguf(tiny_model("opt"), tokenizer(), tmp_path / "d.gguf", "f16")
    assert auto_gguf_type(three_bit) == "f16"
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_interrupted_gguf_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(tiny_model("llama"), tokenizer(), tmp_path / "m.gguf", "f16")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("arch", "stages", "gguf_type", "tolerance"),
    [
        ("llama", [], "f16", 2e-3),
        ("qwen2", [], "f16", 2e-3),
        ("llama", [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}], "q4_0", 1e-2),
        ("qwen2", [{"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}], "q4_1", 1e-2),
        ("llama", [{"method": "width", "mlp": 0.25, "heads": 0.5}], "f16", 2e-3),
        ("llama", [{"method": "rtn", "bits": 5, "group_size": 32, "symmetric": True}], "q5_0", 1e-2),
        ("qwen2", [{"method": "rtn", "bits": 5, "group_size": 64, "symmetric": False}], "q5_1", 1e-2),
    ],
    ids=[
        "llama-f16",
        "qwen2-f16",
        "llama-q4_0-codes",
        "qwen2-q4_1-codes",
        "llama-width-pruned",
        "llama-q5_0-codes",
        "qwen2-q5_1-codes",
    ],
)
def test_llama_cpp_computes_slimlm_logits(arch, stages, gguf_type, tolerance, tmp_path):
    """llama.cpp itself reads the file: same logits (4-bit: llama.cpp rounds activations to 8-bit blocks too)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_model(arch)
    if stages:
        calibration = CalibrationSet(
            torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1)), "", "test", 0
        )
        compress_(model, parse_recipe(stages, "test"), calibration)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer(), path, gguf_type)
    expected = logits(with_q8_0_embedding(model) if gguf_type != "f16" else model)[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(IDS[0].tolist())
    assert np.abs(np.asarray(llm.scores[: IDS.shape[1]]) - expected).max() < tolerance * np.abs(expected).max()


# --- compressed-tensors / HF directories ---------------------------------------------------------------------------


def saved(model, directory: Path) -> Path:
    save_model(model, tokenizer(), directory, {"recipe": {"name": "test"}})
    return directory


def test_sparsity_structure_is_found_from_the_weights():
    dense = tiny_model("llama")
    assert sparsity_config(dense) is None
    pruned = compressed("llama", {"method": "magnitude", "pattern": "2:4"})
    config = sparsity_config(pruned)
    assert config["format"] == "dense" and config["sparsity_structure"] == "2:4"
    assert config["global_sparsity"] == pytest.approx(0.5)
    weight = decoder_blocks(pruned)[0].mlp.up_proj.weight
    assert follows_pattern(weight, 2, 4) and not follows_pattern(dense.model.layers[0].mlp.up_proj.weight, 2, 4)
    unstructured = compressed("llama", {"method": "magnitude", "sparsity": 0.5})
    assert sparsity_config(unstructured)["sparsity_structure"] == "unstructured"
    assert (
        sparsity_config(compressed("llama", {"method": "rtn", "bits": 4, "group_size": 32})) is None
    )  # rounding zeros are not pruning


@pytest.mark.parametrize(
    "stages",
    [
        [{"method": "magnitude", "pattern": "2:4"}],
        [
            {"method": "magnitude", "pattern": "2:4"},
            {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
        ],
        [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}],  # asymmetric: transformers 5.23 + ct 0.20
    ],  # size-check the packed zero points against unpacked ones and refuse (vllm-project/llm-compressor#1618)
    ids=["2of4", "2of4-w8a16", "w4a16-g32"],
)
def test_compressed_tensors_export_loads_in_transformers_with_the_same_logits(stages, tmp_path):
    model = compressed("llama", *stages)
    result = export_model(str(saved(model, tmp_path / "in")), "compressed-tensors", tmp_path / "ct")
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    if stages[0]["method"] == "magnitude":
        assert quant["sparsity_config"]["sparsity_structure"] == "2:4"
    assert result["quantized_linears"] == (14 if stages[-1]["method"] == "rtn" else 0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)


def test_hf_export_is_dense_and_loads_in_plain_transformers(tmp_path):
    model = compressed("qwen2", {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True})
    export_model(str(saved(model, tmp_path / "in")), "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)


def test_cli_exports_gguf_and_refuses_bad_input(tmp_path):
    model = compressed("llama", {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False})
    source = saved(model, tmp_path / "in")
    done = run_cli("export", source, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert done.returncode == 0, done.stdout
    assert "q4_1" in done.stdout and "codes kept 14" in done.stdout
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    again = run_cli("export", source, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert again.returncode == 2 and "already exists" in again.stdout
    bad = run_cli("export", source, "--format", "gguf", "--gguf-type", "q4_0", "--out", tmp_path / "x.gguf")
    assert bad.returncode == 2 and "q4_1 (codes kept)" in bad.stdout and "Traceback" not in bad.stdout
    assert run_cli("export", source, "--format", "onnx", "--out", tmp_path / "y").returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "m.gguf"]


# --- the real model ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_round_trip_keeps_its_tokenizer_and_logits(tmp_path):
    from slimlm.models.load import load_model, resolve_alias

    result = export_model("smollm2-135m", "gguf", tmp_path / "smol.gguf", gguf_type="q8_0")
    source = gguf.GGUFReader(resolve_alias("smollm2-135m")).fields
    written = gguf.GGUFReader(tmp_path / "smol.gguf").fields
    for key in ("tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        assert written[key].contents() == source[key].contents()
    assert len(written["tokenizer.ggml.merges"].contents()) == len(source["tokenizer.ggml.merges"].contents())
    assert result["tensor_types"] == {"Q8_0": 211, "F32": 61}
    base = load_model("smollm2-135m", device="cpu").model
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    expected = logits(base, ids)
    exported = logits(load_gguf_in_transformers(tmp_path / "smol.gguf"), ids)
    # Q8_0 re-rounds every linear (blocks of 32, fp16 scales); over 30 blocks that moves the largest logit error to
    # ~2.7% of the largest logit (measured). A wrong q/k permutation or tensor mapping gives errors of order 100%.
    assert (exported - expected).abs().max() < 0.05 * expected.abs().max()
    assert (exported.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow
@pytest.mark.skipif(not WIKITEXT.is_dir(), reason="needs WikiText-2")
def test_llama_cpp_runs_the_export_with_slimlm_perplexity(tmp_path):
    """llama.cpp (llama-cpp-python) loads the GGUF, generates, and its perplexity is slimlm's within 2%."""
    pytest.importorskip("llama_cpp")
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "benchmarks")!r})
from engines import llama_cpp_perplexity, slimlm_perplexity, generate
from slimlm.export import export_model
export_model('smollm2-135m', 'gguf', {str(tmp_path / "smol.gguf")!r}, gguf_type='f16')
text = generate({str(tmp_path / "smol.gguf")!r}, 'The capital of France is', 8)
ours = slimlm_perplexity({str(tmp_path / "smol.gguf")!r}, windows=2, seqlen=512)
theirs = llama_cpp_perplexity({str(tmp_path / "smol.gguf")!r}, windows=2, seqlen=512)
print(repr(text), ours, theirs)
assert len(text.strip()) > 0 and abs(theirs / ours - 1) < 0.02, (ours, theirs)
"""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_shipped_recipe_exports_to_an_engine_format_that_loads(tmp_path):
    """Each shipped recipe's output goes to an engine format: GGUF (`auto`: codes kept where a block type holds
    them, else float16), or compressed-tensors where GGUF refuses; it loads in transformers with slimlm's logits
    (within float16 tolerance)."""
    import dataclasses

    from slimlm.recipes import load_recipe, shipped_recipes

    formats = {}
    for name in shipped_recipes():
        recipe = load_recipe(name)
        short = tuple(
            dataclasses.replace(s, steps=2, batch_size=2, seqlen=16, warmup=0) if s.method in ("distill", "qat") else s
            for s in recipe.stages
        )
        model = tiny_model("llama")
        compress_(
            model,
            dataclasses.replace(recipe, stages=short),
            CalibrationSet(torch.randint(0, 300, (2, 16)), "test", "random ids", 0),
            tokenizer=tokenizer(),
        )
        source = saved(model, tmp_path / name)
        expected = logits(model)
        try:
            export_model(str(source), "gguf", tmp_path / f"{name}.gguf")
            loaded, formats[name] = load_gguf_in_transformers(tmp_path / f"{name}.gguf"), "gguf"
        except SlimlmError:
            export_model(str(source), "compressed-tensors", tmp_path / f"{name}-ct")
            loaded, formats[name] = (
                AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-ct", dtype=torch.float32).eval(),
                "compressed-tensors",
            )
        got = logits(loaded)
        assert got.shape == expected.shape and bool(torch.isfinite(got).all()), name
        assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max()) + 1e-3, name
    assert formats.keys() == shipped_recipes().keys()
