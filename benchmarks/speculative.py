"""Speculative decoding with slimlm-made drafts for their parent (the target in transformers, greedy).

    python benchmarks/speculative.py --target smollm2-135m --drafts smol-q4_0.gguf,smol-rtn \
        [--draft-tokens 2,4] [--prompts 4] [--new-tokens 64] [--threads 2] [--json out.json]

A thin caller of `slimlm.evaluate.speculative` (what `slimlm eval TARGET --draft DRAFT` prints for one draft), for
several drafts in one table: what each column means is in that module's docstring. A .gguf draft runs in llama.cpp
(when llama-cpp-python is installed), where a token costs a fraction of a transformers forward: the draft that
speeds the target up. A same-size draft in transformers (a 4-bit copy unpacked to dense weights costs the target's
FLOPs on CPU) can only slow decoding down: its figure of merit is the acceptance rate, a fidelity measure (how often
the compressed model picks the parent's next token). Speed is wall time: the load average is printed with each run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimlm.evaluate.speculative import SPECULATIVE, SpeculativeSettings, describe, evaluate_speculative, table_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafts", required=True, help="comma-separated draft models (directories, aliases)")
    parser.add_argument("--draft-tokens", default=",".join(map(str, SPECULATIVE.draft_tokens)))
    parser.add_argument("--prompts", type=int, default=SPECULATIVE.prompts)
    parser.add_argument("--new-tokens", type=int, default=SPECULATIVE.new_tokens)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    settings = SpeculativeSettings(tuple(int(k) for k in args.draft_tokens.split(",")), args.prompts, args.new_tokens)
    progress = functools.partial(print, file=sys.stderr, flush=True)  # a slow machine: one line per configuration
    result = evaluate_speculative(
        args.target, args.drafts.split(","), settings, threads=args.threads, progress=progress
    )
    headers, rows = table_rows(result)
    print(describe(result) + "\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
