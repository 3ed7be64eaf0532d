"""Truncated and forged GGUF files are refused in one line before transformers' reader sees them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import run_cli

from slimlm.errors import SlimlmError
from slimlm.models.gguf_check import check_gguf_file
from slimlm.models.load import resolve_alias


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    return resolve_alias("smollm2-135m")


def test_the_shipped_model_is_well_formed(real_gguf):
    check_gguf_file(real_gguf)


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (10, r"shorter than a GGUF header"),
        (24, r"claims \d+ tensors and \d+ metadata entries, more than its 24 bytes can hold"),
        (200_000, r"is malformed|claims|ends at byte"),
        (-1000, r"is malformed: cannot reshape|ends at byte \d+, past the file's"),
    ],
    ids=["in-header", "after-header", "in-metadata", "in-last-tensor"],
)
def test_truncated_files_are_refused(real_gguf, tmp_path, cut, message):
    data = real_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(SlimlmError, match=message):
        check_gguf_file(path)


def test_forged_counts_and_magic_are_refused(real_gguf, tmp_path):
    data = bytearray(real_gguf.read_bytes()[:4096])
    forged = tmp_path / "forged.gguf"
    forged.write_bytes(bytes(data[:8]) + struct.pack("<QQ", 2**62, 3) + bytes(data[24:]))
    with pytest.raises(SlimlmError, match=r"claims 4611686018427387904 tensors"):
        check_gguf_file(forged)
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGML" + bytes(data[4:]))
    with pytest.raises(SlimlmError, match=r"does not start with the GGUF magic"):
        check_gguf_file(wrong)


def test_forged_metadata_is_refused_without_allocating_it(real_gguf, tmp_path):
    """The layout walk skips arrays by their counts, bounded by the file: a forged vocabulary count or an unknown
    value type is named in one line instead of reaching a parser."""
    data = bytearray(real_gguf.read_bytes()[:4_000_000])
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4  # past the key, its value type (array) and the element type (string)
    forged = tmp_path / "forged.gguf"
    forged.write_bytes(bytes(data[:at]) + struct.pack("<Q", 2**40) + bytes(data[at + 8 :]))
    with pytest.raises(SlimlmError, match=r"is malformed: an array claims 1099511627776 strings"):
        check_gguf_file(forged)
    first_type = 24 + 8 + struct.unpack_from("<Q", data, 24)[0]  # the header, the first key's length and bytes
    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(bytes(data[:first_type]) + struct.pack("<I", 99) + bytes(data[first_type + 4 :]))
    with pytest.raises(SlimlmError, match=r"is malformed: unknown metadata value type 99"):
        check_gguf_file(unknown)


@pytest.mark.parametrize("verb", [["eval"], ["export", "--format", "hf", "--out", "OUT"]])
def test_cli_refuses_a_truncated_gguf_in_one_line(real_gguf, tmp_path, verb):
    path = tmp_path / "cut.gguf"
    path.write_bytes(real_gguf.read_bytes()[:100])
    args = [str(tmp_path / "out") if a == "OUT" else a for a in verb]
    result = run_cli(verb[0], path, *args[1:])
    assert result.returncode == 2 and "Traceback" not in result.stdout + (result.stderr or "")
    assert "GGUF file" in result.stdout + (result.stderr or "")
