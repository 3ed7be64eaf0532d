"""`slimlm finetune` on SmolLM2-135M-Instruct: WikiText-2 valid (training) -> test (held out), every method at the
same step count, each run as a user runs it (`python -m slimlm.cli finetune ... --json`) in its own process.

    python benchmarks/finetune.py                                   # ~15 min on 2 CPU cores: 30 steps x 4 x 128 tokens
    python benchmarks/finetune.py --steps 100 --batch-size 8 --device cuda
    python benchmarks/finetune.py --only lora-chat,augmented-lora-chat       # the augmentation rows alone

Rows: LoRA, DoRA, prompt tuning, adaption prompt (LLaMA-Adapter) on the fp32 model; QLoRA (LoRA on the packed
gptq-w4-g64 model, which the script builds with `slimlm compress` when --int4 is not given); DP LoRA at ε = 8,
δ = 1e-5; LoRA and DP LoRA also carry planted canaries, so their exposure is measured at equal steps. Augmentation:
LoRA on a small instruction set (the first --chat-examples PIQA validation goals as user prompts, their correct
solutions as answers, a quarter held out) with and without `--augment` (the model itself answers each training
prompt), at equal steps, held-out perplexity on the held-out answers.
Figures: held-out perplexity before/after (GPTQ-protocol windows of WikiText-2 test), trainable parameters, the
training phase's peak RSS (VmHWM reset after the model is loaded) and the whole process's (GNU time), training
tokens/s and seconds, ε as Opacus' accountant computes it, canary exposure in bits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import run_child

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext-2-raw"
PIQA = SHARED_DATA / "piqa"


def rows(args, small: Path, chat: Path) -> list[tuple[str, str, list[str]]]:
    """(row name, model, extra finetune flags). The canary rows train on a small set (`small`, the first
    --canary-windows windows of WikiText-2 valid) so that each planted secret is seen several times in the steps;
    the chat rows on `chat` (PIQA as instructions), a quarter of it held out."""
    wiki = ["--data", f"wikitext2:{args.wikitext}", "--eval-data", f"wikitext2:{args.wikitext}"]
    canaries = [
        "--canaries",
        str(args.canaries),
        "--canary-repeats",
        str(args.canary_repeats),
        "--canary-candidates",
        str(args.canary_candidates),
        "--data",
        str(small),
    ]
    dp = ["--dp-epsilon", "8", "--dp-delta", "1e-5", "--max-grad-norm", "1.0"]
    instructions = ["--method", "lora", "--data", str(chat), "--heldout", "0.25", "--seqlen", str(args.chat_seqlen)]
    return [
        ("lora", "smollm2-135m", [*wiki, "--method", "lora"]),
        ("qlora (gptq-w4-g64)", str(args.int4), [*wiki, "--method", "lora"]),
        ("dp-lora ε=8", "smollm2-135m", [*wiki, "--method", "lora", *dp]),
        ("canaries lora", "smollm2-135m", [*wiki, "--method", "lora", *canaries]),
        ("canaries dp-lora ε=8", "smollm2-135m", [*wiki, "--method", "lora", *dp, *canaries]),
        ("dora", "smollm2-135m", [*wiki, "--method", "dora"]),
        ("prompt-tuning", "smollm2-135m", [*wiki, "--method", "prompt-tuning"]),
        ("adaption-prompt", "smollm2-135m", [*wiki, "--method", "adaption-prompt"]),
        ("lora chat (piqa)", "smollm2-135m", instructions),
        (
            f"augmented lora chat (piqa, +{args.augment} per example)",
            "smollm2-135m",
            [*instructions, "--augment", str(args.augment), "--augment-tokens", str(args.augment_tokens)],
        ),
    ]


def piqa_chat(args) -> Path:
    """The first --chat-examples PIQA validation goals as user prompts and their correct solutions as answers."""
    labels = (PIQA / "valid-labels.lst").read_text().split()
    lines = []
    for line, label in zip((PIQA / "valid.jsonl").read_text().splitlines()[: args.chat_examples], labels):
        row = json.loads(line)
        messages = [
            {"role": "user", "content": row["goal"]},
            {"role": "assistant", "content": row[f"sol{int(label) + 1}"]},
        ]
        lines.append(json.dumps({"messages": messages}))
    path = args.work / "piqa-chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def small_text(args) -> Path:
    """The first --canary-windows x --seqlen tokens' worth of WikiText-2 valid, as a .txt (about 4 characters a token)."""
    from slimlm.data.text import load_text

    path = args.work / "small.txt"
    path.write_text(load_text(f"wikitext2:{args.wikitext}", "valid").text[: args.canary_windows * args.seqlen * 4])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wikitext", type=Path, default=WIKITEXT)
    parser.add_argument(
        "--int4", type=Path, default=None, help="a gptq-w4-g64 model directory (default: built in --work)"
    )
    parser.add_argument("--work", type=Path, default=Path("finetune-bench"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--canaries", type=int, default=2)
    parser.add_argument("--canary-candidates", type=int, default=127, help="scoring costs one forward per candidate")
    parser.add_argument("--canary-repeats", type=int, default=8)
    parser.add_argument("--canary-windows", type=int, default=40, help="training windows of the canary rows")
    parser.add_argument(
        "--chat-examples", type=int, default=48, help="PIQA conversations of the chat rows (a quarter held out)"
    )
    parser.add_argument("--chat-seqlen", type=int, default=128)
    parser.add_argument("--augment", type=int, default=1, help="teacher-written rows per training conversation")
    parser.add_argument("--augment-tokens", type=int, default=48)
    parser.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--parallel", type=int, default=1, help="rows run at once (speed figures are then contended)")
    parser.add_argument("--reuse", action="store_true", help="keep the rows an earlier run in --work finished")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    if args.int4 is None:
        args.int4 = args.work / "smol-gptq-w4-g64"
        if not args.int4.is_dir():
            command = [
                python,
                "-m",
                "slimlm.cli",
                "compress",
                "smollm2-135m",
                "--recipe",
                "gptq-w4-g64",
                "--out",
                str(args.int4),
                "--calib-samples",
                "32",
                "--calib-seqlen",
                "512",
                "--no-eval",
            ]
            seconds, _, status = run_child(command, args.work / "gptq.log")
            if status:
                sys.exit(f"building {args.int4} failed: see {args.work / 'gptq.log'}")
            print(f"built {args.int4} in {seconds:.0f} s", flush=True)
    common = [
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seqlen",
        str(args.seqlen),
        "--eval-windows",
        str(args.eval_windows),
        "--overwrite",
    ]
    if args.device:
        common += ["--device", args.device]
    wanted = set(args.only.split(",")) if args.only else None
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    jobs = []
    for name, model, extra in rows(args, small_text(args), piqa_chat(args)):
        slug = name.split(" ε")[0].split(" (")[0].replace(" ", "-")
        if wanted is None or slug in wanted:
            command = [
                python,
                "-m",
                "slimlm.cli",
                "finetune",
                model,
                "--out",
                str(args.work / slug),
                *common,
                *extra,
                "--json",
                str(args.work / f"{slug}.json"),
            ]
            jobs.append((name, slug, command))

    def run_row(job: tuple[str, str, list[str]]) -> tuple[str, dict | None]:
        name, slug, command = job
        manifest_path, rss_path = args.work / f"{slug}.json", args.work / f"{slug}.maxrss"
        if args.reuse and manifest_path.is_file() and rss_path.is_file():  # a finished earlier run of this row
            return name, row_result(manifest_path, int(rss_path.read_text().split()[-1]) / 1024)
        seconds, rss, status = run_child(command, args.work / f"{slug}.log")
        if status:
            print(f"{name}: failed (exit {status}), see {args.work / slug}.log", flush=True)
            return name, None
        print(f"{name}: done in {seconds:.0f} s", flush=True)
        return name, row_result(manifest_path, rss)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:  # rows are separate processes; threads only wait
        results = {name: metrics for name, metrics in pool.map(run_row, jobs) if metrics is not None}
    print(table(results, args, started, load))
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def row_result(manifest_path: Path, process_peak_rss_mb: float) -> dict:
    """A row's metrics, with the augmentation record (kept under the manifest's data) when it has one."""
    manifest = json.loads(manifest_path.read_text())
    augment = {"augment": manifest["data"]["augment"]} if "augment" in manifest["data"] else {}
    return {**manifest["metrics"], **augment, "process_peak_rss_mb": process_peak_rss_mb}


def table(results: dict, args, started: str, load: tuple[float, float, float]) -> str:
    lines = [
        f"finetune benchmark, {started}, {args.parallel} row(s) at a time, load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min), "
        f"{args.steps} steps x {args.batch_size} x {args.seqlen} tokens, held out: first {args.eval_windows} windows x {args.seqlen} of WikiText-2 test "
        f"(chat rows: {args.chat_seqlen}-token rows, held out: a quarter of {args.chat_examples} PIQA conversations)",
        "",
        "| row | base ppl | fine-tuned ppl | Δ | trainable params | training peak RSS MB | process peak RSS MB | tokens/s | train s | ε (δ=1e-5) | canary exposure (bits) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        before, after = m["base"]["perplexity"], m["finetuned"]["perplexity"]
        eps = (
            f"{m['privacy']['epsilon']:.2f} (σ {m['privacy']['noise_multiplier']:.3f}, {m['privacy']['accountant']})"
            if "privacy" in m
            else "—"
        )
        exposure = (
            f"{m['canaries']['mean_exposure']:.2f} of {m['canaries']['max_exposure']:.1f}" if "canaries" in m else "—"
        )
        peak = f"{m['training_peak_rss_mb']:.0f}" if m.get("training_peak_rss_mb") else "—"
        lines.append(
            f"| {name} | {before:.3f} | {after:.3f} | {after / before - 1:+.1%} | {m['trainable_parameters']:,} | {peak} | {m['process_peak_rss_mb']:.0f} | "
            f"{m['tokens_per_second']:,.0f} | {m['train_seconds']:.0f} | {eps} | {exposure} |"
        )
    lora, qlora, dp = results.get("lora"), results.get("qlora (gptq-w4-g64)"), results.get("dp-lora ε=8")
    chat, augmented = (
        results.get("lora chat (piqa)"),
        results.get(f"augmented lora chat (piqa, +{args.augment} per example)"),
    )
    plain_canary, dp_canary = results.get("canaries lora"), results.get("canaries dp-lora ε=8")
    if lora and qlora:
        int4_base, int4_ft, fp_ft = (
            qlora["base"]["perplexity"],
            qlora["finetuned"]["perplexity"],
            lora["finetuned"]["perplexity"],
        )
        closed = (int4_base - int4_ft) / (int4_base - fp_ft) if int4_base != fp_ft else float("nan")
        lines += [
            "",
            f"QLoRA: int4 base {int4_base:.3f} → {int4_ft:.3f}; fine-tuned fp32 {fp_ft:.3f}: {closed:.0%} of the int4 model's gap to the fine-tuned fp32 model closed; "
            f"training peak RSS {qlora.get('training_peak_rss_mb') or float('nan'):.0f} MB vs {lora.get('training_peak_rss_mb') or float('nan'):.0f} MB for LoRA on fp32",
        ]
    if lora and dp:
        lines += [
            f"DP LoRA: held-out ppl {dp['finetuned']['perplexity'] / lora['finetuned']['perplexity'] - 1:+.1%} vs non-private LoRA at equal steps; "
            f"training time {dp['train_seconds'] / lora['train_seconds']:.2f}× (tokens/s {dp['tokens_per_second'] / lora['tokens_per_second']:.2f}×; DP batches are Poisson-sized)"
        ]
    if plain_canary and dp_canary:
        lines += [
            f"canaries ({args.canaries} secrets x {args.canary_repeats} copies in {args.canary_windows} windows): mean exposure {plain_canary['canaries']['mean_exposure']:.2f} bits "
            f"without DP, {dp_canary['canaries']['mean_exposure']:.2f} with DP (ε {dp_canary['privacy']['epsilon']:.2f}) at equal steps; chance ≈ 1 bit"
        ]
    if chat and augmented:
        a = augmented["augment"]
        reasons = ", ".join(f"{n} {reason}" for reason, n in a["dropped_by_reason"].items()) or "none"
        lines += [
            f"augmentation ({a['teacher']} answering its own {a['prompts']} training prompts, {a['new_tokens']} tokens at most, T={a['sampling']['temperature']}, "
            f"top-p {a['sampling']['top_p']}): {a['generated']} rows written, {a['kept']} kept, {a['dropped']} dropped ({reasons}), {a['cut_at_budget']} cut at the budget, "
            f"{a['seconds']:.0f} s; held-out ppl {chat['finetuned']['perplexity']:.3f} without, {augmented['finetuned']['perplexity']:.3f} with, at equal steps"
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
