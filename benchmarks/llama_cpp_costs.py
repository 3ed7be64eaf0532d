"""Calibrate slimlm's llama.cpp decode cost model on this machine, check it on held-out mixtures, and measure what
llama-cpp-python adds over llama.cpp's own llama-bench (needs `pip install -e '.[engines]'`).

    python benchmarks/llama_cpp_costs.py [--model smollm2-135m] [--types q8_0,q4_0,q4_1,q5_0,f16] [--threads 2]
        [--prompt-tokens 512 --new-tokens 128 --repeats 10] [--llama-bench /work/llama-cache/build/bin/llama-bench]
        [--out benchmarks/results/llama_cpp_costs] [--work-dir /tmp/slimlm-llama-costs]

1. `measure_type_costs` writes and measures the calibration files (uniform per type, block linears per type with
   the embedding in the first type, half depth, half-width MLPs) and fits the cost model: --out/costs.json.
2. Held-out mixtures, none of them a calibration file, are written and measured against the model's prediction
   (decode tok/s and peak RSS): --out/validation.json and a markdown table.
3. The first held-out file is also measured by `llama-bench` (pp = prompt from an empty cache; tg at depth
   --prompt-tokens = decode after the prompt, as `llama_cpp_speed` measures it): the overhead of the Python path.

Every timing carries the load average it was taken under; the box is shared, so read them with it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

DEFAULT_BENCH = Path("/work/llama-cache/build/bin/llama-bench")


def held_out(shapes: dict, reference: str = "q8_0") -> dict[str, dict[str, str]]:
    """Mixtures the calibration never saw (each from llama.cpp's or a search's playbook)."""

    def blocks(rule):
        return {name: (rule(name) if name.startswith("blk.") else reference) for name in shapes}

    return {
        "q4_0 blocks, q8_0 ffn_down": blocks(lambda name: "q8_0" if "ffn_down" in name else "q4_0"),
        "q4_1 attention, q5_0 ffn": blocks(lambda name: "q4_1" if ".attn_" in name else "q5_0"),
        "q4_0 blocks, f16 embedding": {name: "q4_0" if name.startswith("blk.") else "f16" for name in shapes},
    }


def llama_bench(binary: Path, path: Path, threads: int, prompt: int, new: int, repeats: int) -> dict:
    command = [
        str(binary),
        "-m",
        str(path),
        "-t",
        str(threads),
        "-p",
        str(prompt),
        "-n",
        str(new),
        "-d",
        f"0,{prompt}",
        "-r",
        str(repeats),
        "-o",
        "json",
    ]
    rows = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    found = {}
    for row in rows:
        kind = "pp" if row["n_prompt"] else "tg"
        found[f"{kind}{row['n_prompt'] or row['n_gen']}@d{row['n_depth']}"] = row["avg_ts"]
    return {"command": " ".join(command), "tokens_per_s": found}


def main() -> None:
    from slimlm.evaluate.llama_cpp import llama_cpp_speed, load_average
    from slimlm.evaluate.llama_cpp_costs import decode_rate, measure_type_costs
    from slimlm.export.gguf import write_gguf
    from slimlm.models.load import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--types", default="q8_0,q4_0,q4_1,q5_0,f16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="rounds of decoding every file side by side")
    parser.add_argument(
        "--statistic",
        default="median",
        help="decode figure fitted: median (of rounds), p10 (of token latencies) or cpu (CPU time; with OMP_WAIT_POLICY=passive)",
    )
    parser.add_argument("--llama-bench", default=str(DEFAULT_BENCH))
    parser.add_argument("--out", default="benchmarks/results/llama_cpp_costs", help="costs.json, validation.json")
    parser.add_argument(
        "--work-dir", default="/tmp/slimlm-llama-costs", help="the GGUF files measured (kept for re-measuring)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")

    loaded = load_model(args.model, device="cpu")
    start_load = load_average()
    costs = measure_type_costs(
        loaded,
        types,
        args.threads,
        args.prompt_tokens,
        args.new_tokens,
        args.repeats,
        work_dir=work,
        statistic=args.statistic,
    )
    costs.save(out / "costs.json")
    print(f"calibrated on {costs.model} ({costs.machine}; {costs.llama_cpp}); load at start {start_load}")
    print(
        f"fixed {costs.fixed_seconds * 1e3:.2f} ms/token + {costs.seconds_per_block * 1e3:.3f} ms/block; "
        + ", ".join(
            f"{t} {1 / s / 1e9:.2f} GB/s" if s > 0 else f"{t} {s:.2e} s/B" for t, s in costs.seconds_per_byte.items()
        )
    )
    lines = [
        "| file | kind | MB (2-D tensors) | measured tok/s | fitted tok/s | error | measured RSS MiB | fitted RSS MiB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in costs.measurements:
        fitted = 1 / (
            costs.fixed_seconds
            + m.blocks * costs.seconds_per_block
            + sum(b * costs.seconds_per_byte[t] for t, b in m.bytes_by_type.items())
        )
        ram = (
            costs.ram_fixed_bytes
            + m.blocks * costs.ram_per_block
            + sum(b * costs.ram_per_byte[t] for t, b in m.bytes_by_type.items())
        )
        lines.append(
            f"| {m.label} | calibration | {sum(m.bytes_by_type.values()) / 1e6:.1f} | {decode_rate(m, costs.statistic):.1f} | {fitted:.1f} | "
            f"{fitted / decode_rate(m, costs.statistic) - 1:+.1%} | {m.peak_rss_bytes / 2**20:.0f} | {ram / 2**20:.0f} | {m.load} |"
        )
    checks = []
    for label, tensor_types in held_out(costs.shapes).items():
        path = work / f"{label.replace(' ', '_').replace(',', '')}.gguf"
        write_gguf(loaded.model, loaded.tokenizer, path, types[0], overwrite=True, tensor_types=tensor_types)
        check = {"label": label, **costs.check_file(path)}
        checks.append(check)
        lines.append(
            f"| {label} | held out | {path.stat().st_size / 1e6:.1f} (file) | {check['measured_decode_tokens_per_s']:.1f} | "
            f"{check['predicted_decode_tokens_per_s']:.1f} | {check['decode_error']:+.1%} | {check['measured_ram_bytes'] / 2**20:.0f} | "
            f"{check['predicted_ram_bytes'] / 2**20:.0f} | {check['load']} |"
        )
    overhead = None
    if Path(args.llama_bench).is_file() and checks:
        path = Path(checks[0]["file"])
        ours = llama_cpp_speed(path, args.threads, args.prompt_tokens, args.new_tokens, args.repeats)
        bench = llama_bench(
            Path(args.llama_bench), path, args.threads, args.prompt_tokens, args.new_tokens, args.repeats
        )
        overhead = {
            "file": str(path),
            "llama_cpp_speed": {
                "prefill": ours.prefill_tokens_per_s,
                "decode": ours.decode_tokens_per_s,
                "load": ours.load,
            },
            "llama_bench": bench,
            "load_after": load_average(),
        }
    (out / "validation.json").write_text(
        json.dumps({"held_out": checks, "llama_bench_overhead": overhead}, indent=2) + "\n"
    )
    print("\n".join(lines))
    if overhead:
        bench = overhead["llama_bench"]["tokens_per_s"]
        print(
            f"\nllama-cpp-python vs llama-bench on {Path(overhead['file']).name}: prefill {overhead['llama_cpp_speed']['prefill']:.0f} vs "
            f"pp{args.prompt_tokens} {bench.get(f'pp{args.prompt_tokens}@d0', float('nan')):.0f} tok/s; decode {overhead['llama_cpp_speed']['decode']:.1f} vs "
            f"tg{args.new_tokens}@d{args.prompt_tokens} {bench.get(f'tg{args.new_tokens}@d{args.prompt_tokens}', float('nan')):.1f} tok/s "
            f"(tg{args.new_tokens}@d0 {bench.get(f'tg{args.new_tokens}@d0', float('nan')):.1f}); load {overhead['load_after']}"
        )


if __name__ == "__main__":
    main()
