"""slimlm's GGUF files against llama.cpp's own quantizer (llama-quantize with an importance matrix from
llama-imatrix), preset by preset, all measured by llama.cpp itself (`llama-perplexity --kl-divergence`).

    F16 base        slimlm export --gguf-type f16 (the reference logits, saved once with --kl-divergence-base)
    llama.cpp P     llama-quantize --imatrix I base.gguf P    (I from llama-imatrix on slimlm's calibration windows)
    slimlm P        the same per-tensor types (`preset_tensor_types(..., imatrix=True)`), codes by GPTQ on each
                    type's grid (`gptq_for_type`), embedding/output by importance-weighted rounding from the final
                    hidden state; Hessians from one calibration pass over the same windows (`collect_statistics`)

Both files of a preset have the same tensor types, so the same tensor bytes (the metadata differs by a few kB).
Printed: a markdown table of file MB, mean KLD to F16, perplexity and "same top p" (top-1 agreement), on the first
--chunks windows of --ctx tokens of WikiText-2 test.

llama.cpp's tools: --llama-bin DIR (default $LLAMA_BIN or /work/llama-cache/build/bin). To build them from the
llama-cpp-python source distribution (about 20 minutes on 2 cores; cache the build outside the repository):

    pip download llama-cpp-python --no-binary :all: --no-deps -d /tmp/sdist && tar xf /tmp/sdist/llama_cpp_python-*.tar.gz -C /tmp
    cmake -S /tmp/llama_cpp_python-*/vendor/llama.cpp -B ~/llama-build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF
    cmake --build ~/llama-build -j2 --target llama-quantize llama-imatrix llama-perplexity

    python benchmarks/gguf_vs_llamacpp.py --chunks 20 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q4_k_m": "Q4_K_M",
    "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K",
    "q8_0": "Q8_0",
}
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def tools(directory: Path) -> dict[str, Path]:
    found = {tool: directory / tool for tool in TOOLS}
    missing = [tool for tool, path in found.items() if not path.is_file()]
    if missing:
        sys.exit(
            f"llama.cpp's {', '.join(missing)} not found in {directory}: build them as this script's docstring "
            "says (about 20 min on 2 cores) and pass --llama-bin DIR"
        )
    return found


def run(command: list, log: Path) -> str:
    """Run a llama.cpp tool, its output kept in `log`; exit with the tail of it if the tool fails."""
    started = time.perf_counter()
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    text = result.stdout + result.stderr
    log.write_text(text)
    if result.returncode:
        sys.exit(f"{Path(command[0]).name} failed ({result.returncode}):\n{text[-2000:]}")
    print(f"  {Path(command[0]).name} {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return text


def measure(perplexity: Path, gguf: Path, base_kld: Path, text: Path, args, log: Path) -> dict:
    out = run(
        [
            perplexity,
            "-m",
            gguf,
            "-f",
            text,
            "-c",
            args.ctx,
            "--chunks",
            args.chunks,
            "-t",
            args.threads,
            "--kl-divergence-base",
            base_kld,
            "--kl-divergence",
        ],
        log,
    )

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        if not match:
            sys.exit(f"could not read '{pattern}' from {log}")
        return float(match.group(1))

    return {
        "bytes": gguf.stat().st_size,
        "kld": number(r"Mean\s+KLD:\s+([-\d.]+)"),
        "ppl": number(r"Mean PPL\(Q\)\s+:\s+([-\d.]+)"),
        "same_top": number(r"Same top p:\s+([-\d.]+)"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llama-bin", type=Path, default=Path(os.environ.get("LLAMA_BIN", "/work/llama-cache/build/bin"))
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-vs-llamacpp"))
    parser.add_argument("--chunks", type=int, default=20, help="windows of --ctx tokens measured")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--reuse", action="store_true", help="keep the base, imatrix and base logits already in --work")
    args = parser.parse_args()
    bins = tools(args.llama_bin.expanduser())
    if not args.data.is_file():
        sys.exit(f"{args.data} not found: pass --data PATH/wiki.test.raw")
    presets = args.presets.split(",")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        sys.exit(f"unknown presets {unknown}: use {', '.join(PRESETS)}")

    import torch

    from slimlm.data.calibration import sample_calibration
    from slimlm.data.text import load_text
    from slimlm.export import source_gguf
    from slimlm.export.gguf import write_gguf
    from slimlm.export.gguf_calibrated import calibrated_codes, collect_statistics
    from slimlm.export.gguf_presets import preset_tensor_types
    from slimlm.models.load import load_model

    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, device="cpu")
    source = source_gguf(loaded)
    base = work / "base-f16.gguf"
    if not (args.reuse and base.is_file()):
        write_gguf(loaded.model, loaded.tokenizer, base, "f16", source, name=args.model, overwrite=True)

    # one set of calibration windows for both: slimlm's own draw, written out as text for llama-imatrix
    calibration = sample_calibration(
        loaded.tokenizer, load_text("default", split="calibration"), args.calib_samples, args.calib_seqlen
    )
    calib_text = work / "calibration.txt"
    calib_text.write_text("".join(loaded.tokenizer.decode(window) for window in calibration.input_ids))
    imatrix = work / "imatrix.gguf"
    if not (args.reuse and imatrix.is_file()):
        run(
            [
                bins["llama-imatrix"],
                "-m",
                base,
                "-f",
                calib_text,
                "-o",
                imatrix,
                "-c",
                args.calib_seqlen,
                "--chunks",
                args.calib_samples,
                "-t",
                args.threads,
                "--no-ppl",
            ],
            work / "imatrix.log",
        )
    base_kld = work / "base.kld"
    if not (args.reuse and base_kld.is_file()):
        run(
            [
                bins["llama-perplexity"],
                "-m",
                base,
                "-f",
                args.data,
                "-c",
                args.ctx,
                "--chunks",
                args.chunks,
                "-t",
                args.threads,
                "--kl-divergence-base",
                base_kld,
            ],
            work / "base.log",
        )
    started = time.perf_counter()
    cached = work / "statistics.pt"
    if args.reuse and cached.is_file():
        statistics = torch.load(cached)
    else:
        statistics = collect_statistics(copy.deepcopy(loaded.model), calibration.input_ids)
        torch.save(statistics, cached)
    print(f"  slimlm calibration statistics {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)

    rows = []
    for preset in presets:
        print(f"{preset}:", file=sys.stderr, flush=True)
        theirs = work / f"llama.cpp-{preset}.gguf"
        run(
            [bins["llama-quantize"], "--imatrix", imatrix, base, theirs, PRESETS[preset], args.threads],
            work / f"quantize-{preset}.log",
        )
        ours = work / f"slimlm-{preset}.gguf"
        started = time.perf_counter()
        model = copy.deepcopy(loaded.model)
        types = preset_tensor_types(model, preset, imatrix=True)
        packed, importance = calibrated_codes(model, None, types, "gptq", statistics=statistics)
        write_gguf(
            model,
            loaded.tokenizer,
            ours,
            "q8_0",
            source,
            name=args.model,
            overwrite=True,
            tensor_types=types,
            importance=importance,
            packed=packed,
            file_type=preset,
        )
        print(f"  slimlm GPTQ + write {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
        for who, path in (("llama.cpp imatrix", theirs), ("slimlm GPTQ", ours)):
            rows.append(
                {
                    "preset": preset,
                    "who": who,
                    **measure(bins["llama-perplexity"], path, base_kld, args.data, args, work / f"ppl-{path.stem}.log"),
                }
            )
        a, b = rows[-2], rows[-1]
        print(
            f"  {preset}: llama.cpp KLD {a['kld']:.5f} ppl {a['ppl']:.3f} | slimlm KLD {b['kld']:.5f} ppl {b['ppl']:.3f}",
            file=sys.stderr,
            flush=True,
        )

    base_ppl = re.search(r"Final estimate: PPL = ([\d.]+)", (work / "base.log").read_text())
    print(
        f"\nF16 base: {base.stat().st_size / 1e6:.1f} MB, ppl {base_ppl.group(1) if base_ppl else '?'}; "
        f"WikiText-2 test, {args.chunks} windows of {args.ctx} tokens; calibration {args.calib_samples} × {args.calib_seqlen} tokens\n"
    )
    print("| preset | quantizer | file MB | KLD mean | ppl | same top p % |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['preset']} | {row['who']} | {row['bytes'] / 1e6:.2f} | {row['kld']:.5f} | {row['ppl']:.3f} | {row['same_top']:.2f} |"
        )
    wins = [
        p
        for p in presets
        if all(
            [r for r in rows if r["preset"] == p and r["who"] == "slimlm GPTQ"][0][k]
            < [r for r in rows if r["preset"] == p and r["who"] != "slimlm GPTQ"][0][k]
            for k in ("kld", "ppl")
        )
    ]
    print(f"\nslimlm lower KLD and ppl at {len(wins)}/{len(presets)} presets: {', '.join(wins) or 'none'}")


if __name__ == "__main__":
    main()
