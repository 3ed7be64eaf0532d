"""Hostile or broken model files: nothing from them is executed, and each ends in one line naming the problem.

Remote code (`auto_map`), pickles the safe loader refuses, and non-finite weights are all refused at load time,
through the Python API and (for remote code) through the real CLI, as a user would meet them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_model, tiny_tokenizer

from slimlm.errors import SlimlmError
from slimlm.models.load import load_model


def remote_code_dir(hf_dir: Path, tmp_path: Path, config_file: str) -> tuple[Path, Path]:
    """A copy of `hf_dir` whose `config_file` maps the Auto classes to a .py file that writes a marker on import."""
    path, marker = tmp_path / "remote", tmp_path / "marker-ran"
    shutil.copytree(hf_dir, path)
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((path / config_file).read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilModel",
        "AutoTokenizer": ["evil.EvilTokenizer", None],
    }
    (path / config_file).write_text(json.dumps(config))
    return path, marker


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_remote_code_refused_before_transformers_runs_it(hf_dir, tmp_path, config_file):
    path, marker = remote_code_dir(hf_dir, tmp_path, config_file)
    with pytest.raises(SlimlmError, match=r"needs its own Python code \(auto_map.*which slimlm never runs") as err:
        load_model(str(path), device="cpu")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_cli_remote_code_refused(hf_dir, tmp_path):
    path, marker = remote_code_dir(hf_dir, tmp_path, "config.json")
    result = run_cli("eval", path, "--seqlen", "32", "--windows", "1")
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout and "trust_remote_code" not in result.stdout, result.stdout
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs its own Python code" in errors[0], result.stdout
    assert not marker.exists()


class _Payload:
    """Pickles as a call that would create a file: the safe loader must refuse it without calling it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_the_safe_loader_refuses_is_one_line(hf_dir, tmp_path):
    path, marker = tmp_path / "pickled", tmp_path / "pickle-ran"
    path.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, path / name)
    state = tiny_model("llama").state_dict()
    state["model.norm.weight"] = _Payload(marker)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(SlimlmError, match=r"holds objects torch's safe loader refuses") as err:
        load_model(str(path), device="cpu", allow_pickle=True)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_refused_on_load_naming_tensor_and_index(tmp_path, bad):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(SlimlmError, match=r"not finite: model\.layers\.1\.mlp\.up_proj\.weight\[3, 5\]") as err:
        load_model(str(tmp_path / "m"), device="cpu")
    assert "\n" not in str(err.value)


def test_finite_model_still_loads(hf_dir):
    loaded = load_model(str(hf_dir), device="cpu")
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_remote_code_transformers_detects_is_the_same_one_line(hf_dir, monkeypatch):
    """Remote code that only transformers finds (e.g. a hub model read before it is cached): its refusal, raised
    because slimlm passes trust_remote_code=False, becomes slimlm's line, not a hint about a flag slimlm lacks."""
    import slimlm.models.load as load

    def refuse(*args, **kwargs):
        raise ValueError(
            "The repository x contains custom code which must be executed to correctly load the model. "
            "Please pass the argument `trust_remote_code=True` to allow custom code to be run."
        )

    monkeypatch.setattr(load, "from_pretrained_checked", refuse)
    with pytest.raises(SlimlmError, match=r"needs its own Python code .* which slimlm never runs") as err:
        load_model(str(hf_dir), device="cpu")
    assert "\n" not in str(err.value) and "trust_remote_code" not in str(err.value)
