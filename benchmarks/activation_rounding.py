"""What llama.cpp's rounding of matmul inputs costs on a model, in torch: the KL to the base when every searched
linear's input (the output head's too) is rounded as llama.cpp's CPU backend rounds it for a weight type, and when
only one projection family's is (`slimlm.export.gguf_activations`). The weights stay exact, so this is the floor a
GGUF file of that type cannot go below in llama.cpp; compare the first row with `llama-perplexity --kl-divergence`
of a file holding the model's exact codes (the embedded SmolLM2 ships as Q4_1).

    python benchmarks/activation_rounding.py [--model smollm2-135m] [--windows 6] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {  # projections reading one input count as one family
    "q/k/v": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate/up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
    "output head": ("lm_head",),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=f"wikitext2:{ROOT.parent / 'shared/data/wikitext-2-raw'}")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slimlm.data.text import load_text
    from slimlm.evaluate.perplexity import evaluate_quality, make_windows
    from slimlm.export.gguf_activations import engine_activations
    from slimlm.models.adapters import adapter_for
    from slimlm.models.load import load_model
    from slimlm.search.statistics import tracked_linears

    loaded = load_model(args.model, device="cpu")
    model = loaded.model.eval()
    windows = make_windows(loaded.tokenizer, load_text(args.data, "test"), args.seqlen, args.windows)
    base, reference = evaluate_quality(model, windows, keep_reference=args.windows, progress=False)
    linears = dict(tracked_linears(model))
    head = adapter_for(model).lm_head
    linears.setdefault(head, model.get_submodule(head))

    def rounded(label: str, type_of) -> None:
        handles = []
        for name, module in linears.items():
            type_ = type_of(name.rsplit(".", 1)[-1])
            if type_ is not None:
                hook = lambda _m, a, t=type_: (engine_activations(a[0], t), *a[1:])  # noqa: E731
                handles.append(module.register_forward_pre_hook(hook))
        started = time.perf_counter()
        quality, _ = evaluate_quality(model, windows, reference, progress=False)
        for handle in handles:
            handle.remove()
        print(
            f"| {label} | {quality.kl_divergence:.5f} | {quality.perplexity:.3f} | {100 * quality.top1_agreement:.1f} "
            f"| {time.perf_counter() - started:.0f} |",
            flush=True,
        )

    print(f"{args.model}: {args.windows} x {args.seqlen} tokens, base ppl {base.perplexity:.3f}\n")
    print("| inputs rounded | KL to the base | ppl | top-1 % | s |\n|---|---|---|---|---|")
    for type_, kind in (("q4_1", "q8_1 blocks of 32"), ("f16", "f16")):
        rounded(f"every linear as for {type_.upper()} ({kind})", lambda _rel, t=type_: t)
    for family, members in FAMILIES.items():
        rounded(f"{family} only, as for Q4_1", lambda rel, m=members: "q4_1" if rel in m else None)
    # k-quants need rows of 256: on SmolLM2 only down_proj's 1536 (its input then gets q8_K blocks of 256)
    rounded("down only, as for Q4_K (q8_K blocks of 256)", lambda rel: "q4_k" if rel == "down_proj" else None)
    rounded("every linear as for Q4_1, the head as for F16", lambda rel: "f16" if rel == "lm_head" else "q4_1")


if __name__ == "__main__":
    main()
