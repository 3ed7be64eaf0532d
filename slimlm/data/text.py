"""Where evaluation and calibration text comes from: one `Text` whose label every report repeats.

Sources (`load_text(source, split)`):
- `"default"`: an offline corpus that ships with CPython (`pydoc_data.topics`), split deterministically so that
  calibration and evaluation text never overlap. It is small (about 95k characters, 12 windows of 2048 SmolLM2 tokens, of evaluation text): good
  for smoke runs and relative comparisons, not for numbers comparable with papers.
- `"wikitext2:DIR"` or a directory holding `wiki.test.raw`: WikiText-2 raw as GPTQ/SparseGPT/Wanda read it
  through Hugging Face `datasets` (rows = lines of the file, blank lines -> "", text = "\\n\\n".join(rows)).
- a `.txt` file (used whole) or a `.jsonl` file (the "text" field of each line, joined by blank lines).
- `"hf:NAME[:CONFIG][:SPLIT]"`: a Hugging Face dataset with a "text" column (needs `datasets` and the hub).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import SlimlmError

ACCEPTED_SOURCES = (
    "'default', 'wikitext2:DIR', a directory holding wiki.test.raw, a .txt file, "
    "a .jsonl file with a \"text\" field, or 'hf:NAME[:CONFIG][:SPLIT]'"
)
GENERIC_SPLITS = ("calibration", "evaluation")
WIKITEXT_FILES = {
    "test": "wiki.test.raw",
    "valid": "wiki.valid.raw",
    "validation": "wiki.valid.raw",
    "train": "wiki.train.raw",
}
HF_SPLITS = {"evaluation": "test", "calibration": "train"}


@dataclass(frozen=True)
class Text:
    text: str
    label: str  # shown in every report: what the text is, where it came from, which split and protocol


def load_text(source: str, split: str = "evaluation") -> Text:
    """Read the text named by `source`; `split` picks the part of it ("evaluation" or "calibration", or a
    WikiText/HF split name). Files given directly (.txt, .jsonl) are used whole whatever the split."""
    if source == "default":
        loaded = _default_corpus(split)
    elif source.startswith("hf:"):
        loaded = _hugging_face(source[len("hf:") :], split)
    elif source.startswith("wikitext2:"):
        loaded = _wikitext2(Path(source[len("wikitext2:") :]).expanduser(), split)
    else:
        loaded = _local_path(Path(source).expanduser(), split)
    if not loaded.text.strip():
        raise SlimlmError(f"the text of {loaded.label} is empty", f"pass a source with some text: {ACCEPTED_SOURCES}")
    return loaded


def default_corpus_boundary(keys: list[str], sizes: list[int], share: float = 0.2) -> int:
    """Index of the first evaluation topic: the smallest trailing run of topics with >= `share` of the characters."""
    total, tail = sum(sizes), 0
    for index in range(len(keys) - 1, 0, -1):
        tail += sizes[index]
        if tail >= share * total:
            return index
    return 1


def _default_corpus(split: str) -> Text:
    """CPython's pydoc topics: every interpreter has them, so evaluation works with no network and no files.
    Topics sorted by name; the trailing topics that hold the last fifth of the characters are evaluation text,
    the others calibration text (contiguous topics keep long-range context for 2048-token windows)."""
    if split not in GENERIC_SPLITS:
        raise SlimlmError(f"the default corpus has no split '{split}'", f"use one of {', '.join(GENERIC_SPLITS)}")
    if importlib.util.find_spec("pydoc_data") is None:
        raise SlimlmError(
            "this Python has no pydoc_data package, which holds the default corpus",
            f"pass another source: {ACCEPTED_SOURCES}",
        )
    from pydoc_data.topics import topics

    keys = sorted(topics)
    first_evaluation = default_corpus_boundary(keys, [len(topics[key]) for key in keys])
    chosen = keys[first_evaluation:] if split == "evaluation" else keys[:first_evaluation]
    label = (
        f"offline default corpus: CPython {platform.python_version()} pydoc_data.topics "
        f"({split} split, {len(chosen)} of {len(keys)} topics)"
    )
    return Text("\n\n".join(topics[key] for key in chosen), label)


def _wikitext2(directory: Path, split: str) -> Text:
    """WikiText-2 raw exactly as `datasets` rows joined by GPTQ: `"\\n\\n".join(load_dataset(...)["text"])`."""
    has_train = (directory / WIKITEXT_FILES["train"]).is_file()
    fallback = split == "calibration" and not has_train
    split = {"evaluation": "test", "calibration": "train" if has_train else "valid"}.get(split, split)
    if split not in WIKITEXT_FILES:
        raise SlimlmError(
            f"WikiText-2 has no split '{split}'", f"use one of {', '.join([*GENERIC_SPLITS, *WIKITEXT_FILES])}"
        )
    path = directory / WIKITEXT_FILES[split]
    if not path.is_file():
        raise SlimlmError(
            f"WikiText-2 file '{path}' does not exist", "point wikitext2:DIR at the folder holding the wiki.*.raw files"
        )
    # Universal newlines, lines split at "\n" only (not str.splitlines' extra breaks) and blank lines -> "":
    # what the `datasets` wikitext builder does when it iterates over the open file.
    rows = [line if line.strip() else "" for line in io.StringIO(read_utf8(path))]
    note = ", used for calibration because wiki.train.raw is absent" if fallback else ""
    return Text("\n\n".join(rows), f"WikiText-2 raw {split} ({path}{note}), rows joined as in GPTQ")


def _local_path(path: Path, split: str) -> Text:
    if not path.exists():
        raise SlimlmError(f"text source '{path}' does not exist", f"pass one of: {ACCEPTED_SOURCES}")
    if path.is_dir():
        if (path / WIKITEXT_FILES["test"]).is_file():
            return _wikitext2(path, split)
        raise SlimlmError(f"directory '{path}' holds no wiki.test.raw", f"pass one of: {ACCEPTED_SOURCES}")
    if path.suffix == ".txt":
        return Text(read_utf8(path), f"text file {path}")
    if path.suffix == ".jsonl":
        return Text("\n\n".join(_jsonl_texts(path)), f'jsonl file {path} ("text" field)')
    raise SlimlmError(
        f"cannot read text from '{path}' (unknown extension '{path.suffix}')", f"pass one of: {ACCEPTED_SOURCES}"
    )


def jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file; a bad line is a one-line error."""
    for number, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise SlimlmError(
                f"{path} line {number} is not valid JSON ({err.msg})", "write one JSON object per line"
            ) from err


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, row in jsonl_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise SlimlmError(f'{path} line {number} has no string field "text"', 'write each line as {"text": "..."}')
        texts.append(row["text"])
    return texts


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SlimlmError(f"'{path}' is not UTF-8 text (byte {err.start})", "pass a UTF-8 text file") from err
    except OSError as err:
        raise SlimlmError(f"cannot read '{path}': {err.strerror}", "check the path and its permissions") from err


def _hugging_face(spec: str, split: str) -> Text:
    """`hf:NAME[:CONFIG][:SPLIT]`; without SPLIT, "evaluation" reads "test" and "calibration" reads "train"."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise SlimlmError(
            f"'hf:{spec}' is not of the form hf:NAME[:CONFIG][:SPLIT]",
            "e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1:test",
        )
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    hf_split = parts[2] if len(parts) > 2 else HF_SPLITS.get(split, split)
    if importlib.util.find_spec("datasets") is None:
        raise SlimlmError(
            "'hf:' text sources need the optional package 'datasets'",
            "pip install datasets (or pass a local .txt/.jsonl file)",
        )
    import datasets

    from slimlm.models.load import hub_reachable

    where = f"Hugging Face dataset {name}" + (f" ({config})" if config else "") + f" split {hf_split}"
    try:
        rows = datasets.load_dataset(name, config, split=hf_split)
    except Exception as err:  # datasets raises many unrelated types for "not there"; all end the run the same way
        if os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "") or not hub_reachable():
            raise SlimlmError(
                f"the Hugging Face hub is unreachable and {where} is not cached",
                'pass a local file instead: a .txt, a .jsonl with a "text" field, or wikitext2:DIR',
            ) from err
        raise SlimlmError(
            f"could not load {where}: {type(err).__name__}: {err}",
            "check the name, config and split on huggingface.co/datasets",
        ) from err
    if "text" not in rows.column_names:
        raise SlimlmError(
            f"{where} has no 'text' column (columns: {', '.join(rows.column_names)})",
            "use a dataset with a 'text' column or pass a local file",
        )
    return Text("\n\n".join(rows["text"]), where)
