"""Quantization benchmark on SmolLM2-135M: slimlm's quantization recipes, and llm-compressor side by side.

    python benchmarks/quantization.py --wikitext ../shared/data/wikitext-2-raw [--llmcompressor ../lc-venv/bin/python] [--repeat 3]

Calibration: the same token ids for every method, by default 64 windows of 512 tokens of WikiText-2 *valid*,
seed 0 (llm-compressor's quoted GPTQ/AWQ settings; the hash is printed and checked against each manifest).
Evaluation: the first 16 windows of 2048 tokens of WikiText-2 *test* (GPTQ protocol), KL and top-1 against the
base on the first 4. Each compression runs in its own process (`slimlm compress`, or llm-compressor's `oneshot`
through benchmarks/llmcompressor_side.py in its own venv) so its wall time and peak RSS (GNU time) are its own;
the parent evaluates every saved model with the same code. llm-compressor's models come back as dequantized
dense weights (same numbers) plus its packed checkpoint (size on disk); its W8A8 row quantizes activations,
which dense weights cannot show, so that row's perplexity is measured in llm-compressor's own process and has
no KL. Results are cached per method in --out with the settings they were measured under (a row measured
under other settings is recomputed; delete a file to re-run that method).

With --repeat N, the compressions not cached run in N rounds (each round runs every one once, so slimlm's and
llm-compressor's runs of a method alternate); a row's time is the median of its rounds (`compress_s_runs` keeps
them all), and for each method both tools ran, slimlm's time over llm-compressor's is printed per round with
its median (`time_ratios` in summary.json).

Per row: the scheme (bits / group / symmetry), perplexity, its change against the base, KL and top-1 against
the base, weight bytes on disk, quantized linears' bytes as a share of the same linears in fp16, compression
wall time (the method only: `compress_seconds` / `oneshot` seconds) and the child process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from common import run_child

SLIMLM_DEFAULT = ("rtn-w4-g64", "rtn-w4-g64-sym", "gptq-w4-g64", "gptq-w4-g64-sym")
SLIMLM_FAMILIES = ("awq", "smoothquant", "rotate")  # every shipped recipe starting with these joins the default
LLMCOMPRESSOR_METHODS = ("gptq-w4-g64", "gptq-w4-g64-sym", "awq-w4-g64", "smoothquant-gptq-w8a8")
LLMCOMPRESSOR_SCHEMES = {
    "gptq-w4-g64": "GPTQ W4A16 g64 asym",
    "gptq-w4-g64-sym": "GPTQ W4A16 g64 sym",
    "awq-w4-g64": "AWQ W4A16 g64 asym",
    "smoothquant-gptq-w8a8": "SmoothQuant 0.8 + GPTQ W8A8 (int8 per channel / per token)",
}
LLMCOMPRESSOR_ACTIVATIONS = ("smoothquant-gptq-w8a8",)


def default_recipes() -> list[str]:
    from slimlm.recipes import shipped_recipes

    return list(SLIMLM_DEFAULT) + [name for name in shipped_recipes() if name.startswith(SLIMLM_FAMILIES)]


def scheme_of(stages: list[dict]) -> str:
    """Short description of a recipe's stages, e.g. 'rotate + gptq W4 g64 asym'."""
    parts = []
    for stage in stages:
        if "bits" in stage and stage["method"] not in ("kv-cache",):
            group = f"g{stage['group_size']}" if stage.get("group_size") else "per channel"
            kind = "sym" if stage.get("symmetric", True) else "asym"
            parts.append(f"{stage['method']} W{stage['bits']} {group} {kind}")
        else:
            parts.append(stage["method"])
    return " + ".join(parts)


def packed_footprint(packed_dir: Path, base_model: torch.nn.Module) -> dict:
    """Weight bytes of an llm-compressor checkpoint, and its quantized linears' bytes against fp16."""
    from safetensors import safe_open

    from slimlm.checkpoint.sizes import tensor_bytes_by_module

    by_module = tensor_bytes_by_module(packed_dir)
    quantized = set()
    for file in packed_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            names = handle.keys()
        quantized |= {key.rpartition(".")[0] for key in names if key.endswith(".weight_scale")}
    packed = sum(by_module[name] for name in quantized)
    fp16 = sum(2 * base_model.get_submodule(name).weight.numel() for name in quantized)
    return {"weight_bytes": sum(by_module.values()), "quantized_share_of_fp16": packed / fp16 if fp16 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wikitext", required=True, help="folder with wiki.test.raw and wiki.valid.raw")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler")
    parser.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 test windows of 2048 tokens")
    parser.add_argument(
        "--kl-windows", type=int, default=4, help="windows KL / top-1 against the base cover (~400 MB each)"
    )
    parser.add_argument(
        "--recipes",
        default=None,
        help="comma-separated slimlm recipes (default: RTN and GPTQ W4 g64, plus every shipped awq*/smoothquant*/rotate* recipe)",
    )
    parser.add_argument("--llmcompressor", help="a Python with llmcompressor 0.14 installed (its own venv)")
    parser.add_argument("--llmcompressor-methods", default=",".join(LLMCOMPRESSOR_METHODS))
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of compressions to run (median time reported; slimlm and llm-compressor alternate)",
    )
    parser.add_argument("--out", default="benchmarks/results/quantization")
    args = parser.parse_args()

    from slimlm.checkpoint.save import save_model
    from slimlm.data.calibration import sample_calibration
    from slimlm.data.text import load_text
    from slimlm.evaluate.perplexity import evaluate_quality, make_windows
    from slimlm.models.load import load_model

    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    wikitext = f"wikitext2:{Path(args.wikitext).resolve()}"
    base = load_model("smollm2-135m")
    calibration = sample_calibration(
        base.tokenizer, load_text(wikitext, "valid"), args.calib_samples, args.calib_seqlen, seed=args.seed
    )
    calib_ids = out / "calibration_ids.pt"
    torch.save(calibration.input_ids, calib_ids)
    base_dir = out / "models" / "base"
    if not base_dir.exists():
        save_model(base.model, base.tokenizer, base_dir, {"note": "dense base for side-by-side runs"})
    windows = make_windows(base.tokenizer, load_text(wikitext, "test"), 2048, args.eval_windows)
    eval_ids = out / "eval_ids.pt"
    torch.save(windows.input_ids, eval_ids)
    settings = {
        "calibration_sha256": calibration.sha256,
        "evaluation": windows.protocol(),
        "kl_windows": args.kl_windows,
    }
    print(f"calibration: {calibration.describe()}\nevaluation: {windows.protocol()}", flush=True)

    base_quality, reference = evaluate_quality(base.model, windows, keep_reference=args.kl_windows, progress=False)
    rows = [
        {"method": "base", "tool": "—", "scheme": "fp32 (dequantized Q4_1 GGUF)", "perplexity": base_quality.perplexity}
    ]

    recipes = args.recipes.split(",") if args.recipes else default_recipes()
    jobs = [("slimlm", r) for r in recipes if r]
    if args.llmcompressor:
        jobs += [("llm-compressor", m) for m in args.llmcompressor_methods.split(",") if m]
    pending = []
    for tool, method in jobs:
        result_file = out / f"{tool}-{method}.json"
        cached = json.loads(result_file.read_text()) if result_file.exists() else None
        if cached and cached.get("settings") == settings:
            rows.append(cached)
        else:
            pending.append((tool, method))
    # Rounds, not one method after another: each round runs every pending compression once, so slimlm's and
    # llm-compressor's runs of a method alternate and a slow spell of the machine falls on both.
    runs: dict[tuple[str, str], list[dict]] = {job: [] for job in pending}
    for round_index in range(args.repeat):
        for tool, method in pending:
            if len(runs[tool, method]) < round_index:
                continue  # failed in an earlier round
            run = compress_once(tool, method, args, base_dir, calib_ids, eval_ids, wikitext, out)
            if run is None:
                continue
            if tool == "slimlm":
                calibrated = run["manifest"]["calibration"]
                assert (
                    calibrated == "none: every stage of this recipe is data-free"
                    or calibrated["sha256"] == calibration.sha256
                )
            runs[tool, method].append(run)
            print(f"round {round_index + 1}/{args.repeat}: {tool} {method} {run['compress_s']:.1f} s", flush=True)
    for (tool, method), measured in runs.items():
        if not measured:
            continue
        model_dir = out / "models" / f"{tool}-{method}"
        seconds = [run["compress_s"] for run in measured]
        row = {
            "method": method,
            "tool": tool,
            "settings": settings,
            "compress_s": statistics.median(seconds),
            "compress_s_runs": seconds,
            "process_wall_s": statistics.median(run["process_wall_s"] for run in measured),
            "peak_rss_mib": max(run["peak_rss_mib"] for run in measured),
        }
        if tool == "slimlm":
            manifest = measured[-1]["manifest"]
            row.update(
                scheme=scheme_of(manifest["recipe"]["stages"]),
                weight_bytes=manifest["storage"]["weight_bytes"],
                quantized_share_of_fp16=manifest["storage"].get("quantized_share_of_fp16"),
            )
        else:
            row.update(
                scheme=LLMCOMPRESSOR_SCHEMES[method], **packed_footprint(Path(f"{model_dir}-packed"), base.model)
            )
        if tool == "llm-compressor" and method in LLMCOMPRESSOR_ACTIVATIONS:
            row.update(
                perplexity=measured[-1]["perplexity_in_process"],
                kl=None,
                top1=None,
                note="perplexity measured in llm-compressor's process (activations quantized there)",
            )
        else:
            model = load_model(str(model_dir)).model
            quality, _ = evaluate_quality(model, windows, reference=reference, progress=False)
            row.update(perplexity=quality.perplexity, kl=quality.kl_divergence, top1=quality.top1_agreement)
            del model
        (out / f"{tool}-{method}.json").write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(json.dumps(row), flush=True)

    side_by_side = time_ratios(runs)
    for method, ratios in side_by_side.items():
        print(
            f"{method}: slimlm / llm-compressor compression time per round {', '.join(f'{r:.3f}' for r in ratios['per_round'])}; median {ratios['median']:.3f}"
        )
    print(markdown_table(rows))
    summary = {
        "calibration": calibration.describe(),
        "evaluation": windows.protocol(),
        "rows": rows,
        "time_ratios": side_by_side,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def compress_once(
    tool: str,
    method: str,
    args: argparse.Namespace,
    base_dir: Path,
    calib_ids: Path,
    eval_ids: Path,
    wikitext: str,
    out: Path,
) -> dict | None:
    """Run one compression in its own process; its compression seconds, process wall seconds and peak RSS (plus
    slimlm's manifest, or for llm-compressor's activation-quantizing rows the perplexity its process measured), or
    None if it failed."""
    model_dir = out / "models" / f"{tool}-{method}"
    log = out / f"{tool}-{method}.log"
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
            "--seed",
            str(args.seed),
        ]
    else:
        command = [
            args.llmcompressor,
            str(Path(__file__).with_name("llmcompressor_side.py")),
            str(base_dir),
            str(calib_ids),
            method,
            str(model_dir),
            str(eval_ids),
        ]
    wall, peak_mib, status = run_child(command, log)
    if status:
        print(f"{tool} {method}: failed (exit {status}), see {log}", flush=True)
        return None
    run = {"process_wall_s": wall, "peak_rss_mib": peak_mib}
    if tool == "slimlm":
        manifest = json.loads((model_dir / "slimlm.json").read_text())
        run.update(compress_s=manifest["compress_seconds"], manifest=manifest)
    else:
        side = json.loads(log.read_text().strip().splitlines()[-1])
        run["compress_s"] = side["oneshot_seconds"]
        if "perplexity_in_process" in side:
            run["perplexity_in_process"] = side["perplexity_in_process"]
    return run


def time_ratios(runs: dict[tuple[str, str], list[dict]]) -> dict[str, dict]:
    """slimlm's compression time over llm-compressor's, per round, for each method both ran in every round."""
    ratios = {}
    for (tool, method), measured in runs.items():
        theirs = runs.get(("llm-compressor", method), [])
        if tool == "slimlm" and measured and len(measured) == len(theirs):
            per_round = [ours["compress_s"] / other["compress_s"] for ours, other in zip(measured, theirs)]
            ratios[method] = {"per_round": per_round, "median": statistics.median(per_round)}
    return ratios


def markdown_table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    base_ppl = rows[0]["perplexity"]
    lines = [
        "| method | tool | scheme | WikiText-2 ppl | vs base | KL | top-1 | weights MiB | quantized / fp16 | compress s | peak RSS MiB |",
        "|" + "---|" * 11,
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['tool']} | {row['scheme']} | {row['perplexity']:.2f} | {row['perplexity'] / base_ppl - 1:+.1%} | "
            f"{fmt(row.get('kl'), '.4f')} | {fmt(row.get('top1'), '.1%')} | {fmt(row.get('weight_bytes') and row['weight_bytes'] / 2**20, '.1f')} | "
            f"{fmt(row.get('quantized_share_of_fp16'), '.1%')} | {fmt(row.get('compress_s'), '.0f')} | {fmt(row.get('peak_rss_mib'), '.0f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
