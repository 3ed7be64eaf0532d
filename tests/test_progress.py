"""Progress off a terminal: plain lines per stage and per evaluation, with elapsed time (a piped run shows life)."""

from __future__ import annotations

import re

from conftest import TEXT, run_cli, tiny_model, tiny_tokenizer

from slimlm import progress
from slimlm.checkpoint.save import save_model


def test_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("SLIMLM_QUIET", raising=False)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # every step gets its line
    assert not progress.console.is_terminal  # pytest captures stderr
    with progress.stage("compressing with rtn-w4"), progress.progress_bar("gptq", 3, unit="blocks") as advance:
        for _ in range(3):
            advance()
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r"^\[slimlm \d\d:\d\d:\d\d\] ", "", line) for line in lines[:4]] == [
        "compressing with rtn-w4 …",
        "gptq: 0/3 blocks",
        "gptq: 1/3 blocks, 0s elapsed",
        "gptq: 2/3 blocks, 0s elapsed",
    ]
    assert re.fullmatch(r"\[slimlm [\d:]+\] gptq: 3/3 blocks in \d+\.\ds", lines[4])
    assert re.fullmatch(r"\[slimlm [\d:]+\] compressing with rtn-w4: done in \d+\.\ds", lines[5]) and len(lines) == 6


def test_quiet_and_show_false_print_nothing(capsys, monkeypatch):
    monkeypatch.setenv("SLIMLM_QUIET", "1")
    with progress.stage("x"), progress.progress_bar("y", 2) as advance:
        advance()
    monkeypatch.delenv("SLIMLM_QUIET")
    with progress.progress_bar("z", 2, show=False) as advance:
        advance()
    assert capsys.readouterr().err == ""


def test_piped_run_prints_a_line_per_stage_and_evaluation(tmp_path):
    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny", {})
    (tmp_path / "text.txt").write_text(TEXT)
    result = run_cli(
        "run",
        "--model",
        tmp_path / "tiny",
        "--recipes",
        "magnitude-50,rtn-w4-g64",
        "--out",
        tmp_path / "report",
        "--eval-data",
        tmp_path / "text.txt",
        "--seqlen",
        "32",
        "--windows",
        "2",
        env={"SLIMLM_QUIET": "0"},
    )
    assert result.returncode == 0, result.stdout
    out = result.stdout
    for line in (
        "evaluating the base model: done in",
        "compressing with magnitude-50 (1/2): done in",
        "evaluating rtn-w4-g64 (2/2): done in",
    ):
        assert line in out, out
    assert len(re.findall(r"perplexity: 2/2 windows in \d+\.\ds", out)) == 3  # base and both variants
