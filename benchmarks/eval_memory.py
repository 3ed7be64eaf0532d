"""Peak memory of the before/after check at a large vocabulary: what the KL reference keeps per window.

    python benchmarks/eval_memory.py --vocab 262144 --seqlen 2048 --windows 4

A tiny Llama (1 block, hidden 64) with the vocabulary given: its weights are small, so the peak RSS is what the
evaluation itself holds: the model's (L, V) logits of one window, the log-softmax of 256 positions at a time, and
the reference kept for KL (top-k log-probs + ids + the rest's mass per position). Prints the reference's bytes,
what full float32 log-probs of the same windows would take, and the process's peak RSS (getrusage) after the base
evaluation and after scoring a perturbed copy against it.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slimlm.evaluate.perplexity import KL_TOP_K, EvalWindows, evaluate_quality


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=KL_TOP_K)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, args.vocab, (args.windows, args.seqlen))
    windows = EvalWindows(ids, "random ids", args.seqlen, args.windows)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"model weights {weights_mb:.0f} MiB; RSS before evaluating {peak_rss_mb():.0f} MiB", flush=True)
    start = time.perf_counter()
    _, reference = evaluate_quality(model, windows, keep_reference=args.windows, progress=False, top_k=args.top_k)
    after_base = peak_rss_mb()
    with torch.no_grad():
        model.lm_head.weight.add_(0.01 * torch.randn_like(model.lm_head.weight))
    result, _ = evaluate_quality(model, windows, reference=reference, progress=False)
    full_mb = args.windows * args.seqlen * args.vocab * 4 / 2**20
    print(f"reference kept: {reference.nbytes() / 2**20:.1f} MiB (full float32 log-probs would be {full_mb:.0f} MiB)")
    print(f"one window's logits (L, V) float32: {args.seqlen * args.vocab * 4 / 2**20:.0f} MiB")
    print(f"peak RSS after the base evaluation {after_base:.0f} MiB; after the KL pass {peak_rss_mb():.0f} MiB")
    print(f"KL {result.kl_divergence:.5f}, top-1 {result.top1_agreement:.1%}; {time.perf_counter() - start:.0f} s")
    print(result.protocol)


if __name__ == "__main__":
    main()
