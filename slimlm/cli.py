"""`slimlm` command line: a thin layer over `slimlm.api`. Every error a user can cause is one line, exit 2."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from slimlm.errors import SlimlmError
from slimlm.evaluate.speculative import ACCEPTANCE, SPECULATIVE
from slimlm.settings import (
    COMPRESS_EVALUATION,
    CT_SEARCH_TYPES,
    DEFAULT_CONSTRAINTS,
    DEFAULT_MODEL,
    FAST_CT_SEARCH_TYPES,
    FAST_EVALUATION,
    FAST_SEARCH,
    FAST_SEARCH_EVALUATION,
    RUN_CALIBRATION,
    SEARCH_EVALUATION,
    SENSITIVITY_CALIBRATION,
    SENSITIVITY_EVALUATION,
    CalibrationSettings,
    Constraints,
    EvalSettings,
    SearchSettings,
    SettingError,
)
from slimlm.settings import (
    DEFAULT_SEARCH as SEARCH,
)

# The defaults of every option below come from these settings instances (slimlm/settings.py), declared once.
CALIBRATION = CalibrationSettings()
EVALUATION = EvalSettings()

app = typer.Typer(
    name="slimlm",
    help="Turn language models into small language models, and measure what each step costs and buys.\n\n"
    "Quick start: [bold]slimlm run[/bold] searches the built-in SmolLM2-135M for the best GGUF at llama.cpp Q4_0's size and prints the front.\n\n"
    "[bold]Examples[/bold]\n\n"
    "  slimlm run --fast           # the search, quicker\n"
    "  slimlm search --max-size 80MB --out smol-80   # your budget\n"
    "  slimlm recipes              # what each shipped recipe does\n"
    "  slimlm compress smollm2-135m --recipe rtn-w4-g64 --out smol-w4\n"
    "  slimlm eval smol-w4 --base smollm2-135m --windows 4",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[
    str, typer.Argument(help="Built-in alias 'smollm2-135m', a model directory, a .gguf file, or a hub id (org/name).")
]
EvalData = Annotated[
    str,
    typer.Option(
        "--eval-data", help="'default' (offline corpus), a .txt/.jsonl file, 'wikitext2:DIR', or 'hf:NAME[:CONFIG]'."
    ),
]
Seqlen = Annotated[int, typer.Option("--seqlen", help="Tokens per perplexity window.")]
Windows = Annotated[int | None, typer.Option("--windows", help="Evaluate only the first N windows (default: all).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output directory if it exists.")]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")]
CalibData = Annotated[
    str,
    typer.Option(
        "--calib-data", help="Calibration text (same forms as --eval-data); used only by methods that need data."
    ),
]
CalibSamples = Annotated[
    int, typer.Option("--calib-samples", help="Calibration windows (128 as in GPTQ/Wanda; fewer is faster on CPU).")
]
CalibSeqlen = Annotated[int, typer.Option("--calib-seqlen", help="Tokens per calibration window.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the calibration sampler.")]
Tasks = Annotated[
    str | None,
    typer.Option(
        "--tasks",
        help="Zero-shot tasks, comma-separated: hellaswag, piqa, arc_easy, arc_challenge, lambada, boolq, winogrande, openbookqa, truthfulqa_mc1, truthfulqa_mc2, crows_pairs; NAME:PATH reads PATH.",
    ),
]
TaskLimit = Annotated[
    int | None, typer.Option("--limit", help="Examples per task: a seeded random subset (default: all).")
]
TaskData = Annotated[
    Path | None,
    typer.Option(
        "--task-data",
        help="Folder with the tasks' files (default: $SLIMLM_DATA or a shared/data folder nearby; else the hub when online).",
    ),
]
SpeedFlag = Annotated[
    bool,
    typer.Option(
        "--speed",
        help="Also measure TTFT, TPOT, throughput at batch 1/8/32, peak memory and energy (where a meter is readable).",
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow .bin/.pt pickle checkpoints (they can run code: trusted sources only)."),
]


EVAL_FLAGS = {"seqlen": "--seqlen", "max_windows": "--windows", "chunk_size": "--chunk-size", "task_limit": "--limit"}
CALIBRATION_FLAGS = {"data": "--calib-data", "samples": "--calib-samples", "seqlen": "--calib-seqlen", "seed": "--seed"}


def _build(settings_class: type, flags: dict[str, str], **values: object):
    """`settings_class(**values)`; a bad value is refused naming the flag the user typed, not the field."""
    try:
        return settings_class(**values)
    except SettingError as err:
        if err.field in flags:
            raise err.for_flag(flags[err.field]) from None
        raise


def _calibration(data: str, samples: int, seqlen: int, seed: int) -> CalibrationSettings:
    return _build(CalibrationSettings, CALIBRATION_FLAGS, data=data, samples=samples, seqlen=seqlen, seed=seed)


def _settings(
    eval_data: str, split: str, seqlen: int, windows: int | None, kl_windows: int, **more: object
) -> EvalSettings:
    flags = {**EVAL_FLAGS, "data": "--eval-data"}
    values = dict(data=eval_data, split=split, seqlen=seqlen, max_windows=windows, kl_windows=kl_windows, **more)
    return _build(EvalSettings, flags, **values)


@app.command()
def run(
    model: Annotated[
        str, typer.Option("--model", help="Model to compress (alias, directory, .gguf or hub id).")
    ] = DEFAULT_MODEL,
    recipes: Annotated[
        str | None,
        typer.Option(
            "--recipes", help="Compare these recipes (comma-separated names or YAML paths) instead of searching."
        ),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(
            "--max-size",
            help="The search's budget: 92MB, or a llama.cpp preset name (default: q4_0, its size for this model).",
        ),
    ] = None,
    as_json: Annotated[
        Path | None, typer.Option("--json", help="Write the search's front as JSON to this file ('-': stdout).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Report directory (default: slimlm-runs/<timestamp>).")
    ] = None,
    eval_data: EvalData = EVALUATION.data,
    seqlen: Seqlen = EVALUATION.seqlen,
    windows: Windows = EVALUATION.max_windows,
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help=f"Quick look: the fast search (and with --recipes, {FAST_EVALUATION.max_windows} windows of {FAST_EVALUATION.seqlen} tokens, KL on {FAST_EVALUATION.kl_windows}).",
        ),
    ] = False,
    tasks: Tasks = None,
    limit: TaskLimit = None,
    task_data: TaskData = None,
    speed: SpeedFlag = False,
    calib_data: CalibData = RUN_CALIBRATION.data,
    calib_samples: CalibSamples = RUN_CALIBRATION.samples,
    calib_seqlen: CalibSeqlen = RUN_CALIBRATION.seqlen,
    seed: Seed = RUN_CALIBRATION.seed,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    device: Device = None,
) -> None:
    """The main job: search the model for the best GGUF at the size of llama.cpp's Q4_0, and print the front.

    Without --recipes: `slimlm search` under the default budget (the size of llama.cpp's Q4_0 for this model, or
    --max-size): searched points against slimlm's uniform codes and llama.cpp's presets, the chosen file exported.
    With --recipes: compress with each recipe, evaluate base and every result, write one report (the comparison
    of slimlm's methods on the HF / compressed-tensors side).

    [bold]Examples[/bold]

      slimlm run                                   # SmolLM2-135M: search at Q4_0's size, front + chosen GGUF
      slimlm run --fast                            # the same, about 3x quicker (fewer types and windows)
      slimlm run --max-size 75MB                   # another budget
      slimlm run --recipes awq-gptq-w4-g64,sparsegpt-50 --eval-data wikitext2:../shared/data/wikitext-2-raw
      slimlm run --recipes gptq-w4-g64,wanda-50 --calib-samples 128 --calib-seqlen 2048   # the papers' calibration (slower)
    """
    if not recipes:
        from slimlm.api import search as search_job

        preset = FAST_SEARCH if fast else SEARCH
        constraints = _constraints(None, max_size=max_size or DEFAULT_CONSTRAINTS.max_size)
        evaluation = FAST_SEARCH_EVALUATION if fast else SEARCH_EVALUATION
        if eval_data != EVALUATION.data or windows is not None:
            evaluation = _settings(
                eval_data,
                evaluation.split,
                evaluation.seqlen,
                windows or evaluation.max_windows,
                windows or evaluation.kl_windows,
            )
        out = out or Path("slimlm-runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
        result = search_job(
            model=model,
            out_dir=out,
            constraints=constraints,
            settings=preset,
            evaluation=evaluation,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            device=device,
        )
        _print_search(result, as_json)
        return
    from slimlm.api import run as run_job

    names = tuple(r.strip() for r in recipes.split(",") if r.strip())
    shape = FAST_EVALUATION if fast else _settings(eval_data, EVALUATION.split, seqlen, windows, EVALUATION.kl_windows)
    settings = _settings(
        eval_data,
        shape.split,
        shape.seqlen,
        shape.max_windows,
        shape.kl_windows,
        **_task_settings(tasks, limit, EVALUATION.task_seed, task_data, speed),
    )
    calibration = _calibration(calib_data, calib_samples, calib_seqlen, seed)
    run_job(
        model=model,
        recipes=names,
        evaluation=settings,
        calibration=calibration,
        out_dir=out,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        device=device,
    )


@app.command()
def compress(
    model: ModelArg,
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Shipped recipe name (see 'slimlm recipes') or a YAML file.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model directory (written atomically).")],
    calib_data: CalibData = CALIBRATION.data,
    calib_samples: CalibSamples = CALIBRATION.samples,
    calib_seqlen: CalibSeqlen = CALIBRATION.seqlen,
    seed: Seed = CALIBRATION.seed,
    eval_data: EvalData = COMPRESS_EVALUATION.data,
    seqlen: Seqlen = COMPRESS_EVALUATION.seqlen,
    windows: Annotated[
        int, typer.Option("--windows", help="Perplexity windows for the before/after check.")
    ] = COMPRESS_EVALUATION.max_windows,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the before/after evaluation.")] = False,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    device: Device = None,
) -> None:
    """Compress one model with one recipe and save it as a Hugging Face directory plus slimlm.json.

    [bold]Examples[/bold]

      slimlm compress smollm2-135m --recipe magnitude-2of4 --out smol-2of4
      slimlm compress smollm2-135m --recipe rtn-w4-g64 --out smol-w4 --windows 4
      slimlm compress ./my-model --recipe my-recipe.yaml --out ./my-model-small --no-eval
      torchrun --nproc_per_node 8 -m slimlm.cli compress smollm2-135m --recipe minitron-25 --out smol-minitron
      (training stages run FSDP2-sharded over the processes; rank 0 evaluates and saves)
    """
    from slimlm.api import compress as compress_job
    from slimlm.progress import console
    from slimlm.train.distributed import world

    calibration = _calibration(calib_data, calib_samples, calib_seqlen, seed)
    evaluation = (
        None
        if no_eval
        else _settings(eval_data, COMPRESS_EVALUATION.split, seqlen, windows, COMPRESS_EVALUATION.kl_windows)
    )
    manifest = compress_job(
        model=model,
        recipe=recipe,
        out=out,
        calibration=calibration,
        evaluation=evaluation,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        device=device,
    )
    if not world().is_main:
        return  # under torchrun: rank 0 saved the model and reports
    metrics = manifest["metrics"]
    if "compressed" in metrics:
        before, after = metrics["base"]["perplexity"], metrics["compressed"]["perplexity"]
        console.print(
            f"perplexity {before:.3f} → {after:.3f} ({after / before - 1:+.1%}), KL {metrics['compressed']['kl_divergence']:.4f}"
        )
        console.print(f"[dim]{metrics['compressed']['protocol']}[/dim]")
    storage = manifest["storage"]
    console.print(
        f"sparsity {metrics['sparsity']:.1%} · weights {storage['weight_bytes'] / 1e6:.1f} MB (base {metrics['base_dense_bytes'] / 1e6:.1f} MB)"
    )
    if "quantized_share_of_fp16" in storage:
        console.print(f"quantized linears take {storage['quantized_share_of_fp16']:.1%} of their fp16 bytes")
    for stage in manifest["stages"]:  # what each stage did (also in slimlm.json)
        if stage.get("details"):
            console.print(f"[dim]{stage['method']}: {_brief(stage['details'])}[/dim]", highlight=False)
    console.print(f"saved: {out}")
    if "export" in manifest:  # the recipe's export: key
        console.print(f"exported ({manifest['export']['format']}): {manifest['export']['path']}")


@app.command(name="eval")
def eval_(
    model: ModelArg,
    data: Annotated[
        str, typer.Option("--data", help="'default', a .txt/.jsonl file, 'wikitext2:DIR' or 'hf:NAME[:CONFIG]'.")
    ] = EVALUATION.data,
    split: Annotated[
        str,
        typer.Option(
            "--split", help="Split of --data: evaluation/calibration (default corpus), test/valid (WikiText-2)."
        ),
    ] = EVALUATION.split,
    seqlen: Seqlen = EVALUATION.seqlen,
    windows: Windows = EVALUATION.max_windows,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model to measure KL divergence and top-1 agreement against.")
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the results to this JSON file ('-': print them on stdout)."),
    ] = None,
    kv_bits: Annotated[
        int | None,
        typer.Option(
            "--kv-bits",
            help="Evaluate through a KIVI-quantized KV cache of 2, 4 or 8 bits (default: the model's own kv-cache setting, if any).",
        ),
    ] = None,
    kv_group_size: Annotated[
        int | None,
        typer.Option(
            "--kv-group-size",
            help="With --kv-bits: tokens per key group / channels per value group (default: the kv-cache stage's, see 'slimlm recipes kv4').",
        ),
    ] = None,
    kv_residual: Annotated[
        int | None,
        typer.Option(
            "--kv-residual",
            help="With --kv-bits: newest tokens kept in full precision, a multiple of the group (default: the kv-cache stage's).",
        ),
    ] = None,
    chunk_size: Annotated[
        int | None,
        typer.Option(
            "--chunk-size",
            help="Feed each window this many tokens at a time through the KV cache (with a quantized cache the default is 128 tokens; alone: a full-precision cache).",
        ),
    ] = None,
    tasks: Tasks = None,
    limit: TaskLimit = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --limit subset.")] = EVALUATION.task_seed,
    task_data: TaskData = None,
    perplexity: Annotated[
        bool | None,
        typer.Option(
            "--perplexity/--no-perplexity", help="Measure perplexity (default: yes, unless --tasks is given)."
        ),
    ] = None,
    speed: SpeedFlag = False,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="Compare engines: run the model in 'llama.cpp' (a .gguf) or 'transformers' and print one row: perplexity, KL and top-1 to --base, prompt/decode tok/s, peak RSS, file bytes.",
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option("--threads", help="With --engine or --draft: CPU threads for the evaluation and the speed runs."),
    ] = 2,
    draft: Annotated[
        str | None,
        typer.Option(
            "--draft",
            help="Measure speculative decoding instead: DRAFT (same tokenizer, e.g. a slimlm-compressed copy; a .gguf runs in llama.cpp when installed) drafts for MODEL in transformers; one row per k: identical to MODEL's greedy text (checked), acceptance, tokens per target forward, decode tok/s alone vs speculative.",
        ),
    ] = None,
    draft_tokens: Annotated[
        str | None,
        typer.Option(
            "--draft-tokens",
            help=f"With --draft: comma-separated k, tokens drafted per target forward (default {','.join(map(str, SPECULATIVE.draft_tokens))}).",
        ),
    ] = None,
    prompts: Annotated[
        int | None,
        typer.Option(
            "--prompts", help=f"With --draft: answer the first N fixed chat questions (default {SPECULATIVE.prompts})."
        ),
    ] = None,
    new_tokens: Annotated[
        int | None,
        typer.Option(
            "--new-tokens", help=f"With --draft: greedy tokens per answer at most (default {SPECULATIVE.new_tokens})."
        ),
    ] = None,
    acceptance: Annotated[
        bool | None,
        typer.Option(
            "--acceptance/--no-acceptance",
            help=f"With --base: also the greedy acceptance of MODEL drafting for BASE, a fidelity figure ({ACCEPTANCE.describe()}; default: yes, a few seconds).",
        ),
    ] = None,
    allow_pickle: AllowPickle = False,
    device: Device = None,
) -> None:
    """Perplexity (GPTQ protocol), KL/top-1 and draft acceptance against a base, zero-shot tasks (lm-eval's prompts
    and scoring), speed, parameters and bytes on disk of one model; with --engine, the same figures from llama.cpp
    or transformers; with --draft, speculative decoding measured (it combines with none of the quality options).

    [bold]Examples[/bold]

      slimlm eval smollm2-135m --windows 4
      slimlm eval smol-2of4 --data wikitext2:../shared/data/wikitext-2-raw --split test
      slimlm eval smol-w4 --base smollm2-135m --windows 4 --json smol-w4.json
      slimlm eval smollm2-135m --windows 2 --kv-bits 4    # KV cache in the loop, vs a full-precision cache
      slimlm eval smollm2-135m --tasks hellaswag,piqa,arc_easy,arc_challenge,lambada --limit 500
      slimlm eval smol-w4 --tasks piqa:../shared/data/piqa/valid.jsonl --speed
      slimlm eval smol-q4_0.gguf --engine llama.cpp --base smollm2-135m --windows 4 --threads 2 --json -
      slimlm eval smol-w4 --engine transformers --base smollm2-135m --windows 4   # the same row from transformers
      slimlm eval smollm2-135m --draft smol-w4 --draft-tokens 2,4 --prompts 2 --new-tokens 32 --json -
      slimlm eval smollm2-135m --draft smol-q4_0.gguf --draft-tokens 4,6   # a GGUF drafting in llama.cpp
    """
    from slimlm.api import evaluate
    from slimlm.progress import console
    from slimlm.quantize.kv_cache import KVCacheConfig

    speculative_flags = {"--draft-tokens": draft_tokens, "--prompts": prompts, "--new-tokens": new_tokens}
    if draft is not None:
        quality_flags = {
            "--base": base,
            "--engine": engine,
            "--kv-bits": kv_bits,
            "--kv-group-size": kv_group_size,
            "--kv-residual": kv_residual,
            "--chunk-size": chunk_size,
            "--tasks": tasks,
            "--limit": limit,
            "--task-data": task_data,
            "--windows": windows,
            "--perplexity/--no-perplexity": perplexity,
            "--acceptance/--no-acceptance": acceptance,
            "--speed": speed or None,
            "--data": None if data == EVALUATION.data else data,
            "--split": None if split == EVALUATION.split else split,
            "--seqlen": None if seqlen == EVALUATION.seqlen else seqlen,
            "--seed": None if seed == EVALUATION.task_seed else seed,
        }
        _eval_draft(
            model,
            draft,
            draft_tokens,
            prompts,
            new_tokens,
            [flag for flag, value in quality_flags.items() if value is not None],
            threads,
            allow_pickle,
            device,
            json_out,
        )
        return
    given = [flag for flag, value in speculative_flags.items() if value is not None]
    if given:
        raise SlimlmError(
            f"{given[0]} shapes the speculative-decoding measurement, but --draft is not given",
            "add --draft DRAFT, or drop it",
        )
    if acceptance is not None and (base is None or engine is not None):
        raise SlimlmError(
            "--acceptance/--no-acceptance is the draft acceptance of MODEL for --base",
            "add --base BASE (without --engine), or drop it",
        )
    kv_cache = None
    if kv_bits is not None:
        given = {"group_size": kv_group_size, "residual": kv_residual}
        kv_cache = KVCacheConfig(bits=kv_bits, **{key: value for key, value in given.items() if value is not None})
    elif kv_group_size is not None or kv_residual is not None:
        raise SlimlmError(
            "--kv-group-size and --kv-residual shape a quantized KV cache, but --kv-bits is not given",
            "add --kv-bits 2, 4 or 8",
        )
    settings = _build(
        EvalSettings,
        {**EVAL_FLAGS, "data": "--data"},
        data=data,
        split=split,
        seqlen=seqlen,
        max_windows=windows,
        kv_cache=kv_cache,
        chunk_size=chunk_size,
        **_task_settings(tasks, limit, seed, task_data, speed),
        perplexity=perplexity if perplexity is not None else not tasks,
    )
    if engine is not None:
        result = evaluate(
            model=model,
            evaluation=settings,
            base=base,
            allow_pickle=allow_pickle,
            device=device,
            engine=engine,
            threads=threads,
        )
        _print_engine_row(result)
        if json_out:
            _write_json(json_out, result)
        return
    result = evaluate(
        model=model,
        evaluation=settings,
        base=base,
        allow_pickle=allow_pickle,
        device=device,
        acceptance=ACCEPTANCE if acceptance is not False else None,
    )
    if "quality" in result:
        quality = result["quality"]
        line = f"perplexity {quality['perplexity']:.3f}"
        if quality["kl_divergence"] is not None:
            line += f" · KL {quality['kl_divergence']:.4f} · top-1 agreement {quality['top1_agreement']:.1%} (base ppl {result['base']['perplexity']:.3f})"
        for figure in result.get("draft_acceptance", []):
            line += f" · draft acceptance {figure['acceptance']:.1%} at k={figure['draft_tokens']} ({figure['accepted_per_round']:.2f} per target step)"
        console.print(line)
        console.print(f"[dim]{quality['protocol']}[/dim]")
    _print_tasks_and_speed(result)
    if "kv_cache" in result:
        kv = result["kv_cache"]
        console.print(
            f"KV cache at {kv['context_len']} tokens {kv['bytes'] / 1e6:.2f} MB ({kv['share_of_fp16']:.1%} of fp16 {kv['fp16_bytes'] / 1e6:.2f} MB)"
            f" · perplexity with a full-precision cache {kv['fp_cache_perplexity']:.3f} ({quality['perplexity'] / kv['fp_cache_perplexity'] - 1:+.2%})"
        )
    console.print(f"parameters {result['parameters'] / 1e6:.1f}M · sparsity {result['sparsity']:.1%}")
    if "storage" in result:
        console.print(f"weights on disk {result['storage']['weight_bytes'] / 1e6:.1f} MB")
    if json_out:
        _write_json(json_out, result)


def _eval_draft(
    model: str,
    draft: str,
    draft_tokens: str | None,
    prompts: int | None,
    new_tokens: int | None,
    refused: list[str],
    threads: int,
    allow_pickle: bool,
    device: str | None,
    json_out: Path | None,
) -> None:
    """`slimlm eval MODEL --draft DRAFT`: the speculative-decoding table (`slimlm.evaluate.speculative`)."""
    from rich.table import Table

    from slimlm.api import evaluate
    from slimlm.evaluate.speculative import SpeculativeSettings, describe, table_rows
    from slimlm.progress import console

    if refused:
        raise SlimlmError(
            f"--draft measures speculative decoding and does not combine with {', '.join(refused)}",
            "drop them, or drop --draft for the quality evaluation",
        )
    ks = SPECULATIVE.draft_tokens
    if draft_tokens is not None:
        try:
            ks = tuple(int(k) for k in draft_tokens.split(","))
        except ValueError:
            raise SlimlmError(
                f"--draft-tokens {draft_tokens!r} is not a comma-separated list of whole numbers",
                "pass e.g. --draft-tokens 2,4",
            ) from None
        if any(k < 1 for k in ks):
            raise SlimlmError(
                f"--draft-tokens {draft_tokens}: each k must be at least 1", "pass e.g. --draft-tokens 2,4"
            )
    flags = {"draft_tokens": "--draft-tokens", "prompts": "--prompts", "new_tokens": "--new-tokens"}
    given = {"draft_tokens": ks, "prompts": prompts, "new_tokens": new_tokens}
    settings = _build(SpeculativeSettings, flags, **{key: value for key, value in given.items() if value is not None})
    result = evaluate(
        model=model, draft=draft, speculative=settings, threads=threads, allow_pickle=allow_pickle, device=device
    )
    headers, rows = table_rows(result)
    table = Table(title=f"speculative decoding: {draft} drafting for {model} (greedy)")
    for header in headers:
        table.add_column(header, justify="left" if header == "draft" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"[dim]{describe(result)}[/dim]")
    if json_out:
        _write_json(json_out, result)
    if not all(row["identical"] for row in result["rows"] if row["draft"] is not None):  # the method's guarantee failed
        console.print(
            "[bold red]error:[/bold red] the speculative answers differ from the target's own greedy answers (see 'identical to target')"
        )
        raise typer.Exit(1)


@app.command()
def sensitivity(
    model: ModelArg,
    method: Annotated[
        str,
        typer.Option(
            "--method", help="Per-layer method each linear is compressed with, alone (rtn, gptq, magnitude, ...)."
        ),
    ] = "rtn",
    bits: Annotated[int, typer.Option("--bits", help="Bits (quantization methods).")] = 4,
    group_size: Annotated[
        int, typer.Option("--group-size", help="Input channels per scale; 0 = one scale per output channel.")
    ] = 64,
    symmetric: Annotated[
        bool | None,
        typer.Option(
            "--symmetric/--asymmetric",
            help="Symmetric grid, or an integer zero point per group (default: the method's).",
        ),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option("--sparsity", help="Sparsity (pruning methods; then --bits/--group-size are ignored)."),
    ] = None,
    targets: Annotated[str | None, typer.Option("--targets", help="Regex: measure only these linears.")] = None,
    data: Annotated[
        str, typer.Option("--data", help="'default', a .txt/.jsonl file, 'wikitext2:DIR' or 'hf:NAME[:CONFIG]'.")
    ] = SENSITIVITY_EVALUATION.data,
    split: Annotated[
        str,
        typer.Option(
            "--split", help="Split of --data: evaluation/calibration (default corpus), test/valid (WikiText-2)."
        ),
    ] = SENSITIVITY_EVALUATION.split,
    seqlen: Seqlen = SENSITIVITY_EVALUATION.seqlen,
    windows: Annotated[
        int, typer.Option("--windows", help="Windows the KL is measured on (one forward pass each, per layer).")
    ] = SENSITIVITY_EVALUATION.max_windows,
    calib_data: CalibData = SENSITIVITY_CALIBRATION.data,
    calib_samples: CalibSamples = SENSITIVITY_CALIBRATION.samples,
    calib_seqlen: CalibSeqlen = SENSITIVITY_CALIBRATION.seqlen,
    top: Annotated[int, typer.Option("--top", help="Rows to print (the JSON has all).")] = 20,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the full table to this JSON file ('-': print it on stdout)."),
    ] = None,
    allow_pickle: AllowPickle = False,
    device: Device = None,
) -> None:
    """Rank the linears by how much the model's predictions move (KL to the base) when each alone is compressed.

    Use it to choose which layers get more bits in a mixed-precision recipe ('targets' / 'exclude').

    [bold]Examples[/bold]

      slimlm sensitivity smollm2-135m --method rtn --bits 4 --group-size 64 --windows 2 --seqlen 512
      slimlm sensitivity smollm2-135m --bits 3 --asymmetric --targets mlp --json sens.json
      slimlm sensitivity smollm2-135m --method magnitude --sparsity 0.5
    """
    from rich.table import Table

    from slimlm.api import sensitivity as measure
    from slimlm.progress import console

    stage: dict = {"method": method}
    if sparsity is not None:
        stage["sparsity"] = sparsity
    else:
        stage.update(bits=bits, group_size=group_size or None)
    if symmetric is not None:
        stage["symmetric"] = symmetric
    if targets is not None:
        stage["targets"] = targets
    evaluation = _build(
        EvalSettings,
        {**EVAL_FLAGS, "data": "--data"},
        data=data,
        split=split,
        seqlen=seqlen,
        max_windows=windows,
        kl_windows=windows,
    )
    calibration = _calibration(calib_data, calib_samples, calib_seqlen, SENSITIVITY_CALIBRATION.seed)
    table = measure(
        model=model,
        stage=stage,
        evaluation=evaluation,
        calibration=calibration,
        allow_pickle=allow_pickle,
        device=device,
    )
    shown = Table(
        title=f"sensitivity: {', '.join(f'{k}={v}' for k, v in stage.items())} · base perplexity {table.base_perplexity:.3f}"
    )
    for column in ("rank", "layer", "KL", "top-1", "perplexity"):
        shown.add_column(column, justify="left" if column == "layer" else "right")
    for rank, row in enumerate(table.layers[:top], 1):
        shown.add_row(
            str(rank), row.name, f"{row.kl_divergence:.5f}", f"{row.top1_agreement:.1%}", f"{row.perplexity:.3f}"
        )
    console.print(shown)
    console.print(
        "mean KL by projection: " + " · ".join(f"{name} {kl:.5f}" for name, kl in table.by_projection().items())
    )
    console.print(f"[dim]{table.protocol}[/dim]")
    if json_out:
        _write_json(json_out, table.to_dict())


@app.command()
def export(
    model: ModelArg,
    format: Annotated[
        str,
        typer.Option("--format", "-f", help="hf (dense), compressed-tensors (transformers, vLLM) or gguf (llama.cpp)."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output directory (hf, compressed-tensors) or .gguf file; written atomically."
        ),
    ],
    gguf_type: Annotated[
        str,
        typer.Option(
            "--gguf-type",
            help="auto (keep the model's 4/8-bit codes, else f16), f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k.",
        ),
    ] = "auto",
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="llama.cpp's per-tensor mix: q4_0 q4_1 q5_0 q5_1 q8_0 q4_k_m q5_k_m q6_k (shape fallbacks resolved and listed).",
        ),
    ] = None,
    tensor_type: Annotated[
        list[str] | None,
        typer.Option(
            "--tensor-type",
            help="REGEX=TYPE over GGUF tensor names, e.g. 'blk\\.\\d+\\.ffn_down\\.weight=q6_k' (repeatable; first match wins).",
        ),
    ] = None,
    embedding_type: Annotated[str | None, typer.Option("--embedding-type", help="Type of token_embd.weight.")] = None,
    output_type: Annotated[
        str | None, typer.Option("--output-type", help="Type of output.weight (of token_embd.weight when tied).")
    ] = None,
    gguf_method: Annotated[
        str,
        typer.Option(
            "--gguf-method",
            help="rtn (no data), imatrix (importance-weighted rounding from calibration), gptq (GPTQ on each type's grid; imatrix for the embedding/output).",
        ),
    ] = "rtn",
    calib_data: CalibData = RUN_CALIBRATION.data,
    calib_samples: CalibSamples = RUN_CALIBRATION.samples,
    calib_seqlen: CalibSeqlen = RUN_CALIBRATION.seqlen,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the result and per-tensor table to this JSON file ('-': stdout)."),
    ] = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Export a model to an engine format: GGUF for llama.cpp, compressed-tensors for transformers/vLLM, plain HF.

    GGUF keeps the codes a slimlm quantizer chose when a block format holds them (int4 group 32k -> Q4_0/Q4_1,
    int8 -> Q8_0); dense weights are quantized by slimlm's packers (Q4_K/Q5_K/Q6_K too), with --gguf-method gptq
    by GPTQ on each tensor's own grid. Presets and --tensor-type follow llama-quantize; the per-tensor table says
    which type each tensor got and why.

    [bold]Examples[/bold]

      slimlm export smol-w4 --format gguf --out smol-w4.gguf          # int4 g64 asym -> Q4_1, codes kept
      slimlm export smollm2-135m --format gguf --preset q4_k_m --gguf-method gptq --out smol-q4_k_m.gguf
      slimlm export smollm2-135m --format gguf --preset q4_0 --tensor-type 'attn_v=q8_0' --out smol.gguf
      slimlm export smol-2of4 --format compressed-tensors --out smol-2of4-ct
    """
    from slimlm.api import export as export_job
    from slimlm.export import GGUFOptions
    from slimlm.progress import console

    calibration = _calibration(calib_data, calib_samples, calib_seqlen, RUN_CALIBRATION.seed)
    options = GGUFOptions(
        preset=preset,
        tensor_types=tuple(tensor_type or ()),
        embedding_type=embedding_type,
        output_type=output_type,
        method=gguf_method,
        calibration=calibration,
    )
    result = export_job(
        model=model,
        format=format,
        out=out,
        gguf_type=gguf_type,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        gguf=options,
    )
    size = f"{result['bytes'] / 1e6:.1f} MB"
    if format == "gguf":
        from rich.table import Table

        if not options.default:
            shown = Table(title=f"GGUF tensors ({result.get('preset') or result['gguf_type']}, {result.get('method')})")
            for column in ("tensor", "shape", "type", "bytes", "why"):
                shown.add_column(column, justify="right" if column == "bytes" else "left")
            for row in result["tensors"]:
                if len(row["shape"]) > 1:
                    shown.add_row(
                        row["name"], "×".join(map(str, row["shape"])), row["type"], f"{row['bytes']:,}", row["why"]
                    )
            console.print(shown)
        types = ", ".join(f"{kind} ×{count}" for kind, count in sorted(result["tensor_types"].items()))
        console.print(f"GGUF {result.get('preset') or result['gguf_type']} · {size} · tensors {types}")
        console.print(
            f"codes kept {result['codes_kept']} · re-quantized {result['requantized']} · dequantized {result['dequantized']}"
            + (f" · GPTQ {result['gptq_tensors']}" if result.get("gptq_tensors") else "")
        )
        if result["fallbacks"]:
            console.print(f"written as F16 (rows not a multiple of 32): {', '.join(result['fallbacks'])}")
    else:
        console.print(f"{format} · weights {size} · quantized linears {result['quantized_linears']}")
    console.print(f"saved: {out}")
    if json_out:
        _write_json(json_out, result)


def _brief(details: dict) -> str:
    """A stage's record on one line: a loss curve as first → last, long lists cut."""
    parts = []
    for key, value in details.items():
        if key == "losses" and value:
            parts.append(f"loss {value[0]:.4f} → {value[-1]:.4f} over {len(value)} steps")
        elif key in ("evaluations",) or value in (None, [], 0):
            continue
        elif isinstance(value, list) and len(value) > 8:
            parts.append(f"{key} [{', '.join(map(str, value[:8]))}, … ({len(value)})]")
        else:
            parts.append(f"{key} {value}")
    return " · ".join(parts)


def _write_json(path: Path, data: object) -> None:
    """The machine-readable output of a verb: to the file `path`, or to stdout for '-' (the table went to stderr)."""
    text = json.dumps(data, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        path.write_text(text)


def _task_settings(tasks: str | None, limit: int | None, seed: int, task_data: Path | None, speed: bool) -> dict:
    """EvalSettings fields for zero-shot tasks and speed, from the CLI options."""
    from slimlm.evaluate.speed import SpeedSettings

    names = tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks else ()
    if tasks is not None and not names:
        from slimlm.evaluate.tasks import TASKS

        raise SlimlmError("--tasks names no task", f"known tasks: {', '.join(TASKS)}")
    return {
        "tasks": names,
        "task_limit": limit,
        "task_seed": seed,
        "task_data": str(task_data) if task_data else None,
        "speed": SpeedSettings() if speed else None,
    }


def _print_tasks_and_speed(result: dict) -> None:
    from rich.table import Table

    from slimlm.progress import console

    if result.get("tasks"):
        table = Table(title="zero-shot (lm-eval 0.4 prompts and scoring)")
        for header in ("task", "metric", "value", "± stderr", "examples", "ex/s"):
            table.add_column(header, justify="left" if header in ("task", "metric") else "right")
        for name, task in result["tasks"].items():
            for metric, value in task["metrics"].items():
                stderr = task["stderr"].get(metric)
                shown = f"{value:.2f}" if metric in ("perplexity", "likelihood_diff") else f"{value:.2%}"
                error = (
                    "—"
                    if stderr is None
                    else (f"{stderr:.2f}" if metric in ("perplexity", "likelihood_diff") else f"{stderr:.2%}")
                )
                table.add_row(
                    name, metric, shown, error, f"{task['examples']}/{task['total']}", f"{task['examples_per_s']:.1f}"
                )
        console.print(table)
        for task in result["tasks"].values():
            console.print(f"[dim]{task['task']}: {task['protocol']}[/dim]")
    if result.get("speed"):
        speed = result["speed"]
        batches = " · ".join(f"batch {b}: {v:.1f} tok/s" for b, v in speed["throughput_tokens_per_s"].items())
        console.print(
            f"speed on {speed['device']}: TTFT {speed['ttft_ms']:.1f} ms ({speed['prompt_tokens']}-token prompt) · TPOT {speed['tpot_ms']:.2f} ms · {batches}"
        )
        energy = speed["energy_joules_per_token"]
        console.print(
            f"peak RSS {speed['cpu_peak_rss_mb']:.0f} MB ({speed['cpu_peak_scope']})"
            + (f" · CUDA {speed['cuda_max_allocated_mb']:.0f} MB" if speed["cuda_max_allocated_mb"] is not None else "")
            + (f" · energy {energy:.4f} J/token" if energy is not None else "")
            + f" · energy meter: {speed['energy_meter']}"
        )


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A directory written by `slimlm run` (holds report.json).")],
) -> None:
    """Re-render a run's report: Markdown, a self-contained HTML page with the plots, and the PNGs.

    [bold]Examples[/bold]

      slimlm report slimlm-runs/20250101-120000
    """
    from slimlm.progress import console
    from slimlm.report import report_run_dir

    written = report_run_dir(run_dir)
    console.print("report: " + "  ·  ".join(str(path) for path in written.values()))


@app.command()
def recipes(
    name: Annotated[str | None, typer.Argument(help="Show this recipe's stages.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the recipes and methods (or the one recipe) as JSON on stdout.")
    ] = False,
) -> None:
    """List the shipped recipes and the methods their stages use, or show one recipe.

    [bold]Examples[/bold]

      slimlm recipes
      slimlm recipes magnitude-2of4
      slimlm recipes --json
    """
    from slimlm.recipes import load_recipe, recipe_outline, shipped_recipes
    from slimlm.recipes.registry import METHODS

    if name:
        recipe = load_recipe(name)  # builds (and so validates) every stage
        if as_json:
            print(
                json.dumps(
                    {"name": recipe.name, "description": recipe.description, "stages": recipe.to_list()}, indent=2
                )
            )
            return
        from slimlm.progress import console

        console.print(f"[bold]{recipe.name}[/bold]: {recipe.description}")
        for index, stage in enumerate(recipe.to_list(), 1):
            console.print(f"  {index}. " + ", ".join(f"{k}={v}" for k, v in stage.items()))
        return
    outlines = {recipe_name: recipe_outline(path) for recipe_name, path in shipped_recipes().items()}
    methods = {method_name: METHODS.summary(method_name) for method_name in sorted(METHODS)}
    if as_json:
        shipped = [{"name": n, "stages": stages, "description": d} for n, (d, stages) in outlines.items()]
        print(json.dumps({"recipes": shipped, "methods": methods}, indent=2))
        return
    from rich.table import Table

    from slimlm.progress import console

    table = Table(title="shipped recipes")
    table.add_column("name")
    table.add_column("stages")
    table.add_column("description")
    for recipe_name, (description, stages) in outlines.items():
        table.add_row(recipe_name, " → ".join(stages), description)
    console.print(table)
    shown = Table(title="methods a recipe stage can use")
    shown.add_column("method")
    shown.add_column("what it does")
    for method_name, summary in methods.items():
        shown.add_row(method_name, summary)
    console.print(shown)


SEARCH_FLAGS = {"threads": "--threads", "min_decode_tps": "--min-decode-tps", "max_kl": "--max-kl"}


def _constraints(file: Path | None, **flags: object) -> Constraints:
    """Constraints from a YAML file (any of max_size, max_ram, min_decode_tps, threads, max_kl), flags on top."""
    import yaml

    values: dict = {}
    if file is not None:
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise SlimlmError(
                f"--constraints {file}: cannot read it as YAML ({err})", "pass a YAML file such as 'max_size: 92MB'"
            ) from None
        known = {f.name for f in dataclasses.fields(Constraints)}
        unknown = sorted(set(values) - known)
        if not isinstance(values, dict) or unknown:
            raise SlimlmError(
                f"--constraints {file}: unknown keys {unknown}", f"use some of: {', '.join(sorted(known))}"
            )
        values = {k: str(v) if k in ("max_size", "max_ram") else v for k, v in values.items()}
    values.update({k: v for k, v in flags.items() if v is not None})
    return _build(Constraints, SEARCH_FLAGS, **values)


@app.command()
def search(
    model: Annotated[str, typer.Argument(help="Alias, directory, .gguf or hub id.")] = DEFAULT_MODEL,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory for model.gguf, recipe.yaml, front.json, plots and report.html (default: slimlm-runs/search-<timestamp>).",
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="Format the artifact is searched for: gguf (DIR/model.gguf, llama.cpp) or compressed-tensors (DIR is the checkpoint: transformers + compressed-tensors, vLLM; --max-size counts model.safetensors).",
        ),
    ] = SEARCH.target,
    max_size: Annotated[
        str | None,
        typer.Option(
            "--max-size",
            help="Largest file: 92MB, 87.5MiB, or a llama.cpp preset name (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k_m, q5_k_m, q6_k) for its size on this model.",
        ),
    ] = None,
    max_ram: Annotated[
        str | None, typer.Option("--max-ram", help="Largest peak RAM of llama.cpp running the file (needs llama.cpp).")
    ] = None,
    min_decode_tps: Annotated[
        float | None,
        typer.Option(
            "--min-decode-tps",
            help="Slowest acceptable decode, tokens/s in llama.cpp on this machine (needs llama.cpp).",
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", help="llama.cpp threads for --min-decode-tps.")
    ] = Constraints.threads,
    max_kl: Annotated[
        float | None,
        typer.Option("--max-kl", help="Largest mean KL to the base (nats per token, held-out calibration windows)."),
    ] = None,
    constraints_file: Annotated[
        Path | None,
        typer.Option(
            "--constraints",
            help="YAML file with any of max_size, max_ram, min_decode_tps, threads, max_kl (flags override it).",
        ),
    ] = None,
    database: Annotated[
        Path | None,
        typer.Option(
            "--database",
            help="Directory of the variant database (default: $SLIMLM_CACHE or ~/.cache/slimlm, per model and calibration); reused across budgets and resumed when interrupted.",
        ),
    ] = None,
    types: Annotated[
        str | None,
        typer.Option(
            "--types",
            help=f"Block-linear types to search, comma-separated, or 'all'. GGUF default: {','.join(SEARCH.types)} (--fast: {','.join(FAST_SEARCH.types)}); compressed-tensors: {','.join(CT_SEARCH_TYPES)} (--fast: {','.join(FAST_CT_SEARCH_TYPES)}; '-asym' types, e.g. int4-g32-asym, only when named).",
        ),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="gptq (error feedback on the type's grid), ref (llama.cpp's reference rounding), rtn (importance-weighted rounding, slower).",
        ),
    ] = ",".join(SEARCH.methods),
    generations: Annotated[
        int | None,
        typer.Option(
            "--generations",
            help=f"Re-ranking generations at the chosen budget (0: the best seed by true KL, no mutations; default {SEARCH.generations}, --fast {FAST_SEARCH.generations}).",
        ),
    ] = None,
    front_generations: Annotated[
        int | None,
        typer.Option(
            "--front-generations",
            help=f"Re-ranking generations at each other budget of the front (default {SEARCH.front_generations}, --fast {FAST_SEARCH.front_generations}).",
        ),
    ] = None,
    depth_candidates: Annotated[
        int | None,
        typer.Option(
            "--depth-candidates",
            help=f"Blocks that may be removed whole (0: none; default {SEARCH.depth_candidates}, --fast {FAST_SEARCH.depth_candidates}).",
        ),
    ] = None,
    speed_rounds: Annotated[
        int | None,
        typer.Option(
            "--speed-rounds",
            help=f"Rounds of every point's decode timed side by side in llama.cpp, for the quality-against-speed plot (0: not timed; default {SEARCH.speed_rounds}, --fast {FAST_SEARCH.speed_rounds}).",
        ),
    ] = None,
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help=f"Fewer types ({','.join(FAST_SEARCH.types)}), smaller statistics ({FAST_SEARCH.statistics.samples} windows), the seeds scored by true KL with {FAST_SEARCH.generations} re-ranking generations, held-out evaluation on {FAST_SEARCH_EVALUATION.max_windows} windows: about a third of the time.",
        ),
    ] = False,
    eval_data: EvalData = SEARCH_EVALUATION.data,
    windows: Annotated[int | None, typer.Option("--windows", help="Held-out evaluation windows per point.")] = None,
    calib_data: CalibData = SEARCH.statistics.data,
    calib_samples: Annotated[
        int | None, typer.Option("--calib-samples", help="Windows for the statistics pass (Hessians, Fishers, GPTQ).")
    ] = None,
    calib_seqlen: Annotated[
        int | None, typer.Option("--calib-seqlen", help="Tokens per statistics and re-ranking window.")
    ] = None,
    seqlen: Annotated[int | None, typer.Option("--seqlen", help="Tokens per held-out evaluation window.")] = None,
    as_json: Annotated[
        Path | None, typer.Option("--json", help="Write the front as JSON to this file ('-': stdout).")
    ] = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    device: Device = None,
) -> None:
    """Find the best deployable file under your constraints, with the measured front of size against quality.

    [bold]Examples[/bold]

      slimlm search --max-size 92MB --out smol-92                # SmolLM2-135M, best GGUF within 92 MB
      slimlm search smollm2-135m --max-size q4_k_m --out smol-q4km
      slimlm search MODEL_DIR --max-size 75MB --min-decode-tps 100 --threads 2 --out small   # needs llama.cpp
      slimlm search --constraints phone.yaml --database ~/.cache/slimlm-db --out phone
    """
    from slimlm.api import search as search_job

    constraints = _constraints(
        constraints_file,
        max_size=max_size,
        max_ram=max_ram,
        min_decode_tps=min_decode_tps,
        threads=threads if threads != Constraints.threads else None,
        max_kl=max_kl,
    )
    if (
        constraints.max_size is None
        and constraints.min_decode_tps is None
        and constraints.max_ram is None
        and target == "gguf"
    ):
        constraints = dataclasses.replace(constraints, max_size=DEFAULT_CONSTRAINTS.max_size)
    preset = FAST_SEARCH if fast else SEARCH
    chosen = {
        "statistics": _calibration(
            calib_data,
            calib_samples or preset.statistics.samples,
            calib_seqlen or preset.statistics.seqlen,
            preset.statistics.seed,
        ),
        "target": target,
        "types": None if types == "all" else tuple(t.strip() for t in types.split(",")) if types else preset.types,
        "methods": tuple(m.strip() for m in methods.split(",") if m.strip()),
        "generations": generations,
        "front_generations": front_generations,
        "depth_candidates": depth_candidates,
        "speed_rounds": speed_rounds,
    }
    values = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)} | {
        k: v for k, v in chosen.items() if v is not None or k == "types"
    }
    settings = _build(
        SearchSettings,
        {
            "generations": "--generations",
            "front_generations": "--front-generations",
            "depth_candidates": "--depth-candidates",
            "speed_rounds": "--speed-rounds",
        },
        **values,
    )
    shape = FAST_SEARCH_EVALUATION if fast else SEARCH_EVALUATION
    evaluation = _settings(
        eval_data, shape.split, seqlen or shape.seqlen, windows or shape.max_windows, windows or shape.kl_windows
    )
    result = search_job(
        model=model,
        out_dir=out,
        constraints=constraints,
        settings=settings,
        evaluation=evaluation,
        database=database,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        device=device,
    )
    _print_search(result, as_json)


def _print_search(result, as_json: Path | None) -> None:
    from slimlm.progress import console
    from slimlm.search.report import print_table

    data = json.loads((result.out / "front.json").read_text())
    if as_json is not None:
        _write_json(as_json, data)
    if str(as_json) != "-":
        print_table(data)
        chosen = result.chosen
        artifact = result.out / "model.gguf" if result.context.get("target", "gguf") == "gguf" else result.out
        console.print(
            f"chosen: [bold]{chosen.name}[/bold] -> {artifact} ({chosen.file_bytes / 1e6:.2f} MB); report: {result.out / 'report.html'}"
        )


def _print_engine_row(result: dict) -> None:
    """`slimlm eval --engine`: the base and the model as rows of one table, the columns every engine fills."""
    from rich.table import Table

    from slimlm.progress import console

    quality, speed = result["quality"], result["speed"]
    table = Table(title=f"{result['model']} in {result['engine']} ({result['threads']} threads)")
    for header in (
        "model",
        "engine",
        "file MB",
        "perplexity",
        "KL to base",
        "top-1",
        "prompt tok/s",
        "decode tok/s",
        "peak RSS MB",
    ):
        table.add_column(header, justify="left" if header in ("model", "engine") else "right")
    if "base" in result:
        table.add_row(
            result["base"]["model"],
            result["base"]["engine"],
            "",
            f"{result['base']['quality']['perplexity']:.3f}",
            "—",
            "—",
            "",
            "",
            "",
        )
    kl = "—" if quality["kl_divergence"] is None else f"{quality['kl_divergence']:.5f}"
    top1 = "—" if quality["top1_agreement"] is None else f"{quality['top1_agreement']:.1%}"
    size = "—" if result["file_bytes"] is None else f"{result['file_bytes'] / 1e6:.1f}"
    table.add_row(
        result["model"],
        result["engine"],
        size,
        f"{quality['perplexity']:.3f}",
        kl,
        top1,
        f"{speed['prefill_tokens_per_s']:.0f}",
        f"{speed['decode_tokens_per_s']:.1f}",
        f"{speed['peak_rss_bytes'] / 2**20:.0f}",
    )
    console.print(table)
    console.print(f"[dim]{quality['protocol']}[/dim]")
    console.print(
        f"[dim]speed: batch 1, {speed['prompt_tokens']}-token random prompt then {speed['new_tokens']} greedy tokens, "
        f"median of {speed['repeats']} after a warm-up; load average {speed['load']} when it started[/dim]"
    )


# --- chat and serve (slimlm/serve) ------------------------------------------------------------------------------

from slimlm.serve.sampling import SamplingSettings as _Sampling  # noqa: E402 - torch-free, the flags' defaults
from slimlm.serve.settings import DEFAULT_HOST, DEFAULT_PORT, DRAFT_TOKENS  # noqa: E402

SAMPLING = _Sampling()
Engine = Annotated[
    str,
    typer.Option(
        "--engine",
        help="auto: llama.cpp for .gguf files when llama-cpp-python is installed (pip install 'slimlm\\[engines]'), else transformers; or force transformers / llama.cpp.",
    ),
]
Draft = Annotated[
    str | None,
    typer.Option(
        "--draft",
        help="Speculative decoding: this model (same tokenizer, e.g. a slimlm-compressed copy) drafts tokens the target verifies in transformers; greedy output is the target's own. A .gguf draft runs in llama.cpp when llama-cpp-python is installed (unless --engine transformers), the draft that speeds decoding up on CPU.",
    ),
]
DraftTokens = Annotated[int, typer.Option("--draft-tokens", help="Tokens the draft proposes per target forward.")]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        "-t",
        help="CPU threads (llama.cpp default: every core, as llama-cli; transformers: torch's default).",
    ),
]
KVBits = Annotated[
    int | None,
    typer.Option(
        "--kv-bits", help="Generate through slimlm's KIVI-quantized KV cache of 2, 4 or 8 bits (transformers engine)."
    ),
]


def _sampling(
    temp: float, top_k: int, top_p: float, min_p: float, n_predict: int, seed: int, stop: list[str] | None
) -> _Sampling:
    flags = {
        "temp": "--temp",
        "top_k": "--top-k",
        "top_p": "--top-p",
        "min_p": "--min-p",
        "max_tokens": "-n",
        "seed": "--seed",
        "stop": "--stop",
    }
    stops = tuple(s.encode().decode("unicode_escape") for s in stop or ())  # "\n" typed on a shell means a newline
    return _build(
        _Sampling, flags, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, max_tokens=n_predict, seed=seed, stop=stops
    )


def _load_for_chat(
    model: str,
    engine: str,
    kv_bits: int | None,
    draft: str | None,
    draft_tokens: int,
    device: str | None,
    threads: int | None,
    logits: bool = False,
    reuse_prompt: bool = True,
):
    from slimlm.progress import stage
    from slimlm.serve.backends import load_backend

    if draft_tokens < 1:
        raise SlimlmError(
            f"--draft-tokens {draft_tokens}: must be at least 1", f"pass e.g. --draft-tokens {DRAFT_TOKENS}"
        )
    with stage(f"loading {model}" + (f" (draft {draft})" if draft else "")):
        return load_backend(
            model,
            engine=engine,
            kv_bits=kv_bits,
            draft=draft,
            draft_tokens=draft_tokens,
            device=device,
            logits=logits,
            threads=threads,
            reuse_prompt=reuse_prompt,
        )


@app.command()
def chat(
    model: ModelArg,
    system: Annotated[str | None, typer.Option("--system", "-sys", help="System prompt (chat models).")] = None,
    temp: Annotated[float, typer.Option("--temp", help="Temperature; 0 is greedy.")] = SAMPLING.temp,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the k likeliest tokens (0: off).")] = SAMPLING.top_k,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Keep the smallest set of tokens holding this probability (1: off).")
    ] = SAMPLING.top_p,
    min_p: Annotated[
        float, typer.Option("--min-p", help="Drop tokens below min_p × the top token's probability (0: off).")
    ] = SAMPLING.min_p,
    n_predict: Annotated[
        int, typer.Option("-n", "--n-predict", help="Most tokens per answer (-1: until end of turn or context).")
    ] = SAMPLING.max_tokens,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (-1: random).")] = SAMPLING.seed,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="End the answer before this string (repeatable; \\n for a newline)."),
    ] = None,
    kv_bits: KVBits = None,
    draft: Draft = None,
    draft_tokens: DraftTokens = DRAFT_TOKENS,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="A second model (same tokenizer) answering the same prompts side by side, with where greedy decoding parts and the KL per token.",
        ),
    ] = None,
    engine: Engine = "auto",
    threads: Threads = None,
    device: Device = None,
) -> None:
    """Talk to a model in the terminal: its own chat template, streaming, TTFT and tok/s after each answer.
    Sampling flags are llama.cpp's (names and defaults). A base model without a template continues each line.

    [bold]Examples[/bold]

      slimlm chat smollm2-135m                                  # the built-in GGUF (llama.cpp when installed)
      slimlm chat smol-w4 --system "You are terse." --temp 0    # a slimlm-compressed directory
      slimlm chat smol.gguf -n 128 --stop "\\n\\n"
      slimlm chat smollm2-135m --draft smol-q4_0.gguf --temp 0   # speculative: a GGUF drafts in llama.cpp, acceptance shown
      slimlm chat smollm2-135m --compare smol-w4 --temp 0       # base and compressed side by side, KL per token
    """
    from slimlm.serve.chat import run_chat

    settings = _sampling(temp, top_k, top_p, min_p, n_predict, seed, stop)
    backend = _load_for_chat(model, engine, kv_bits, draft, draft_tokens, device, threads, logits=compare is not None)
    other = (
        _load_for_chat(compare, engine, kv_bits, None, draft_tokens, device, threads, logits=True) if compare else None
    )
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    run_chat(backend, settings, system=system, compare=other)


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (localhost only by default; 0.0.0.0 for every interface)."),
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1 routes.", envvar="SLIMLM_API_KEY"),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Model id the API reports (default: the MODEL argument).")
    ] = None,
    kv_bits: KVBits = None,
    draft: Draft = None,
    draft_tokens: DraftTokens = DRAFT_TOKENS,
    engine: Engine = "auto",
    threads: Threads = None,
    device: Device = None,
) -> None:
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions (stream: true as server-sent events),
    /v1/models, /health. Requests are served one at a time in arrival order.

    [bold]Examples[/bold]

      slimlm serve smollm2-135m                        # http://127.0.0.1:8080/v1
      slimlm serve smol-w4 --port 8081 --api-key secret
      slimlm serve smollm2-135m --draft smol-q4_0.gguf  # speculative decoding; timings carry draft_n_accepted
      (then: OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none").chat.completions.create(...))
    """
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "psutil") if importlib.util.find_spec(name) is None]
    if missing:
        raise SlimlmError(f"slimlm serve needs {', '.join(missing)}", "pip install 'slimlm[serve]'")
    from slimlm.progress import console
    from slimlm.serve.server import port_holder
    from slimlm.serve.server import serve as run_server

    if not 0 < port < 65536:
        raise SlimlmError(f"--port {port}: not a TCP port", f"pass e.g. --port {DEFAULT_PORT}")
    holder = port_holder(host, port)  # before the model loads: say it at once
    if holder is not None:
        raise SlimlmError(
            f"port {port} on {host} is already in use by {holder}",
            f"stop that process or pass another --port (e.g. --port {port + 1})",
        )
    backend = _load_for_chat(
        model, engine, kv_bits, draft, draft_tokens, device, threads, reuse_prompt=False
    )  # answers independent of earlier requests
    console.print(f"[dim]{backend.description}[/dim]", highlight=False)
    console.print(
        f"serving {name or model} on http://{host}:{port}/v1 (Ctrl-C stops)"
        + (" · API key required" if api_key else ""),
        highlight=False,
    )
    run_server(backend, name or model, host=host, port=port, api_key=api_key)


# --- finetune (slimlm.finetune) -----------------------------------------------------------------------------------


def _finetune_defaults():
    from slimlm.finetune.settings import FinetuneSettings

    return FinetuneSettings()


FINETUNE = _finetune_defaults()


@app.command()
def finetune(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help='Training data: a .txt file, a .jsonl of {"text"} or chat {"messages"} rows (loss on the answers), or wikitext2:DIR / hf:NAME.',
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory: peft adapter + finetune.json (written atomically).")
    ],
    method: Annotated[
        str, typer.Option("--method", help="lora, dora, prompt-tuning, adaption-prompt (LLaMA-Adapter) or full.")
    ] = FINETUNE.method,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data",
            help="Held-out text (its evaluation split, GPTQ-protocol windows); default: --heldout of --data.",
        ),
    ] = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA/DoRA rank.")] = FINETUNE.rank,
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="LoRA/DoRA alpha (default 2 x rank).")
    ] = FINETUNE.alpha,
    targets: Annotated[
        str | None, typer.Option("--targets", help="LoRA/DoRA: regex over block linear names (default: all).")
    ] = FINETUNE.targets,
    virtual_tokens: Annotated[
        int, typer.Option("--virtual-tokens", help="Prompt tuning: soft-prompt length.")
    ] = FINETUNE.virtual_tokens,
    adapter_len: Annotated[
        int, typer.Option("--adapter-len", help="Adaption prompt: prompt tokens per adapted layer.")
    ] = FINETUNE.adapter_len,
    adapter_layers: Annotated[
        int | None, typer.Option("--adapter-layers", help="Adaption prompt: adapt the top N layers (default: all).")
    ] = FINETUNE.adapter_layers,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = FINETUNE.steps,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Sequences per step (DP: the expected Poisson batch).")
    ] = FINETUNE.batch_size,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Peak learning rate (default: per method, e.g. LoRA 1e-3).")
    ] = FINETUNE.lr,
    warmup: Annotated[int, typer.Option("--warmup", help="Warm-up steps.")] = FINETUNE.warmup,
    seqlen: Annotated[
        int, typer.Option("--seqlen", help="Tokens per training sequence and held-out window.")
    ] = FINETUNE.seqlen,
    heldout: Annotated[
        float, typer.Option("--heldout", help="Share of --data held out when --eval-data is not given.")
    ] = FINETUNE.heldout,
    eval_windows: Annotated[
        int | None, typer.Option("--eval-windows", help="Evaluate on the first N held-out rows (default: all).")
    ] = FINETUNE.eval_windows,
    eval_every: Annotated[
        int,
        typer.Option(
            "--eval-every", help="Steps between held-out evaluations during training (0: before and after only)."
        ),
    ] = FINETUNE.eval_every,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the data order, adapters, DP noise and canaries.")
    ] = FINETUNE.seed,
    dp_epsilon: Annotated[
        float | None, typer.Option("--dp-epsilon", help="Train with DP-SGD (Opacus) to this epsilon.")
    ] = FINETUNE.dp_epsilon,
    dp_delta: Annotated[float, typer.Option("--dp-delta", help="DP delta.")] = FINETUNE.dp_delta,
    noise_multiplier: Annotated[
        float | None,
        typer.Option("--noise-multiplier", help="DP-SGD with this noise multiplier instead of an epsilon target."),
    ] = FINETUNE.noise_multiplier,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="DP: per-sample gradient clipping norm.")
    ] = FINETUNE.max_grad_norm,
    accountant: Annotated[
        str, typer.Option("--accountant", help="DP accountant: prv or rdp (Opacus).")
    ] = FINETUNE.accountant,
    canaries: Annotated[
        int,
        typer.Option(
            "--canaries", help="Insert N random secrets into the data and report their exposure after training."
        ),
    ] = FINETUNE.canaries,
    canary_repeats: Annotated[
        int, typer.Option("--canary-repeats", help="Copies of each secret in the data.")
    ] = FINETUNE.canary_repeats,
    canary_candidates: Annotated[
        int, typer.Option("--canary-candidates", help="Random secrets each planted one is ranked among.")
    ] = FINETUNE.canary_candidates,
    augment: Annotated[
        int,
        typer.Option(
            "--augment",
            help="Teacher-written rows per training example: answers to chat prompts, rewrites of text (0: off).",
        ),
    ] = FINETUNE.augment,
    augment_teacher: Annotated[
        str | None,
        typer.Option(
            "--augment-teacher",
            help="The model that writes them; it must share MODEL's tokenizer (default: MODEL itself).",
        ),
    ] = FINETUNE.augment_teacher,
    augment_tokens: Annotated[
        int, typer.Option("--augment-tokens", help="Most tokens the teacher writes per row.")
    ] = FINETUNE.augment_tokens,
    augment_temperature: Annotated[
        float, typer.Option("--augment-temperature", help="The teacher's sampling temperature.")
    ] = FINETUNE.augment_temperature,
    merge: Annotated[
        bool,
        typer.Option("--merge", help="Also write the merged model (LoRA/DoRA folded into the weights) to OUT/merged."),
    ] = False,
    gguf: Annotated[
        bool,
        typer.Option(
            "--gguf", help="Also write OUT/adapter.gguf, a LoRA adapter llama.cpp loads with --lora (GGUF base only)."
        ),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the manifest to this JSON file ('-': stdout).")
    ] = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    device: Device = None,
) -> None:
    """Fine-tune a model on your data with a parameter-efficient method (peft), optionally with differential privacy
    (DP-SGD through Opacus, the epsilon spent in the report), a memorization check (canary exposure) and extra
    training rows a teacher writes from the training split (--augment; the held-out split is never shown to it).

    [bold]Examples[/bold]

      slimlm finetune smollm2-135m --data notes.txt --out smol-notes --steps 200
      slimlm finetune smollm2-135m --data chats.jsonl --method dora --out smol-chat --merge
      slimlm finetune smollm2-135m --data notes.txt --out smol-dp --dp-epsilon 8 --dp-delta 1e-5 --max-grad-norm 1.0
      slimlm finetune smol-gptq-w4 --data notes.txt --out smol-qlora        # QLoRA on slimlm's packed int4 model
      slimlm finetune smollm2-135m --data notes.txt --out smol-lora --gguf   # llama-cli -m base.gguf --lora smol-lora/adapter.gguf
      slimlm finetune smollm2-135m --data notes.txt --out smol-canary --canaries 4 --dp-epsilon 8
      slimlm finetune smollm2-135m --data chats.jsonl --out smol-aug --augment 2    # + 2 answers per prompt by the model itself
    """
    from slimlm.finetune.api import finetune as finetune_job
    from slimlm.finetune.settings import FinetuneSettings
    from slimlm.progress import console

    settings = FinetuneSettings(
        method=method,
        rank=rank,
        alpha=alpha,
        targets=targets,
        virtual_tokens=virtual_tokens,
        adapter_len=adapter_len,
        adapter_layers=adapter_layers,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        seqlen=seqlen,
        heldout=heldout,
        eval_windows=eval_windows,
        eval_every=eval_every,
        seed=seed,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        accountant=accountant,
        canaries=canaries,
        canary_repeats=canary_repeats,
        canary_candidates=canary_candidates,
        augment=augment,
        augment_teacher=augment_teacher,
        augment_tokens=augment_tokens,
        augment_temperature=augment_temperature,
    )
    manifest = finetune_job(
        model=model,
        data=data,
        out=out,
        settings=settings,
        eval_data=eval_data,
        merge=merge,
        gguf=gguf,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        device=device,
    )
    metrics = manifest["metrics"]
    if "augment" in manifest["data"]:
        a = manifest["data"]["augment"]
        reasons = ", ".join(f"{n} {reason}" for reason, n in a["dropped_by_reason"].items())
        console.print(
            f"augmentation: {a['teacher']} wrote {a['generated']} rows, {a['kept']} kept, {a['dropped']} dropped{f' ({reasons})' if reasons else ''} · {a['seconds']:.1f} s"
        )
    before, after = metrics["base"]["perplexity"], metrics["finetuned"]["perplexity"]
    console.print(
        f"held-out perplexity {before:.3f} → {after:.3f} ({after / before - 1:+.1%}) · trainable {metrics['trainable_parameters']:,} of {metrics['total_parameters']:,} parameters"
    )
    console.print(
        f"{metrics['tokens_per_second']:,.0f} tokens/s · {metrics['train_seconds']:.1f} s · peak RSS {metrics['peak_memory']['cpu_peak_rss_mb']:.0f} MB"
    )
    if "privacy" in metrics:
        p = metrics["privacy"]
        console.print(
            f"DP-SGD: ε = {p['epsilon']:.3f} at δ = {p['delta']:g} ({p['accountant_name']}) · noise multiplier {p['noise_multiplier']:.4f} · clip {p['max_grad_norm']} · sampling rate {p['sample_rate']:.5f}"
        )
    if "canaries" in metrics:
        c = metrics["canaries"]
        console.print(
            f"canary exposure: mean {c['mean_exposure']:.2f} bits of at most {c['max_exposure']:.2f} (ranks {', '.join(str(r['rank']) for r in c['canaries'])})"
        )
    if "gguf_adapter" in manifest:
        console.print(f"GGUF adapter: {manifest['gguf_adapter']['path']}")
    console.print(f"saved: {out}")
    if json_out:
        _write_json(json_out, manifest)


@app.command()
def exposure(
    model: ModelArg,
    canaries: Annotated[
        Path, typer.Option("--canaries", help="The canaries.json a `slimlm finetune --canaries N` run wrote.")
    ],
    adapter: Annotated[
        Path | None,
        typer.Option("--adapter", help="A `slimlm finetune` output directory whose adapter to load onto MODEL."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the result to this JSON file ('-': stdout).")
    ] = None,
    allow_pickle: AllowPickle = False,
    device: Device = None,
) -> None:
    """Exposure of planted canaries (Carlini et al. 2019) in any model: the fine-tuned one, its merge, or the merge
    after compression.

    [bold]Examples[/bold]

      slimlm exposure smollm2-135m --adapter smol-canary --canaries smol-canary/canaries.json
      slimlm exposure smol-canary-gptq --canaries smol-canary/canaries.json    # after slimlm compress of the merge
    """
    from slimlm.finetune.canaries import exposure as measure
    from slimlm.finetune.canaries import read_canaries
    from slimlm.models.load import load_model
    from slimlm.progress import console

    planted = read_canaries(canaries)
    loaded = load_model(str(model), allow_pickle=allow_pickle, device=device)
    scored = loaded.model
    if adapter is not None:
        from slimlm.finetune.api import load_adapter

        scored = load_adapter(loaded.model, adapter)
    result = measure(scored, loaded.tokenizer, planted)
    ranks = ", ".join(str(r["rank"]) for r in result["canaries"])
    console.print(
        f"canary exposure: mean {result['mean_exposure']:.2f} bits of at most {result['max_exposure']:.2f} (ranks {ranks})"
    )
    if json_out:
        _write_json(json_out, result)


def huge_pages_default() -> None:
    """Turn on PyTorch's huge-page CPU allocator for this command's process, unless the user set it.

    Without it every large activation is fresh memory that faults in 4 KB at a time on first touch: an RMSNorm over
    64 × 512 × 576 floats took 120 ms, 40 ms with it (2-core CPU box). torch reads the variable once, at its first
    allocation, so the command line sets it before any verb imports torch; importing slimlm as a library leaves the
    host process's environment alone (set THP_MEM_ALLOC_ENABLE=1 yourself before importing torch to get the same);
    THP_MEM_ALLOC_ENABLE=0 turns it off."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main() -> None:
    from rich.markup import escape

    from slimlm.progress import console

    huge_pages_default()
    # The command line's own process: transformers' info/warning logs would interleave with slimlm's progress (read
    # by transformers when it is imported; a user's TRANSFORMERS_VERBOSITY wins). A library caller's logging is
    # left alone (models/load.py quiets it only while loading, then restores it).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "WORLD_SIZE" in os.environ:  # launched by torchrun (`torchrun ... -m slimlm.cli compress`): join its processes
        from slimlm.train.distributed import process_group

        group = process_group()
    else:  # a plain process: torch is imported only by the verb that needs it, so --help stays fast
        group = nullcontext()
    try:
        with group:
            app()
    except SlimlmError as err:  # escaped: a path or value like "[red]x" in the message is text, not markup
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/bold red] (nothing half-written was left behind)")
        sys.exit(130)


if __name__ == "__main__":
    main()
