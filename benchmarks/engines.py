"""llama.cpp benchmark of slimlm's GGUF exports (needs `pip install -e '.[engines]'`, i.e. llama-cpp-python).

    python benchmarks/engines.py --wikitext ../shared/data/wikitext-2-raw \
        --recipes depth-25pct,gptq-w4-g64 --dense-types f16,q8_0,q4_0 [--threads 2] [--out benchmarks/results/engines]

For the base (SmolLM2-135M) and each recipe's output (compressed here with `slimlm compress` unless
--out/models/<recipe> exists), export GGUF and measure it in llama.cpp through llama-cpp-python:

- prompt and decode tokens/s and peak RSS: `slimlm.evaluate.llama_cpp.llama_cpp_speed` (a random 512-token
  prompt from an empty cache, then 128 greedy tokens, one `llama_decode` each; median of --repeats after a
  warm-up; RSS of that child process alone, model mmap'd pages included);
- file size; perplexity: llama.cpp's logits on the first --windows windows of --seqlen tokens of WikiText-2 test,
  the exact token ids slimlm's GPTQ-protocol evaluation uses, scored by slimlm's own code
  (`llama_cpp_quality`, a separate child, logits for every position);
- decode roofline: decode must read every weight byte once per token (the tied embedding is the output matrix)
  plus the KV cache; roofline tok/s = copy bandwidth / (GGUF tensor bytes + KV bytes at the mean decode position),
  with the copy bandwidth measured here (torch, --threads threads, 256 MiB copy: read + write bytes / s).

Quantized recipes are exported with --gguf-type auto (their own codes kept: gptq-w4-g64 -> Q4_1); dense models
(base, pruned) once per --dense-types (re-quantized with llama.cpp's reference quantizers). Results:
--out/engines.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
DEFAULT_WIKITEXT = HERE.parents[2] / "shared" / "data" / "wikitext-2-raw"


# --- llama.cpp side (runs in child processes) ---------------------------------------------------------------------


def _llama(path: str | Path, n_ctx: int, threads: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def eval_token_ids(path: str | Path, windows: int, seqlen: int, wikitext: Path = DEFAULT_WIKITEXT) -> np.ndarray:
    """The GPTQ-protocol windows slimlm evaluates on, tokenized by the GGUF's own tokenizer (as transformers reads it)."""
    from transformers import AutoTokenizer

    from slimlm.data.text import load_text
    from slimlm.evaluate.perplexity import make_windows

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return make_windows(tokenizer, load_text(f"wikitext2:{wikitext}", "test"), seqlen, windows).input_ids.numpy()


def llama_cpp_perplexity(
    path: str | Path, windows: int = 8, seqlen: int = 512, threads: int = 2, wikitext: Path = DEFAULT_WIKITEXT
) -> float:
    """exp(mean NLL) of llama.cpp's next-token logits over the windows (no BOS added: the same ids as slimlm),
    scored by slimlm's own code in a child process (slimlm.evaluate.llama_cpp)."""
    import torch

    from slimlm.evaluate.llama_cpp import llama_cpp_quality
    from slimlm.evaluate.perplexity import EvalWindows

    ids = torch.from_numpy(eval_token_ids(path, windows, seqlen, wikitext))
    quality, _ = llama_cpp_quality(path, EvalWindows(ids, "WikiText-2 test", seqlen, ids.shape[0]), threads=threads)
    return quality.perplexity


def slimlm_perplexity(
    path: str | Path, windows: int = 8, seqlen: int = 512, wikitext: Path = DEFAULT_WIKITEXT
) -> float:
    """slimlm's GPTQ-protocol perplexity of the same GGUF weights (transformers dequantizes the file)."""
    from slimlm.data.text import load_text
    from slimlm.evaluate.perplexity import evaluate_quality, make_windows
    from slimlm.models.load import load_model

    loaded = load_model(str(path), device="cpu")
    window_ids = make_windows(loaded.tokenizer, load_text(f"wikitext2:{wikitext}", "test"), seqlen, windows)
    quality, _ = evaluate_quality(loaded.model, window_ids, progress=False)
    return quality.perplexity


def generate(path: str | Path, prompt: str, tokens: int = 16, threads: int = 2) -> str:
    """Greedy text from llama.cpp."""
    llm = _llama(path, 256, threads)
    return llm(prompt, max_tokens=tokens, temperature=0.0)["choices"][0]["text"]


# --- parent: export, children, roofline -----------------------------------------------------------------------------


def copy_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s a large copy moves (read + write) with `threads` torch threads: the decode roofline's numerator."""
    import torch

    torch.set_num_threads(threads)
    source = torch.ones(mib * 2**20 // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def gguf_bytes(path: Path) -> tuple[int, dict]:
    """Tensor bytes (what a decoded token reads) and the KV-cache geometry of a GGUF."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()

    def value(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    heads = value(f"{arch}.attention.head_count")
    geometry = {
        "layers": value(f"{arch}.block_count"),
        "kv_heads": value(f"{arch}.attention.head_count_kv", heads),
        "head_dim": value(f"{arch}.attention.key_length", value(f"{arch}.embedding_length") // heads),
    }
    return sum(int(t.n_bytes) for t in reader.tensors), geometry


def ensure_compressed(recipe: str, out: Path, wikitext: Path, calib_samples: int, calib_seqlen: int) -> Path:
    target = out / "models" / recipe
    if not target.exists():
        command = [
            sys.executable,
            "-m",
            "slimlm.cli",
            "compress",
            "smollm2-135m",
            "--recipe",
            recipe,
            "--out",
            str(target),
            "--no-eval",
            "--calib-data",
            f"wikitext2:{wikitext}",
            "--calib-samples",
            str(calib_samples),
            "--calib-seqlen",
            str(calib_seqlen),
        ]
        subprocess.run(command, check=True, env={**os.environ, "SLIMLM_QUIET": "1"})
    return target


def markdown(rows: list[dict], bandwidth: float) -> str:
    lines = [
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)",
        "",
        "| model | GGUF | file MB | prompt tok/s | decode tok/s | roofline tok/s | % of roofline | peak RSS MiB | ppl llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['gguf_type']}{' (codes kept)' if row['codes_kept'] else ''} | {row['file_bytes'] / 1e6:.1f} | {row['prompt_tok_s']:.0f} | "
            f"{row['decode_tok_s']:.1f} | {row['roofline_tok_s']:.0f} | {row['roofline_share']:.0%} | {row['peak_rss_mib']:.0f} | {row['perplexity']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wikitext", default=str(DEFAULT_WIKITEXT))
    parser.add_argument(
        "--recipes",
        default="depth-25pct,gptq-w4-g64",
        help="recipes whose outputs are measured besides the base ('' for none)",
    )
    parser.add_argument("--dense-types", default="f16,q8_0,q4_0", help="GGUF types for dense models (base, pruned)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=2048)
    parser.add_argument("--out", default="benchmarks/results/engines")
    args = parser.parse_args()
    wikitext = Path(args.wikitext).resolve()

    from slimlm.evaluate.llama_cpp import llama_cpp_speed
    from slimlm.export import export_model

    out = Path(args.out)
    (out / "gguf").mkdir(parents=True, exist_ok=True)
    models = {"base": "smollm2-135m"}
    for recipe in filter(None, args.recipes.split(",")):
        models[recipe] = str(ensure_compressed(recipe, out, wikitext, args.calib_samples, args.calib_seqlen))
    bandwidth = copy_bandwidth(args.threads)
    rows = []
    for label, source in models.items():
        quantized = label != "base" and json.loads((Path(source) / "slimlm.json").read_text()).get("quantized_linears")
        for gguf_type in ["auto"] if quantized else args.dense_types.split(","):
            path = out / "gguf" / f"{label}-{gguf_type}.gguf"
            export = export_model(source, "gguf", path, gguf_type=gguf_type, overwrite=True)
            measured = llama_cpp_speed(
                path, args.threads, args.prompt_tokens, args.decode_tokens, args.repeats
            )  # in a child
            speed = {
                "prompt_tok_s": measured.prefill_tokens_per_s,
                "decode_tok_s": measured.decode_tokens_per_s,
                "load": measured.load,
            }
            rss = measured.peak_rss_bytes / 2**20
            quality = {"perplexity": llama_cpp_perplexity(path, args.windows, args.seqlen, args.threads, wikitext)}
            weight_bytes, kv = gguf_bytes(path)
            mean_position = args.prompt_tokens + args.decode_tokens / 2
            kv_bytes = 2 * kv["layers"] * kv["kv_heads"] * kv["head_dim"] * 2 * mean_position  # K and V, f16 cache
            roofline = bandwidth / (weight_bytes + kv_bytes)
            row = {
                "model": label,
                "gguf_type": export["gguf_type"],
                "codes_kept": export["codes_kept"],
                "file_bytes": path.stat().st_size,
                "tensor_bytes": weight_bytes,
                "kv_bytes_per_token": kv_bytes,
                **speed,
                "peak_rss_mib": rss,
                **quality,
                "roofline_tok_s": roofline,
                "roofline_share": speed["decode_tok_s"] / roofline,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    context = {
        "threads": args.threads,
        "copy_bandwidth_bytes_s": bandwidth,
        "perplexity": f"{args.windows} windows x {args.seqlen} tokens of WikiText-2 test",
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
    }
    (out / "engines.json").write_text(json.dumps({"context": context, "rows": rows}, indent=2) + "\n")
    print(markdown(rows, bandwidth))


if __name__ == "__main__":
    main()
