"""Pruning benchmark on SmolLM2-135M: every shipped pruning recipe, and llm-compressor side by side.

    python benchmarks/pruning.py --wikitext ../shared/data/wikitext-2-raw [--llmcompressor lc-venv/bin/python]

Calibration: the same token ids for every method (N windows of L tokens of WikiText-2 *valid*, seed 0; the
hash is printed). Evaluation: the first W windows of 2048 tokens of WikiText-2 *test* (GPTQ protocol), KL and
top-1 against the base on the first 4. Each compression runs in its own process (`slimlm compress`, or
llm-compressor's `oneshot` through benchmarks/llmcompressor_side.py in its own venv) so its wall time and peak
RSS are its own; the parent evaluates every saved model with the same code. Results are cached per method in
--out (delete a file to re-run that method). Structured results also get parameters, size and CPU
prefill/decode tokens/s against the base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import run_child

SLIMLM_METHODS = (
    "magnitude-50",
    "magnitude-2of4",
    "wanda-50",
    "wanda-2of4",
    "sparsegpt-50",
    "sparsegpt-2of4",
    "owl-wanda-70",
    "magnitude-70",
    "depth-25pct",
    "width-25pct",
)
LLMCOMPRESSOR_METHODS = ("sparsegpt-50", "wanda-50", "sparsegpt-2of4", "wanda-2of4")
STRUCTURED = ("depth-25pct", "width-25pct")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wikitext", required=True, help="folder with wiki.test.raw and wiki.valid.raw")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--methods", default=",".join(SLIMLM_METHODS))
    parser.add_argument("--llmcompressor", help="a Python with llmcompressor 0.14 installed (its own venv)")
    parser.add_argument("--llmcompressor-methods", default=",".join(LLMCOMPRESSOR_METHODS))
    parser.add_argument("--out", default="benchmarks/results/pruning")
    args = parser.parse_args()

    from slimlm.checkpoint.save import save_model
    from slimlm.data.calibration import sample_calibration
    from slimlm.data.text import load_text
    from slimlm.evaluate.footprint import linear_sparsity, parameter_count
    from slimlm.evaluate.perplexity import evaluate_quality, make_windows
    from slimlm.evaluate.speed import measure_speed
    from slimlm.models.load import load_model

    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    wikitext = f"wikitext2:{Path(args.wikitext).resolve()}"
    base = load_model("smollm2-135m")
    calibration = sample_calibration(
        base.tokenizer, load_text(wikitext, "valid"), args.calib_samples, args.calib_seqlen, seed=0
    )
    calib_ids = out / "calibration_ids.pt"
    torch.save(calibration.input_ids, calib_ids)
    base_dir = out / "models" / "base"
    if not base_dir.exists():
        save_model(base.model, base.tokenizer, base_dir, {"note": "dense base for side-by-side runs"})
    windows = make_windows(base.tokenizer, load_text(wikitext, "test"), 2048, args.windows)
    print(f"calibration: {calibration.describe()}\nevaluation: {windows.protocol()}", flush=True)

    base_quality, reference = evaluate_quality(base.model, windows, keep_reference=4, progress=False)
    base_params = parameter_count(base.model)
    rows = [
        {
            "method": "base",
            "tool": "—",
            "perplexity": base_quality.perplexity,
            "kl": None,
            "top1": None,
            "sparsity": 0.0,
            "parameters": base_params,
        }
    ]

    jobs = [("slimlm", m) for m in args.methods.split(",") if m]
    if args.llmcompressor:
        jobs += [("llm-compressor", m) for m in args.llmcompressor_methods.split(",") if m]
    for tool, method in jobs:
        result_file = out / f"{tool}-{method}.json"
        if result_file.exists():
            rows.append(json.loads(result_file.read_text()))
            continue
        model_dir = out / "models" / f"{tool}-{method}"
        if tool == "slimlm":
            command = [
                sys.executable,
                "-m",
                "slimlm.cli",
                "compress",
                str(base_dir),
                "--recipe",
                method,
                "--out",
                str(model_dir),
                "--no-eval",
                "--overwrite",
                "--calib-data",
                wikitext,
                "--calib-samples",
                str(args.calib_samples),
                "--calib-seqlen",
                str(args.calib_seqlen),
            ]
        else:
            command = [
                args.llmcompressor,
                str(Path(__file__).with_name("llmcompressor_side.py")),
                str(base_dir),
                str(calib_ids),
                method,
                str(model_dir),
            ]
        if (
            model_dir.exists() and (out / f"{tool}-{method}.maxrss").exists()
        ):  # compressed by an earlier, interrupted run: evaluate it
            wall, peak_mib, status = None, int((out / f"{tool}-{method}.maxrss").read_text().split()[-1]) / 1024, 0
        else:
            wall, peak_mib, status = run_child(command, out / f"{tool}-{method}.log")
        if status:
            print(f"{tool} {method}: failed (exit {status}), see {out / f'{tool}-{method}.log'}", flush=True)
            continue
        if tool == "slimlm":
            manifest = json.loads((model_dir / "slimlm.json").read_text())
            assert (
                manifest["calibration"] == "none: every stage of this recipe is data-free"
                or manifest["calibration"]["sha256"] == calibration.sha256
            )
            seconds = manifest["compress_seconds"]
        else:
            seconds = json.loads((out / f"{tool}-{method}.log").read_text().strip().splitlines()[-1])["oneshot_seconds"]
        model = load_model(str(model_dir)).model
        quality, _ = evaluate_quality(model, windows, reference=reference, progress=False)
        row = {
            "method": method,
            "tool": tool,
            "perplexity": quality.perplexity,
            "kl": quality.kl_divergence,
            "top1": quality.top1_agreement,
            "sparsity": linear_sparsity(model),
            "parameters": parameter_count(model),
            "compress_s": seconds,
            "process_wall_s": wall,
            "peak_rss_mib": peak_mib,
        }
        result_file.write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model

    # Speed last, side by side in one process, so no compression job competes for the cores while it is measured.
    for row in rows:
        if row["method"] == "base" or (row["tool"] == "slimlm" and row["method"] in STRUCTURED):
            model = (
                base.model
                if row["method"] == "base"
                else load_model(str(out / "models" / f"slimlm-{row['method']}")).model
            )
            speed = measure_speed(model)
            row.update(prefill_tok_s=speed.prefill_tokens_per_s, decode_tok_s=speed.decode_tokens_per_s)
    print(markdown_table(rows, base_params))
    (out / "summary.json").write_text(
        json.dumps({"calibration": calibration.describe(), "evaluation": windows.protocol(), "rows": rows}, indent=2)
    )


def markdown_table(rows: list[dict], base_params: int) -> str:
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    lines = [
        "| method | tool | WikiText-2 ppl | KL | top-1 | sparsity | params | compress s | peak RSS MiB | prefill tok/s | decode tok/s |",
        "|" + "---|" * 11,
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['tool']} | {row['perplexity']:.2f} | {fmt(row.get('kl'), '.4f')} | {fmt(row.get('top1'), '.1%')} | "
            f"{row['sparsity']:.1%} | {row['parameters'] / 1e6:.1f}M ({row['parameters'] / base_params:.0%}) | {fmt(row.get('compress_s'), '.0f')} | "
            f"{fmt(row.get('peak_rss_mib'), '.0f')} | {fmt(row.get('prefill_tok_s'), '.0f')} | {fmt(row.get('decode_tok_s'), '.1f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
