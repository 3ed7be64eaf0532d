"""Speculative decoding with slimlm-made drafts for their parent (transformers engine, greedy).

    python benchmarks/speculative.py --target smollm2-135m --drafts smol-gptq,smol-depth33 \
        [--draft-tokens 2,4] [--prompts 4] [--new-tokens 64] [--threads 2] [--json out.json]

For each prompt (SmolLM2's chat template around a few fixed questions) the target answers greedily alone, then with
each draft proposing k tokens per target forward. Per draft and k:

- identical: the speculative answer is the target's own greedy answer, token for token (it must be);
- acceptance: draft tokens accepted / drafted; accepted per round: mean accepted length per target verify step;
- tokens per target forward: (accepted + 1) / rounds — the ceiling of the speed-up if drafting were free;
- decode tok/s and speed-up: answer tokens over wall time from request to last token, against the target alone.

A same-size draft (a 4-bit copy unpacked to dense weights costs the target's FLOPs on CPU) can only slow decoding
down: its figure of merit is the acceptance rate, a fidelity measure (how often the compressed model picks the
parent's next token). A depth-pruned draft is cheaper per token and can speed decoding up. Speed is wall time on a
shared machine: the load average is printed with each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
    "What is machine learning?",
    "How do I boil an egg?",
]


def answer(backend, prompt: list[int], settings) -> tuple[list[int], float, dict | None]:
    from slimlm.serve.backends import generate

    start = time.perf_counter()
    result = generate(backend, prompt, settings)
    for _ in result:
        pass
    return result.token_ids, time.perf_counter() - start, result.speculative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafts", required=True, help="comma-separated draft models (directories, aliases)")
    parser.add_argument("--draft-tokens", default="2,4")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from slimlm.models.load import load_model
    from slimlm.serve.backends import TransformersBackend
    from slimlm.serve.sampling import SamplingSettings

    torch.set_num_threads(args.threads)
    settings = SamplingSettings(temp=0.0, max_tokens=args.new_tokens)
    target = TransformersBackend(load_model(args.target, device="cpu"))
    prompts = [target.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS[: args.prompts]]
    answer(target, prompts[0], SamplingSettings(temp=0.0, max_tokens=8))  # warm-up
    load_before = os.getloadavg()[0]
    alone = [answer(target, p, settings) for p in prompts]
    rows = [{"draft": "(target alone)", "k": 0, "tokens": sum(len(a[0]) for a in alone), "seconds": sum(a[1] for a in alone)}]
    for draft_name in args.drafts.split(","):
        draft = TransformersBackend(load_model(draft_name, device="cpu"))
        for k in (int(x) for x in args.draft_tokens.split(",")):
            spec = target.with_draft(draft, k)
            runs = [answer(spec, p, settings) for p in prompts]
            stats = {key: sum(r[2][key] for r in runs) for key in ("drafted", "accepted", "rounds")}
            identical = all(r[0] == a[0] for r, a in zip(runs, alone))
            rows.append({"draft": draft_name, "k": k, "tokens": sum(len(r[0]) for r in runs), "seconds": sum(r[1] for r in runs), "identical": identical, **stats})
            print(f"measured {draft_name} k={k}: {rows[-1]}", file=sys.stderr, flush=True)  # progress on a slow machine
    load_after = os.getloadavg()[0]
    base = rows[0]["tokens"] / rows[0]["seconds"]
    print(f"target {args.target} (transformers fp32, {args.threads} threads), {len(prompts)} prompts × ≤{args.new_tokens} greedy tokens; load average {load_before:.1f} → {load_after:.1f} on {os.cpu_count()} cores\n")
    print("| draft | k | identical to target | acceptance | accepted per round | tokens per target forward | decode tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        speed = row["tokens"] / row["seconds"]
        row["tokens_per_s"], row["speedup"] = speed, speed / base
        if row["k"] == 0:
            print(f"| {row['draft']} | – | – | – | – | 1.00 | {speed:.1f} | 1.00× |")
            continue
        row["acceptance"] = row["accepted"] / row["drafted"]
        row["accepted_per_round"] = row["accepted"] / row["rounds"]
        per_forward = (row["accepted"] + row["rounds"]) / row["rounds"]
        print(f"| {row['draft']} | {row['k']} | {'yes' if row['identical'] else 'NO'} | {row['acceptance']:.1%} | {row['accepted_per_round']:.2f} | {per_forward:.2f} | {speed:.1f} | {row['speedup']:.2f}× |")
    print("\n" + f"median answer length {statistics.median(len(a[0]) for a in alone)} tokens")
    if args.json:
        args.json.write_text(json.dumps({"target": args.target, "load": [load_before, load_after], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
