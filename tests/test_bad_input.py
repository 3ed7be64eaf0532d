"""Every input a user can get wrong ends in one line naming the problem and the fix, a non-zero exit code, no
traceback from inside torch or transformers, and nothing half-written on disk.

A few cases go through the real CLI in a subprocess (what a user sees); the rest call the Python API, which
raises the same `SlimlmError` the CLI prints (each subprocess costs seconds of imports).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TEXT, run_cli, tiny_model, tiny_tokenizer

from slimlm.api import EvalSettings, compress, evaluate
from slimlm.checkpoint.save import save_model
from slimlm.data.text import load_text
from slimlm.errors import SlimlmError
from slimlm.models.load import load_model
from slimlm.recipes import load_recipe
from slimlm.recipes.registry import METHODS


def assert_cli_error(result: subprocess.CompletedProcess, *words: str) -> None:
    out = result.stdout
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    error_lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, out  # one line: problem — fix
    for word in words:
        assert word in error_lines[0], out


def leftovers(out: Path) -> list[str]:
    """Anything in out's parent that a save into `out` may have created (the dir, `.out.partial-*`, `.out.old-*`)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("llama"), tiny_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, model_and_tokenizer) -> Path:
    """A plain Hugging Face directory (save_pretrained) of a tiny random Llama. Copy it before changing it."""
    model, tokenizer = model_and_tokenizer
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def copy_of(hf_dir: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(hf_dir, tmp_path / name))


def write_recipe(tmp_path: Path, body: str, name: str = "recipe") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return path


# 1. nonexistent model path


def test_cli_nonexistent_model_path(tmp_path):
    result = run_cli("eval", tmp_path / "no-such-model", "--seqlen", "32")
    assert_cli_error(result, "not found", "no-such-model", "smollm2-135m")


@pytest.mark.parametrize("source", ["./no-such-dir", "no-such-model", "a/b/c"])
def test_nonexistent_model_path(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SlimlmError, match=r"not found: no such file or directory.*check the path"):
        load_model(source)


# 2. a directory (or file) that is not a model


def test_directory_without_config_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(
        SlimlmError, match=r"is not a model directory \(no config.json\) — pass a Hugging Face model directory"
    ):
        load_model(str(tmp_path))


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(SlimlmError, match=r"is a file but not a .gguf model"):
        load_model(str(path))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not gguf at all")
    with pytest.raises(
        SlimlmError,
        match=r"GGUF file .* is 15 bytes, shorter than a GGUF header .* it is truncated or not a GGUF model",
    ):
        load_model(str(fake))


def test_config_without_weights(hf_dir, tmp_path):
    broken = copy_of(hf_dir, tmp_path)
    (broken / "model.safetensors").unlink()
    with pytest.raises(SlimlmError, match=r"has a config.json but no weights"):
        load_model(str(broken))


@pytest.mark.parametrize("config_text", ["{not json", ""])
def test_unreadable_config(hf_dir, tmp_path, config_text):
    broken = copy_of(hf_dir, tmp_path)
    (broken / "config.json").write_text(config_text)
    with pytest.raises(SlimlmError, match=r"could not load the model in .*config.json.* re-save the model"):
        load_model(str(broken))


def test_unknown_model_type(hf_dir, tmp_path):
    broken = copy_of(hf_dir, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    with pytest.raises(SlimlmError, match=r"could not load the model in .*no-such-architecture"):
        load_model(str(broken))


def test_weights_that_do_not_cover_the_config(hf_dir, tmp_path):
    """A config promising 3 blocks over weights for 2: transformers would fill block 3 with random numbers."""
    broken = copy_of(hf_dir, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(SlimlmError, match=r"do not match its config.json: 9 tensors are missing \(e.g. model.layers.2"):
        load_model(str(broken))


def test_weights_of_another_shape(hf_dir, tmp_path):
    broken = copy_of(hf_dir, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(SlimlmError, match=r"could not load the model in .* belong together"):
        load_model(str(broken))


def test_missing_tokenizer(hf_dir, tmp_path):
    broken = copy_of(hf_dir, tmp_path)
    for file in broken.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(SlimlmError, match=r"could not load the model in .*tokenizer files"):
        load_model(str(broken))


# 3. truncated or corrupt safetensors


def _truncate_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _drop_last_byte(data: bytes) -> bytes:
    return data[:-1]


def _garbage_header(data: bytes) -> bytes:
    return data[:8] + b"{garbage" + data[16:]


def _header_length_too_large(data: bytes) -> bytes:
    return (10**12).to_bytes(8, "little") + data[8:]


def _only_four_bytes(data: bytes) -> bytes:
    return data[:4]


@pytest.mark.parametrize(
    "corrupt", [_truncate_half, _drop_last_byte, _garbage_header, _header_length_too_large, _only_four_bytes]
)
def test_corrupt_safetensors(hf_dir, tmp_path, corrupt):
    broken = copy_of(hf_dir, tmp_path)
    weights = broken / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(
        SlimlmError,
        match=r"model.safetensors' is not a readable safetensors file .* truncated or corrupt; re-download or re-create",
    ):
        load_model(str(broken))


def test_cli_truncated_safetensors_of_a_slimlm_dir(model_and_tokenizer, tmp_path, text_file):
    model, tokenizer = model_and_tokenizer
    saved = save_model(model, tokenizer, tmp_path / "saved", {}).path
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = run_cli("eval", saved, "--data", text_file, "--seqlen", "32", "--windows", "1")
    assert_cli_error(result, "model.safetensors", "not a readable safetensors file", "truncated or corrupt")


# 4. pickle checkpoints


@pytest.fixture(scope="module")
def pickle_dir(tmp_path_factory, model_and_tokenizer) -> Path:
    """config.json + pytorch_model.bin (transformers 5 no longer writes .bin, so torch.save the state dict)."""
    model, tokenizer = model_and_tokenizer
    path = tmp_path_factory.mktemp("pickle") / "tiny-llama-bin"
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    return path


def test_pickle_checkpoint_refused_unless_allowed(pickle_dir, model_and_tokenizer):
    with pytest.raises(SlimlmError, match=r"holds only pickle checkpoints .* arbitrary code .* --allow-pickle"):
        load_model(str(pickle_dir))
    loaded = load_model(str(pickle_dir), allow_pickle=True, device="cpu")
    ids = torch.tensor([[1, 5, 9, 33, 70, 101]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model_and_tokenizer[0](ids).logits)


def test_cli_pickle_checkpoint(pickle_dir, text_file, tmp_path):
    refused = run_cli("eval", pickle_dir, "--data", text_file, "--seqlen", "32", "--windows", "1")
    assert_cli_error(refused, "pickle", "--allow-pickle")
    allowed = run_cli(
        "eval",
        pickle_dir,
        "--data",
        text_file,
        "--seqlen",
        "32",
        "--windows",
        "1",
        "--allow-pickle",
        "--json",
        tmp_path / "r.json",
    )
    assert allowed.returncode == 0, allowed.stdout
    assert json.loads((tmp_path / "r.json").read_text())["quality"]["perplexity"] > 1


# 5. unknown recipe method, unknown key, unknown recipe


def test_unknown_method(tmp_path):
    path = write_recipe(tmp_path, "- method: prune-everything\n")
    with pytest.raises(
        SlimlmError, match=rf"stage 1: unknown method 'prune-everything' — known methods: {', '.join(sorted(METHODS))}$"
    ):
        load_recipe(str(path))


def test_unknown_key(tmp_path):
    path = write_recipe(tmp_path, "- method: magnitude\n  sparsty: 0.5\n")
    with pytest.raises(SlimlmError, match=r"\(magnitude\): unknown key 'sparsty' — allowed keys: .*sparsity"):
        load_recipe(str(path))


def test_unknown_recipe_name():
    with pytest.raises(
        SlimlmError,
        match=r"recipe 'magnitude-2of5' is neither a shipped recipe nor a file — shipped recipes: .*magnitude-2of4",
    ):
        load_recipe("magnitude-2of5")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "has no stages"),
        ("- bits: 4\n", "a stage must be a mapping with a 'method' key"),
        ("- method: rtn\n  bits: four\n", r"'bits' is 'four', expected int"),
        ("- method: rtn\n  targets: '(('\n", "'targets' is not a valid regular expression"),
        # unknown keys at every level (top, stage, export), with the closest valid key
        (
            "stagse:\n  - method: rtn\nstages:\n  - method: rtn\n",
            r"recipe 'recipe': unknown key 'stagse' — allowed keys: name, description, stages, export \(closest: 'stages'\)",
        ),
        ("- method: rtn\n  bitz: 4\n", r"\(rtn\): unknown key 'bitz' — allowed keys: .* \(closest: 'bits'\)"),
        ("- method: wandaa\n", r"unknown method 'wandaa' — known methods: .* \(closest: 'wanda'\)"),
        (
            "stages:\n  - method: rtn\nexport: {format: gguf, gguf_typ: q4_0}\n",
            r"export: unknown key 'gguf_typ' — .*\(closest: 'gguf_type'\)",
        ),
    ],
)
def test_malformed_recipe(tmp_path, body, message):
    with pytest.raises(SlimlmError, match=message):
        load_recipe(str(write_recipe(tmp_path, body)))


def test_cli_unknown_key_in_recipe(tmp_path, hf_dir):
    path = write_recipe(tmp_path, "- method: rtn\n  bit: 4\n")
    result = run_cli("compress", hf_dir, "--recipe", path, "--out", tmp_path / "out", "--no-eval")
    assert_cli_error(result, "unknown key 'bit'", "allowed keys")
    assert leftovers(tmp_path / "out") == []


# 6. out-of-range values


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("- method: magnitude\n  sparsity: 1.5\n", r"'sparsity' is 1.5, outside \[0.0, 1.0\) — set 'sparsity' within"),
        ("- method: magnitude\n  sparsity: -0.1\n", r"'sparsity' is -0.1, outside \[0.0, 1.0\)"),
        ("- method: rtn\n  bits: 0\n", r"'bits' is 0, outside \[2, 8\] — set 'bits' within \[2, 8\]"),
        ("- method: rtn\n  group_size: 0\n", r"'group_size' is 0, outside"),
        ("- method: magnitude\n  pattern: '5:4'\n", r"pattern '5:4' is not understood — use 'unstructured' or 'n:m'"),
    ],
)
def test_out_of_range_values(tmp_path, body, message):
    with pytest.raises(SlimlmError, match=message):
        load_recipe(str(write_recipe(tmp_path, body)))


def test_unquoted_two_four_pattern_explains_yaml(tmp_path):
    """YAML 1.1 reads 2:4 as the sexagesimal number 124."""
    path = write_recipe(tmp_path, "- method: magnitude\n  pattern: 2:4\n")
    with pytest.raises(
        SlimlmError,
        match=r"'pattern' is 124, expected str \(YAML reads an unquoted 2:4 as a number: quote it, \"2:4\"\)",
    ):
        load_recipe(str(path))


def test_group_size_not_dividing_input_dim_fails_before_writing(hf_dir, tmp_path, text_file):
    """The tiny Llama's linears take 64 or 128 inputs; 48 divides neither."""
    path = write_recipe(tmp_path, "- method: rtn\n  bits: 4\n  group_size: 48\n")
    out = tmp_path / "out"
    with pytest.raises(
        SlimlmError,
        match=r"group_size 48 does not divide the input size 64 of model.layers.0.self_attn.q_proj — use a group_size that divides it \(e.g. 32, 64\)",
    ):
        compress(str(hf_dir), str(path), out, evaluation=EvalSettings(data=str(text_file), seqlen=32, max_windows=1))
    assert leftovers(out) == []


def test_cli_group_size_not_dividing_input_dim(hf_dir, tmp_path):
    path = write_recipe(tmp_path, "- method: rtn\n  bits: 4\n  group_size: 48\n")
    out = tmp_path / "out"
    result = run_cli("compress", hf_dir, "--recipe", path, "--out", out, "--no-eval")
    assert_cli_error(result, "group_size 48 does not divide", "use a group_size that divides it")
    assert leftovers(out) == []


def test_out_of_range_recipe_refused_before_loading_the_model(tmp_path):
    """The recipe is parsed before the model is read: a bad value costs no load (the model here does not exist)."""
    path = write_recipe(tmp_path, "- method: magnitude\n  sparsity: 1.5\n")
    with pytest.raises(SlimlmError, match="'sparsity' is 1.5"):
        compress(str(tmp_path / "no-such-model"), str(path), tmp_path / "out", evaluation=None)
    assert leftovers(tmp_path / "out") == []


# 7. unreadable or empty evaluation data


def test_cli_empty_eval_data(hf_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    result = run_cli(
        "compress",
        hf_dir,
        "--recipe",
        "magnitude-2of4",
        "--out",
        out,
        "--eval-data",
        empty,
        "--seqlen",
        "32",
        "--windows",
        "1",
    )
    assert_cli_error(result, "empty.txt is empty", "pass a source with some text")
    assert leftovers(out) == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("blank.txt", "  \n\n \n", r"the text of text file .*blank.txt is empty"),
        (
            "binary.txt",
            b"\xff\xfe\x00\x81 not utf-8",
            r"binary.txt' is not UTF-8 text \(byte 0\) — pass a UTF-8 text file",
        ),
        ("rows.jsonl", '{"text": "fine"}\nnot json\n', r"rows.jsonl line 2 is not valid JSON"),
        ("data.csv", "a,b\n1,2\n", r"unknown extension '.csv'"),
        (
            "short.txt",
            "hello",
            r"has only \d+ tokens, fewer than one window of 32 — use a shorter seqlen or a longer text",
        ),
    ],
)
def test_unreadable_eval_data(hf_dir, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(SlimlmError, match=message):
        evaluate(str(hf_dir), EvalSettings(data=str(path), seqlen=32, max_windows=1))


def test_missing_eval_data_and_directory_without_text(tmp_path):
    with pytest.raises(SlimlmError, match=r"text source .*missing.txt' does not exist — pass one of"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(SlimlmError, match=r"holds no wiki.test.raw"):
        load_text(str(tmp_path))


# 8. output directory that already exists


def test_cli_existing_output_refused(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("compress", hf_dir, "--recipe", "magnitude-2of4", "--out", out, "--no-eval")
    assert_cli_error(result, "already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_existing_output_replaced_with_overwrite(hf_dir, tmp_path, text_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(
        SlimlmError, match=r"output directory .* already exists — choose another --out, or pass --overwrite"
    ):
        compress(str(hf_dir), "magnitude-2of4", out, evaluation=None)
    assert (out / "keep.txt").exists()
    manifest = compress(str(hf_dir), "magnitude-2of4", out, evaluation=None, overwrite=True)
    assert manifest["recipe"]["name"] == "magnitude-2of4"
    assert not (out / "keep.txt").exists()
    assert {"config.json", "model.safetensors", "slimlm.json"} <= {p.name for p in out.iterdir()}
    assert leftovers(out) == ["out"]


def test_output_path_that_is_a_file(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(SlimlmError, match=r"exists and is a file"):
        compress(str(hf_dir), "magnitude-2of4", out, evaluation=None, overwrite=True)
    assert out.read_text() == "a file"


# 9. hub id while offline


def test_cli_hub_id_offline_fails_at_once():
    start = time.perf_counter()
    result = run_cli("eval", "slimlm-tests/no-such-model", env={"HF_HUB_OFFLINE": "1"})
    assert_cli_error(result, "cannot reach the Hugging Face hub", "slimlm-tests/no-such-model", "pass a local path")
    assert time.perf_counter() - start < 60  # imports only: no network timeouts or retries


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(SlimlmError, match=r"cannot reach the Hugging Face hub .* pass a local path instead"):
        load_model("slimlm-tests/no-such-model")
    assert time.perf_counter() - start < 10


# 10. an interrupted save leaves nothing that looks complete


class Interrupted(Exception):
    pass


def _boom(*args, **kwargs):
    raise Interrupted("interrupted mid-save")


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
def test_interrupted_save_leaves_nothing(model_and_tokenizer, tmp_path, monkeypatch, error):
    model, tokenizer = model_and_tokenizer

    def stop(*args, **kwargs):
        raise error("interrupted mid-save")

    monkeypatch.setattr(tokenizer, "save_pretrained", stop)  # weights and config are already written by then
    out = tmp_path / "out"
    with pytest.raises(error):
        save_model(model, tokenizer, out, {})
    assert leftovers(out) == []


def test_interrupted_compress_keeps_the_old_output(hf_dir, tmp_path, monkeypatch):
    """With --overwrite, a run that dies while saving must leave the previous result untouched."""
    import slimlm.checkpoint.manifest

    out = tmp_path / "out"
    compress(str(hf_dir), "magnitude-2of4", out, evaluation=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(slimlm.checkpoint.manifest, "library_versions", _boom)  # the last step before the manifest
    with pytest.raises(Interrupted):
        compress(str(hf_dir), "rtn-w8", out, evaluation=None, overwrite=True)
    assert leftovers(out) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# also: devices that do not exist


@pytest.mark.parametrize("device", ["gpu0", "cuda:99"])
def test_unusable_device(hf_dir, device):
    with pytest.raises(SlimlmError, match=rf"device '{device}' is not usable here .* pass --device cpu"):
        load_model(str(hf_dir), device=device)


# YAML aliases refused; values in errors bounded; recipe files bounded


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """Nested anchors ("billion laughs") would expand to 10^9 items; the loader refuses the first alias."""
    lines = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    body = "\n".join(lines) + "\nstages:\n  - method: rtn\n    targets: *a9\n"
    with pytest.raises(SlimlmError, match=r"uses a YAML alias at line 2, column \d+ — write the value out in full"):
        load_recipe(str(write_recipe(tmp_path, body)))


def test_error_messages_print_bounded_values(tmp_path):
    path = write_recipe(tmp_path, f"- method: rtn\n  bits: '{'x' * 100_000}'\n")
    with pytest.raises(SlimlmError) as caught:
        load_recipe(str(path))
    assert "'bits' is" in str(caught.value) and len(str(caught.value)) < 300


def test_oversized_recipe_file_is_refused(tmp_path):
    path = write_recipe(tmp_path, "- method: rtn\n" + "# padding\n" * 200_000)
    with pytest.raises(SlimlmError, match=r"is \d+ bytes — a recipe is a short YAML list"):
        load_recipe(str(path))


def test_cli_output_path_that_is_a_file_says_so_without_overwrite(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    result = run_cli("compress", hf_dir, "--recipe", "magnitude-2of4", "--out", out, "--no-eval")
    assert_cli_error(result, "exists and is a file, not a directory", "choose a new directory path for --out")
    assert "--overwrite" not in result.stdout
    assert out.read_text() == "a file"


def test_saved_directory_follows_the_umask_and_names_its_architecture(hf_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "saved"
        compress(str(hf_dir), "magnitude-2of4", out, evaluation=None)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # how vLLM resolves a checkpoint: config.architectures[0] names a transformers class
    import transformers

    assert getattr(transformers, config["architectures"][0]).__name__ == "LlamaForCausalLM"


def test_stale_partials_of_dead_runs_are_removed_by_the_next_run(hf_dir, tmp_path, capsys):
    """A SIGKILL during save leaves `.OUT.partial-PID`; the next run to OUT removes it (its pid is dead), not a live one."""
    probe = subprocess.Popen(["true"])
    probe.wait()
    stale = tmp_path / f".saved.partial-{probe.pid}"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".saved.partial-{os.getppid()}"
    live.mkdir()
    compress(str(hf_dir), "magnitude-2of4", tmp_path / "saved", evaluation=None)
    assert not stale.exists() and live.exists()
    assert f"removed 1 partial output(s) left by an interrupted run: {stale.name}" in capsys.readouterr().out


# destinations: read-only refused before any work; a full disk is one line naming path and bytes


@pytest.mark.parametrize("out", ["/proc/slimlm-out", "/proc/sys/slimlm/out"])
def test_cli_unwritable_destination_refused_before_any_work(hf_dir, out):
    started = time.monotonic()
    result = run_cli("compress", hf_dir, "--recipe", "magnitude-2of4", "--out", out, "--no-eval")
    assert_cli_error(result, "cannot write", "choose another --out")
    assert "compressing" not in result.stdout and time.monotonic() - started < 60


def test_cli_unwritable_gguf_destination_refused(hf_dir):
    result = run_cli("export", hf_dir, "--format", "gguf", "--out", "/proc/m.gguf")
    assert_cli_error(result, "cannot write", "choose another --out")


def test_full_disk_is_one_line_naming_path_and_bytes(hf_dir, tmp_path, monkeypatch):
    """ENOSPC from the writer (simulated at safetensors' write): one line, path and size, no partial left."""
    import errno

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(
        SlimlmError, match=r"cannot write '.*saved': the disk is full \(this output needs about \d+ MiB\) — free space"
    ):
        compress(str(hf_dir), "magnitude-2of4", tmp_path / "saved", evaluation=None)
    assert leftovers(tmp_path / "saved") == []


def test_non_finite_metrics_are_refused_not_reported(model_and_tokenizer):
    """A model whose outputs overflow gives perplexity nan: an error, never a result."""
    import copy

    from slimlm.api import quality_metrics
    from slimlm.evaluate.perplexity import make_windows

    model, tokenizer = model_and_tokenizer
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    windows = make_windows(tokenizer, load_text("default"), 32, 2)
    with pytest.raises(SlimlmError, match=r"the evaluation gave non-finite perplexity \(nan\)"):
        quality_metrics(broken, windows, None)


def test_non_finite_weights_are_never_saved(model_and_tokenizer, tmp_path):
    import copy

    model, tokenizer = model_and_tokenizer
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[3, 5] = float("inf")
    with pytest.raises(
        SlimlmError, match=r"not saving: weight 'model.layers.1.mlp.down_proj.weight' holds inf at index \[3, 5\]"
    ):
        save_model(broken, tokenizer, tmp_path / "out", {"recipe": {"name": "test"}})
    assert leftovers(tmp_path / "out") == []
