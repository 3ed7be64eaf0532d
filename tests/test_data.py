"""Text sources and the calibration sampler."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

from slimlm.data.calibration import ids_sha256, sample_calibration, tokenize_text
from slimlm.data.text import Text, default_corpus_boundary, load_text
from slimlm.errors import SlimlmError

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(vocab_size=128)


def test_default_corpus_splits_are_disjoint_and_labelled():
    from pydoc_data.topics import topics

    evaluation, calibration = load_text("default", "evaluation"), load_text("default", "calibration")
    keys = sorted(topics)
    boundary = default_corpus_boundary(keys, [len(topics[k]) for k in keys])
    assert 0 < boundary < len(keys)
    assert evaluation.text == "\n\n".join(topics[k] for k in keys[boundary:])
    assert calibration.text == "\n\n".join(topics[k] for k in keys[:boundary])
    share = sum(len(topics[k]) for k in keys[boundary:]) / sum(len(v) for v in topics.values())
    assert 0.2 <= share < 0.2 + max(len(v) for v in topics.values()) / sum(len(v) for v in topics.values())
    assert "offline default corpus" in evaluation.label and "evaluation split" in evaluation.label
    assert "calibration split" in calibration.label and "pydoc_data.topics" in calibration.label
    assert load_text("default") == evaluation  # evaluation is the default split
    with pytest.raises(SlimlmError, match="no split 'test'"):
        load_text("default", "test")


@pytest.mark.skipif(not (WIKITEXT / "wiki.test.raw").is_file(), reason="shared/data/wikitext-2-raw is absent")
def test_wikitext2_matches_gptq_rows():
    loaded = load_text(f"wikitext2:{WIKITEXT}", "evaluation")
    # HF rows: line 0 is " \n" -> "", line 1 " = Robert Boulter = \n", line 2 blank -> "".
    assert loaded.text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    raw = (WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8")
    lines = raw.split("\n")[:-1]  # the file ends with "\n"
    blank = sum(1 for line in lines if not line.strip())
    assert len(lines) == 4358
    # Each blank line loses its " \n" (2 chars); the 4357 joins add 2 chars each.
    assert len(loaded.text) == len(raw) - 2 * blank + 2 * (len(lines) - 1)
    assert "WikiText-2 raw test" in loaded.label and "rows joined as in GPTQ" in loaded.label
    assert load_text(str(WIKITEXT)).text == loaded.text  # a directory holding wiki.test.raw is WikiText
    calibration = load_text(f"wikitext2:{WIKITEXT}", "calibration")  # no train file here: valid, said in the label
    assert "valid" in calibration.label and "wiki.train.raw is absent" in calibration.label
    assert calibration.text.startswith("\n\n = Homarus gammarus = \n\n")


def test_wikitext2_missing_file_names_the_path(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" \n = A = \n", encoding="utf-8")
    with pytest.raises(SlimlmError, match="wiki.valid.raw"):
        load_text(f"wikitext2:{tmp_path}", "valid")
    assert load_text(f"wikitext2:{tmp_path}", "test").text == "\n\n = A = \n"


def test_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n", encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt")) == Text("hello\nworld\n", f"text file {tmp_path / 'a.txt'}")
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two\\u2028still two", "id": 3}\n', encoding="utf-8")
    assert load_text(str(good)).text == "one\n\ntwo\u2028still two"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": broken}\n', "line 2 is not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', 'line 2 has no string field "text"'),
        ('{"text": 5}\n', "line 1 has no string"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SlimlmError, match=message) as info:
        load_text(str(path))
    assert str(path) in str(info.value)


def test_unusable_sources(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(SlimlmError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(SlimlmError, match="does not exist"):
        load_text(str(tmp_path / "nope.txt"))
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(SlimlmError, match="unknown extension '.csv'.*wikitext2:DIR"):
        load_text(str(tmp_path / "data.csv"))
    (tmp_path / "garbage.txt").write_bytes(b"ok \xff\xfe\x00")
    with pytest.raises(SlimlmError, match="not UTF-8"):
        load_text(str(tmp_path / "garbage.txt"))
    with pytest.raises(SlimlmError, match="holds no wiki.test.raw"):
        load_text(str(tmp_path))


def test_hugging_face_source_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    expected = (
        "pip install datasets"
        if importlib.util.find_spec("datasets") is None
        else "hub is unreachable.*pass a local file"
    )
    with pytest.raises(SlimlmError, match=expected):
        load_text("hf:slimlm-tests/does-not-exist:default")
    with pytest.raises(SlimlmError, match="hf:NAME"):
        load_text("hf:")


def test_tokenize_text_is_whole_and_quiet(tokenizer):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        ids = tokenize_text(tokenizer, load_text("default").text)  # far longer than model_max_length=64
    finally:
        logger.removeHandler(handler)
    assert ids.dtype == torch.int64 and ids.dim() == 1 and ids.numel() > 1000
    assert records == []
    assert torch.equal(
        tokenize_text(tokenizer, "def f(x):"), torch.tensor(tokenizer.encode("def f(x):", add_special_tokens=False))
    )


def test_sampler_is_deterministic_and_hashed(tokenizer):
    text = load_text("default", "calibration")
    a = sample_calibration(tokenizer, text, n_samples=4, seqlen=32, seed=0)
    b = sample_calibration(tokenizer, text, n_samples=4, seqlen=32, seed=0)
    c = sample_calibration(tokenizer, text, n_samples=4, seqlen=32, seed=1)
    assert a.input_ids.shape == (4, 32) and a.input_ids.dtype == torch.int64
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert not torch.equal(a.input_ids, c.input_ids) and a.sha256 != c.sha256
    assert a.sha256 == ids_sha256(a.input_ids) and len(a.sha256) == 64
    # Every window is a contiguous slice of the token stream (GPTQ draws windows, not tokens).
    stream = tokenize_text(tokenizer, text.text)
    rng = random.Random(0)
    for row in a.input_ids:
        start = rng.randint(0, stream.numel() - 33)
        assert torch.equal(row, stream[start : start + 32])
    assert a.describe() == {"source": text.label, "n_samples": 4, "seqlen": 32, "seed": 0, "sha256": a.sha256}


def test_ids_hash_is_int64_little_endian():
    assert (
        ids_sha256(torch.tensor([[1, 256]]))
        == hashlib.sha256(bytes([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0])).hexdigest()
    )


def test_sampler_rejects_short_text_and_bad_sizes(tokenizer):
    short = Text("a b c d", "tiny text")
    n_tokens = tokenize_text(tokenizer, short.text).numel()
    with pytest.raises(SlimlmError, match=f"tiny text has only {n_tokens} tokens.*shorter seqlen"):
        sample_calibration(tokenizer, short, n_samples=1, seqlen=n_tokens)
    assert sample_calibration(tokenizer, short, n_samples=2, seqlen=n_tokens - 1).input_ids.shape == (2, n_tokens - 1)
    with pytest.raises(SlimlmError, match="n_samples"):
        sample_calibration(tokenizer, short, n_samples=0, seqlen=2)
    with pytest.raises(SlimlmError, match="seqlen"):
        sample_calibration(tokenizer, short, n_samples=1, seqlen=1)
