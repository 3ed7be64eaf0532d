"""Per-tensor GGUF mixtures: llama.cpp's presets (checked against llama.cpp's own quantizer), --tensor-type
regexes, embedding/output types, their refusals, k-quant files in llama.cpp and transformers, and codes chosen
from calibration (importance-weighted rounding, GPTQ on each type's grid)."""

from __future__ import annotations

import copy
import ctypes

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import IDS as CONFIG_IDS
from conftest import run_cli, tiny_tokenizer

from slimlm.checkpoint.save import save_model
from slimlm.errors import SlimlmError
from slimlm.export import GGUFOptions, export_model, gguf_mixture
from slimlm.export.gguf import check_gguf_model, tensor_layout, write_gguf
from slimlm.export.gguf_calibrated import calibrated_codes, collect_statistics, head_importance
from slimlm.export.gguf_presets import PRESETS, preset_tensor_types, resolve_tensor_types
from slimlm.export.gguf_types import dequantize_tensor, quantize_tensor
from slimlm.pipeline import compress_
from slimlm.recipes import parse_recipe

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 64, 200, 31]])
LLAMA_FTYPES = {
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q8_0": "Q8_0",
    "q4_k_m": "Q4_K_M",
    "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K",
}


def kquant_model(layers: int = 8, seed: int = 0) -> torch.nn.Module:
    """A tiny llama shaped like SmolLM2 for the k-quants: rows of 64 (no k-quant) except ffn_down's 256."""
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **CONFIG_IDS,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def smollm2_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (49152, 576)}
    for i in range(30):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (576,),
                f"blk.{i}.attn_q.weight": (576, 576),
                f"blk.{i}.attn_k.weight": (192, 576),
                f"blk.{i}.attn_v.weight": (192, 576),
                f"blk.{i}.attn_output.weight": (576, 576),
                f"blk.{i}.ffn_gate.weight": (1536, 576),
                f"blk.{i}.ffn_up.weight": (1536, 576),
                f"blk.{i}.ffn_down.weight": (576, 1536),
            }
        )
    return shapes


def file_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}


def test_q4_k_m_on_smollm2_is_the_q5_0_q8_0_q6_k_q4_k_mix():
    types = preset_tensor_types(smollm2_shapes(), "q4_k_m")
    counts = {t: list(types.values()).count(t) for t in set(types.values())}
    # use_more_bits picks 14 of 30 layers: their attn_v want q6_k (-> q8_0 on rows of 576), their ffn_down q6_k
    assert counts == {"q8_0": 15, "q6_k": 14, "q4_k": 16, "q5_0": 166}
    assert types["token_embd.weight"] == "q8_0" and types["blk.0.attn_v.weight"] == "q8_0"
    assert types["blk.3.ffn_down.weight"] == "q4_k" and types["blk.5.ffn_down.weight"] == "q6_k"
    choices = resolve_tensor_types(smollm2_shapes(), "q4_k_m")
    assert choices["blk.3.attn_q.weight"].why == "preset q4_k_m, fallback q4_k→q5_0 (rows of 576)"
    q4_0 = preset_tensor_types(smollm2_shapes(), "q4_0", imatrix=True)
    assert [q4_0[f"blk.{i}.ffn_down.weight"] for i in range(5)] == ["q4_1"] * 3 + ["q4_0"] * 2
    assert preset_tensor_types(smollm2_shapes(), "q4_0", imatrix=False)["blk.0.ffn_down.weight"] == "q4_0"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_choose_what_llama_cpp_quantize_chooses(preset, tmp_path):
    """llama.cpp's own llama_model_quantize on the F16 file: the same type on every tensor (no imatrix)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = kquant_model(layers=16)
    base = tmp_path / "f16.gguf"
    write_gguf(model, tiny_tokenizer(), base, "f16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_FTYPES[preset]}")
    params.nthread = 1
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(base).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    expected = {
        name: kind
        for name, kind in file_types(theirs).items()
        if name in tensor_layout(model) and len(tensor_layout(model)[name]) == 2
    }
    assert preset_tensor_types(model, preset, imatrix=False) == expected


def test_k_quant_mixture_runs_in_llama_cpp_and_transformers_with_the_same_logits(tmp_path):
    """Q4_K/Q6_K blocks written by slimlm, read by transformers' GGUF loader (gguf's dequantizer) and llama.cpp."""
    model = kquant_model()
    path = tmp_path / "m.gguf"
    types = preset_tensor_types(model, "q4_k_m")
    summary = write_gguf(model, tiny_tokenizer(), path, "q8_0", tensor_types=types, file_type="q4_k_m")
    assert file_types(path)["blk.1.ffn_down.weight"] == "q4_k" and file_types(path)["blk.0.ffn_down.weight"] == "q6_k"
    assert summary.bytes == path.stat().st_size
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    _assert_llama_cpp_computes_transformers_logits(path, loaded)


def _assert_llama_cpp_computes_transformers_logits(path, loaded) -> None:
    """llama.cpp rounds activations to 8-bit blocks for k-quant dot products; a wrong block layout would be off by
    the logits' own size, so 3% of their range tells the two apart."""
    with torch.no_grad():
        expected = loaded(IDS, use_cache=False).logits[0].numpy()
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(IDS[0].tolist())
    assert np.abs(np.asarray(llm.scores[: IDS.shape[1]]) - expected).max() < 3e-2 * np.abs(expected).max()


def test_tensor_type_regexes_and_embedding_output_types(tmp_path):
    model = kquant_model()
    options = GGUFOptions(
        preset="q4_0", tensor_types=(r"blk\.\d+\.ffn_down\.weight=q6_k", "attn_v=q8_0"), embedding_type="q5_1"
    )
    choices = gguf_mixture(model, "q4_0", options)
    assert choices["blk.2.ffn_down.weight"].type == "q6_k" and choices["blk.2.attn_v.weight"].type == "q8_0"
    assert choices["token_embd.weight"].type == "q5_1" and choices["blk.2.attn_q.weight"].type == "q4_0"
    path = tmp_path / "m.gguf"
    write_gguf(model, tiny_tokenizer(), path, "q4_0", tensor_types={n: c.type for n, c in choices.items()})
    written = file_types(path)
    assert written["blk.7.ffn_down.weight"] == "q6_k" and written["token_embd.weight"] == "q5_1"
    assert written["blk.7.attn_norm.weight"] == "f32"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            GGUFOptions(preset="q4_0", tensor_types=("ffn_down=q4_k", "attn_q=q6_k")),
            r"asks for q6_k on blk\.0\.attn_q\.weight of shape \(64, 64\).*rows of 64",
        ),
        (GGUFOptions(preset="q4_0", tensor_types=("nothing_here=q8_0",)), r"'nothing_here' matches no tensor"),
        (GGUFOptions(preset="q4_0", tensor_types=("attn_q=q9_9",)), r"unknown GGUF type 'q9_9'.*"),
        (GGUFOptions(preset="q4_0", output_type="q4_k"), r"--output-type asks for q4_k on token_embd\.weight"),
    ],
    ids=["shape", "unmatched", "unknown-type", "tied-output"],
)
def test_bad_mixtures_are_named(options, message):
    with pytest.raises(SlimlmError, match=message) as err:
        gguf_mixture(kquant_model(), "q4_0", options)
    assert "\n" not in err.value.problem


def test_bad_option_values_are_refused_early():
    with pytest.raises(SlimlmError, match="unknown GGUF preset 'q3_k_xl'"):
        GGUFOptions(preset="q3_k_xl")
    with pytest.raises(SlimlmError, match="is not REGEX=TYPE"):
        gguf_mixture(kquant_model(), "q4_0", GGUFOptions(preset="q4_0", tensor_types=("q8_0",)))


def test_quantized_layers_are_checked_against_their_own_type():
    model = kquant_model()
    compress_(model, parse_recipe([{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}], "t"))
    check_gguf_model(model, "q4_0", {"blk.1.ffn_up.weight": "q4_1"})  # symmetric codes fit Q4_1 too
    with pytest.raises(SlimlmError, match=r"cannot be written as GGUF q8_0.*8-bit"):
        check_gguf_model(model, "q4_0", {"blk.1.ffn_up.weight": "q8_0"})
    with pytest.raises(SlimlmError, match=r"cannot be written as GGUF q4_k"):
        check_gguf_model(model, "q4_0", {"blk.1.ffn_down.weight": "q4_k"})


def _calibration_ids() -> torch.Tensor:
    return torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))


def test_importance_lowers_the_calibration_weighted_error_of_the_tied_embedding():
    model = kquant_model()
    ids = _calibration_ids()
    types = preset_tensor_types(model, "q4_0")
    types["token_embd.weight"] = "q4_0"
    _, importance = calibrated_codes(copy.deepcopy(model), ids, types, "imatrix")
    head = head_importance(model, ids)
    torch.testing.assert_close(importance["token_embd.weight"], head)
    weight = model.get_input_embeddings().weight.detach()

    def weighted(raw):
        return float((((dequantize_tensor(raw, "q4_0", weight.shape) - weight) ** 2) * head).sum())

    assert weighted(quantize_tensor(weight, "q4_0", head)) < weighted(quantize_tensor(weight, "q4_0"))
    assert set(importance) > {"blk.0.attn_q.weight", "blk.7.ffn_down.weight"}


def test_gptq_codes_lower_every_layers_output_error():
    model = kquant_model()
    statistics = collect_statistics(copy.deepcopy(model), _calibration_ids())
    types = preset_tensor_types(model, "q4_k_m")
    packed, importance = calibrated_codes(copy.deepcopy(model), None, types, "gptq", statistics=statistics)
    assert set(packed) == {name for name in types if name.startswith("blk.")} and "token_embd.weight" in importance
    layers = dict(model.named_modules())
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.ffn_down.weight"):
        block, part = name.split(".")[1], name.split(".")[2]
        rel = {"attn_q": "self_attn.q_proj", "ffn_down": "mlp.down_proj"}[part]
        weight = layers[f"model.layers.{block}.{rel}"].weight.detach()
        hessian, kind = statistics[0][name], types[name]

        def output_error(approx, weight=weight, hessian=hessian):
            delta = approx - weight
            return float(torch.trace(delta @ hessian @ delta.t()))

        rtn = dequantize_tensor(quantize_tensor(weight, kind, hessian.diagonal()), kind, weight.shape)
        assert output_error(dequantize_tensor(packed[name], kind, weight.shape)) < output_error(rtn), name


def test_cli_writes_a_preset_with_gptq_codes_and_names_bad_regexes(tmp_path):
    model = kquant_model(layers=2)
    source = tmp_path / "in"
    save_model(model, tiny_tokenizer(), source, {"recipe": {"name": "test"}})
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. small models are compressed models.\n" * 40)
    done = run_cli(
        "export",
        source,
        "--format",
        "gguf",
        "--preset",
        "q4_k_m",
        "--gguf-method",
        "gptq",
        "--calib-data",
        text,
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "16",
        "--tensor-type",
        "attn_k=q8_0",
        "--out",
        tmp_path / "m.gguf",
        "--json",
        tmp_path / "m.json",
    )
    assert done.returncode == 0, done.stdout
    assert "fallback q4_k→q5_0 (rows of 64)" in done.stdout and "GPTQ 14" in done.stdout
    assert file_types(tmp_path / "m.gguf")["blk.1.attn_k.weight"] == "q8_0"
    assert (
        gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    )
    bad = run_cli(
        "export",
        source,
        "--format",
        "gguf",
        "--preset",
        "q4_0",
        "--tensor-type",
        "attn_z=q8_0",
        "--out",
        tmp_path / "x.gguf",
    )
    assert bad.returncode == 2 and "matches no tensor" in bad.stdout and "Traceback" not in bad.stdout
    assert not (tmp_path / "x.gguf").exists()


def test_recipe_export_key_takes_the_same_options():
    stages = [{"method": "magnitude", "sparsity": 0.1}]
    step = parse_recipe(
        {
            "stages": stages,
            "export": {"format": "gguf", "preset": "q4_k_m", "method": "gptq", "tensor_types": {r"ffn_down": "q6_k"}},
        },
        "r",
    ).export
    options = step.gguf_options()
    assert options.preset == "q4_k_m" and options.tensor_types == ("ffn_down=q6_k",) and options.method == "gptq"
    for export, message in [
        ({"format": "gguf", "preset": "q7"}, "unknown GGUF preset 'q7'"),
        ({"format": "hf", "preset": "q4_0"}, "apply to format gguf only"),
        ({"format": "gguf", "tensor_types": {"x": "q9"}}, "unknown GGUF type 'q9'"),
    ]:
        with pytest.raises(SlimlmError, match=message):
            parse_recipe({"stages": stages, "export": export}, "r")


@pytest.mark.parametrize("name", ("q2_k", "q3_k"))
def test_low_bit_k_quants_export_and_read_back(name, tmp_path):
    """`slimlm export --format gguf --tensor-type ffn_down=q3_k` on a tiny llama whose ffn_down rows are 256:
    transformers' GGUF loader reads back exactly slimlm's dequantized ffn_down, and llama.cpp (when installed)
    computes the logits transformers does from the same file."""
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **CONFIG_IDS,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    save_model(model, tiny_tokenizer(), tmp_path / "in", {"recipe": {"name": "test"}})
    path = tmp_path / "m.gguf"
    export_model(str(tmp_path / "in"), "gguf", path, gguf=GGUFOptions(tensor_types=(f"ffn_down={name}",)))
    kinds = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.ffn_down.weight"] == name and kinds["blk.1.ffn_down.weight"] == name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    for ours, theirs in zip(model.model.layers, loaded.model.layers):
        weight = ours.mlp.down_proj.weight.detach()
        expected = dequantize_tensor(quantize_tensor(weight, name), name, weight.shape)
        torch.testing.assert_close(theirs.mlp.down_proj.weight, expected, rtol=0, atol=0)
    _assert_llama_cpp_computes_transformers_logits(path, loaded)
