"""Prune SmolLM2-135M by ~25% of its parameters, distil it from the unpruned model for a fixed token budget, and
report WikiText-2 perplexity before / after, training tokens/s and, on a GPU, the MFU of a distillation step and
the tokens/s of batched static-cache generation.

    # CPU smoke (minutes): a few steps, short windows
    flock /tmp/slimlm-heavy.lock .venv/bin/python benchmarks/distill.py --prune width-25pct --steps 4 --batch-size 2 \\
        --seqlen 256 --eval-windows 4 --eval-seqlen 512 --calib-samples 16 --calib-seqlen 512
    # GPU: a real budget, then one step's MFU at batch 16 x 2048 in bf16 and generation throughput
    python benchmarks/distill.py --prune width-25pct --steps 2000 --batch-size 16 --seqlen 2048 --device cuda --mfu --generate

MFU counts the student's training FLOPs only (6·N·tokens for the matmuls, N the student's parameters including
the LM head, plus 12·L·H·T per token for attention scores, PaLM's formula) against the GPU's dense bf16 peak;
the teacher's forward is extra work the figure does not credit. Tokens/s are training tokens (student reads).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from slimlm.api import dense_bytes
from slimlm.data.calibration import sample_calibration
from slimlm.data.text import load_text
from slimlm.distill.data import SamplingSettings, generate
from slimlm.distill.stage import Base, DistillConfig, distill_, distillation_loss_fn
from slimlm.evaluate.footprint import parameter_count
from slimlm.evaluate.perplexity import evaluate_quality, make_windows
from slimlm.models.load import load_model
from slimlm.pipeline import compress_
from slimlm.recipes import load_recipe

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core bf16 FLOP/s


def training_flops_per_token(model, seqlen: int) -> float:
    config = model.config
    return (
        6 * parameter_count(model)
        + 12
        * config.num_hidden_layers
        * config.num_attention_heads
        * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        * seqlen
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_mfu(
    student,
    teacher,
    config: DistillConfig,
    batch: int,
    seqlen: int,
    device: torch.device,
    repeats: int = 5,
    compile_: bool = False,
) -> dict:
    """Median time of full distillation steps (teacher forward, student forward/backward, AdamW) in bf16 autocast."""
    student, teacher = copy.deepcopy(student).to(device).train(), teacher.to(device).eval()
    loss_fn = distillation_loss_fn(config, teacher, None, [])
    if compile_:
        student.forward = torch.compile(student.forward)
        teacher.forward = torch.compile(teacher.forward)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, student.config.vocab_size, (batch, seqlen), device=device)
    data = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    times = []
    for index in range(repeats + 2):  # 2 warm-up steps
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(student, data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if index >= 2:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    tokens = batch * seqlen
    result = {
        "batch": batch,
        "seqlen": seqlen,
        "step_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "compiled": compile_,
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        achieved = training_flops_per_token(student, seqlen) * tokens / seconds
        result.update(
            device=name,
            achieved_tflops=achieved / 1e12,
            mfu=achieved / peak if peak else None,
            peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9,
        )
    return result


def measure_generation(model, batch: int, prompt: int, new_tokens: int, device: torch.device) -> dict:
    """Generated tokens/s of batched sampling with a static KV cache (compiled by transformers on CUDA)."""
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt))
    generate(model, prompts, new_tokens, SamplingSettings(), seed=0)  # warm-up (and compilation)
    sync(device)
    start = time.perf_counter()
    generate(model, prompts, new_tokens, SamplingSettings(), seed=1)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "generated_tokens_per_second": batch * new_tokens / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--prune", default="width-25pct", help="a structured pruning recipe: width-25pct or depth-25pct"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--loss", default="forward_kl")
    parser.add_argument("--lora", type=int, default=None)
    parser.add_argument(
        "--data",
        default=f"wikitext2:{WIKITEXT}",
        help="training text (its calibration split: WikiText-2 valid when train is absent)",
    )
    parser.add_argument("--eval-windows", type=int, default=None, help="WikiText-2 test windows (default: all)")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=2048)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--mfu", action="store_true", help="also time distillation steps at --mfu-batch x --mfu-seqlen (bf16 on CUDA)"
    )
    parser.add_argument("--mfu-batch", type=int, default=16)
    parser.add_argument("--mfu-seqlen", type=int, default=2048)
    parser.add_argument("--compile", action="store_true", help="torch.compile the student and teacher for --mfu")
    parser.add_argument("--generate", action="store_true", help="also measure batched static-cache generation")
    parser.add_argument("--generate-batch", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/distill.json")
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device)
    base, tokenizer, device = loaded.model, loaded.tokenizer, loaded.model.device
    windows = make_windows(tokenizer, load_text(f"wikitext2:{WIKITEXT}", "test"), args.eval_seqlen, args.eval_windows)
    report: dict = {"model": args.model, "prune": args.prune, "protocol": windows.protocol(), "device": str(device)}
    report["base"] = {
        "perplexity": evaluate_quality(base, windows)[0].perplexity,
        "parameters": parameter_count(base),
        "dense_bytes": dense_bytes(base),
    }

    student = copy.deepcopy(base)
    calibration = sample_calibration(
        tokenizer, load_text(f"wikitext2:{WIKITEXT}", "calibration"), args.calib_samples, args.calib_seqlen
    )
    compress_(student, load_recipe(args.prune), calibration, device)
    report["pruned"] = {
        "perplexity": evaluate_quality(student, windows)[0].perplexity,
        "parameters": parameter_count(student),
    }
    report["pruned"]["parameter_share"] = report["pruned"]["parameters"] / report["base"]["parameters"]

    config = DistillConfig(
        loss=args.loss, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seqlen=args.seqlen, lr=args.lr,
        warmup=max(args.steps // 10, 0), lora=args.lora, data=args.data, checkpoint_dir=args.checkpoint_dir, checkpoint_every=50 if args.checkpoint_dir else 0,
    )  # fmt: skip
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    start = time.perf_counter()
    result = distill_(student, Base(teacher, tokenizer), config, device)
    report["distill"] = {
        "config": asdict(config),
        "tokens": args.steps * args.batch_size * args.grad_accum * args.seqlen,
        "seconds": time.perf_counter() - start,
        "train_tokens_per_second": result.tokens_per_second,
        "first_losses": result.losses[:3],
        "last_losses": result.losses[-3:],
    }
    report["distilled"] = {
        "perplexity": evaluate_quality(student, windows)[0].perplexity,
        "parameters": parameter_count(student),
    }
    report["distilled"]["ratio_to_base"] = report["distilled"]["perplexity"] / report["base"]["perplexity"]
    if args.mfu:
        report["mfu"] = measure_mfu(
            student, teacher, config, args.mfu_batch, args.mfu_seqlen, device, compile_=args.compile
        )
    if args.generate:
        report["generation"] = measure_generation(copy.deepcopy(student), args.generate_batch, 64, 256, device)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    b, p, d = report["base"], report["pruned"], report["distilled"]
    print(f"{report['protocol']}")
    print(f"base       ppl {b['perplexity']:8.3f}   params {b['parameters'] / 1e6:6.1f}M")
    print(
        f"pruned     ppl {p['perplexity']:8.3f}   params {p['parameters'] / 1e6:6.1f}M ({p['parameter_share']:.1%} of base)"
    )
    print(
        f"distilled  ppl {d['perplexity']:8.3f}   ({d['ratio_to_base']:.3f} x base) after {report['distill']['tokens']:,} tokens in {report['distill']['seconds']:.0f} s, {report['distill']['train_tokens_per_second']:,.0f} train tok/s"
    )
    if "mfu" in report:
        m = report["mfu"]
        mfu = f", MFU {m['mfu']:.1%}" if m.get("mfu") is not None else ""
        print(
            f"step at {m['batch']} x {m['seqlen']}: {m['step_seconds'] * 1e3:.1f} ms, {m['tokens_per_second']:,.0f} tok/s{mfu}"
        )
    if "generation" in report:
        g = report["generation"]
        print(f"generation batch {g['batch']}: {g['generated_tokens_per_second']:,.0f} generated tok/s")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
