"""The search against llama.cpp's own quantizer at every preset's size, measured by llama.cpp itself.

    F16 base         slimlm export --gguf-type f16 (its logits saved once: llama-perplexity --kl-divergence-base)
    llama.cpp P      llama-quantize --imatrix I (I from llama-imatrix on slimlm's calibration windows), for
                     Q2_K, Q3_K_M (on SmolLM2 mostly Q4_0 fallbacks), Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_M, Q5_K_M, Q6_K, Q8_0
    slimlm search    one `slimlm search` with every one of those files' byte sizes as a budget (one database, the
                     front exported: front/<MB>.gguf), plus --extra-budgets (default 75MB)

Every file is measured by `llama-perplexity --kl-divergence` against the F16 base on the first --chunks windows of
--ctx tokens of WikiText-2 test, in one run; the table pairs each llama.cpp file with the searched file of the same
budget. The search's own time is printed (first budget includes the database; the others reuse it).

llama.cpp's tools: --llama-bin DIR (see benchmarks/gguf_vs_llamacpp.py for how to build them, ~20 min on 2 cores).

    python benchmarks/search.py --chunks 20 --threads 2 [--fast]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_vs_llamacpp import measure, run, tools  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PRESETS = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llama-bin", type=Path, default=Path(os.environ.get("LLAMA_BIN", "/work/llama-cache/build/bin"))
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--work", type=Path, default=Path("/tmp/search-bench"))
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", default=",".join(LLAMA_PRESETS))
    parser.add_argument("--extra-budgets", default="75MB")
    parser.add_argument("--fast", action="store_true", help="the fast search settings")
    parser.add_argument("--types", default=None, help="block-linear types searched (comma-separated; default: all)")
    parser.add_argument(
        "--database", type=Path, default=None, help="reuse this variant database (default: --work/database)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep the base, imatrix, base logits and llama.cpp files in --work"
    )
    args = parser.parse_args()
    bins = tools(args.llama_bin.expanduser())

    import torch

    from slimlm.data.calibration import sample_calibration
    from slimlm.data.text import load_text
    from slimlm.export import source_gguf
    from slimlm.export.gguf import write_gguf
    from slimlm.models.load import load_model
    from slimlm.search.run import run_search
    from slimlm.settings import DEFAULT_SEARCH, FAST_SEARCH, FAST_SEARCH_EVALUATION, SEARCH_EVALUATION, Constraints

    torch.set_num_threads(args.threads)
    import dataclasses

    settings = FAST_SEARCH if args.fast else DEFAULT_SEARCH
    if args.types:
        settings = dataclasses.replace(settings, types=tuple(args.types.split(",")))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, device="cpu")
    base = work / "base-f16.gguf"
    if not (args.reuse and base.is_file()):
        write_gguf(loaded.model, loaded.tokenizer, base, "f16", source_gguf(loaded), name=args.model, overwrite=True)
    stats = settings.statistics
    calibration = sample_calibration(
        loaded.tokenizer, load_text(stats.data, "calibration"), stats.samples, stats.seqlen, stats.seed
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
                stats.seqlen,
                "--chunks",
                stats.samples,
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
    llama_files = {}
    for preset in args.presets.split(","):
        path = work / f"llama-{preset}.gguf"
        if not (args.reuse and path.is_file()):
            run(
                [bins["llama-quantize"], "--imatrix", imatrix, base, path, preset, str(args.threads)],
                work / f"quantize-{preset}.log",
            )
        llama_files[preset] = path
    budgets = tuple(f"{p.stat().st_size}B" for p in llama_files.values()) + tuple(
        b for b in args.extra_budgets.split(",") if b
    )
    started = time.perf_counter()
    evaluation = FAST_SEARCH_EVALUATION if args.fast else SEARCH_EVALUATION
    result = run_search(
        args.model,
        work / "search",
        Constraints(max_size=budgets[0]),
        settings,
        evaluation,
        database_dir=args.database or work / "database",
        overwrite=True,
        extra_budgets=budgets[1:],
        export_front=True,
    )
    search_seconds = time.perf_counter() - started
    searched = {p.budget: p for p in result.points if p.kind == "searched"}

    def searched_file(budget: int) -> Path:
        point = searched[budget]
        return (
            result.out / "model.gguf" if point is result.chosen else result.out / "front" / f"{budget / 1e6:.1f}MB.gguf"
        )

    rows = []
    for preset, path in llama_files.items():
        budget = path.stat().st_size
        llama = measure(bins["llama-perplexity"], path, base_kld, args.data, args, work / f"ppl-{preset}.log")
        mine = measure(
            bins["llama-perplexity"],
            searched_file(budget),
            base_kld,
            args.data,
            args,
            work / f"ppl-search-{preset}.log",
        )
        rows.append((f"llama.cpp {preset} (imatrix)", llama, mine))
    for budget_text in args.extra_budgets.split(","):
        if budget_text:
            budget = next(b for b in searched if abs(b - _bytes(budget_text)) < 1000)
            mine = measure(
                bins["llama-perplexity"],
                searched_file(budget),
                base_kld,
                args.data,
                args,
                work / f"ppl-search-{budget_text}.log",
            )
            rows.append((f"{budget_text} (no llama.cpp preset)", None, mine))
    base_ppl = measure(bins["llama-perplexity"], base, base_kld, args.data, args, work / "ppl-base.log")["ppl"]
    print(
        f"\nSmolLM2-135M, llama-perplexity --kl-divergence vs F16 (ppl {base_ppl:.3f}), {args.chunks} x {args.ctx} tokens WikiText-2 test, {args.threads} threads"
    )
    print(
        f"search: {search_seconds:.0f} s for {len(searched)} budgets ({'fast' if args.fast else 'default'} settings); database {result.database['bytes'] / 1e6:.0f} MB\n"
    )
    print(
        "| budget | llama.cpp MB | llama.cpp KLD | llama.cpp ppl | slimlm MB | slimlm KLD | slimlm ppl | slimlm same-top % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, llama, mine in rows:
        lc = (
            ("—", "—", "—")
            if llama is None
            else (f"{llama['bytes'] / 1e6:.2f}", f"{llama['kld']:.4f}", f"{llama['ppl']:.3f}")
        )
        print(
            f"| {name} | {lc[0]} | {lc[1]} | {lc[2]} | {mine['bytes'] / 1e6:.2f} | {mine['kld']:.4f} | {mine['ppl']:.3f} | {mine['same_top']:.1f} |"
        )
    (work / "search-bench.json").write_text(
        json.dumps({"rows": rows, "search_seconds": search_seconds}, indent=1, default=str)
    )


def _bytes(text: str) -> int:
    from slimlm.settings import parse_bytes

    return parse_bytes(text, "--extra-budgets")


if __name__ == "__main__":
    main()
