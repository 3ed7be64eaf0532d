"""`slimlm` command line: a thin layer over `slimlm.api`. Every error a user can cause is one line, exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from slimlm.errors import SlimlmError

app = typer.Typer(
    name="slimlm",
    help="Turn language models into small language models, and measure what each step costs and buys.\n\n"
    "Quick start: [bold]slimlm run[/bold] compresses the built-in SmolLM2-135M with the default recipes and prints a report.\n\n"
    "[bold]Examples[/bold]\n\n"
    "  slimlm run --fast           # all default recipes, a quick report\n"
    "  slimlm recipes              # what each shipped recipe does\n"
    "  slimlm compress smollm2-135m --recipe rtn-w4-g64 --out smol-w4\n"
    "  slimlm eval smol-w4 --base smollm2-135m --windows 4",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[str, typer.Argument(help="Built-in alias 'smollm2-135m', a model directory, a .gguf file, or a hub id (org/name).")]
EvalData = Annotated[str, typer.Option("--eval-data", help="'default' (offline corpus), a .txt/.jsonl file, 'wikitext2:DIR', or 'hf:NAME[:CONFIG]'.")]
Seqlen = Annotated[int, typer.Option("--seqlen", help="Tokens per perplexity window.")]
Windows = Annotated[Optional[int], typer.Option("--windows", help="Evaluate only the first N windows (default: all).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output directory if it exists.")]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")]
CalibData = Annotated[str, typer.Option("--calib-data", help="Calibration text (same forms as --eval-data); used only by methods that need data.")]
CalibSamples = Annotated[int, typer.Option("--calib-samples", help="Calibration windows (128 as in GPTQ/Wanda; fewer is faster on CPU).")]
CalibSeqlen = Annotated[int, typer.Option("--calib-seqlen", help="Tokens per calibration window.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the calibration sampler.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow .bin/.pt pickle checkpoints (they can run code: trusted sources only).")]


def _settings(eval_data: str, split: str, seqlen: int, windows: int | None, kl_windows: int):
    from slimlm.api import EvalSettings

    return EvalSettings(data=eval_data, split=split, seqlen=seqlen, max_windows=windows, kl_windows=kl_windows)


@app.command()
def run(
    model: Annotated[str, typer.Option("--model", help="Model to compress (alias, directory, .gguf or hub id).")] = "smollm2-135m",
    recipes: Annotated[Optional[str], typer.Option("--recipes", help="Comma-separated recipe names or YAML paths.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Report directory (default: slimlm-runs/<timestamp>).")] = None,
    eval_data: EvalData = "default",
    seqlen: Seqlen = 2048,
    windows: Windows = None,
    fast: Annotated[bool, typer.Option("--fast", help="Quick look: 4 windows of 512 tokens, KL on 2.")] = False,
    calib_data: CalibData = "default",
    calib_samples: CalibSamples = 128,
    calib_seqlen: CalibSeqlen = 2048,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    device: Device = None,
) -> None:
    """The main job: compress the model with several recipes, evaluate base and every result, write one report.

    [bold]Examples[/bold]

      slimlm run                                   # SmolLM2-135M, default recipes, offline corpus
      slimlm run --fast                            # a quick look in a couple of minutes
      slimlm run --recipes magnitude-50,rtn-w4-g64 --eval-data wikitext2:../shared/data/wikitext-2-raw
      slimlm run --recipes magnitude-50,wanda-50 --calib-samples 32   # Wanda calibrates on 32 x 2048 tokens
    """
    from slimlm.api import DEFAULT_RUN_RECIPES, CalibrationSettings, run as run_job

    names = tuple(r.strip() for r in recipes.split(",") if r.strip()) if recipes else DEFAULT_RUN_RECIPES
    settings = _settings(eval_data, "evaluation", 512 if fast else seqlen, 4 if fast else windows, 2 if fast else 4)
    calibration = CalibrationSettings(calib_data, calib_samples, calib_seqlen, seed)
    run_job(model=model, recipes=names, evaluation=settings, calibration=calibration, out_dir=out, overwrite=overwrite, allow_pickle=allow_pickle, device=device)


@app.command()
def compress(
    model: ModelArg,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Shipped recipe name (see 'slimlm recipes') or a YAML file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model directory (written atomically).")],
    calib_data: CalibData = "default",
    calib_samples: CalibSamples = 128,
    calib_seqlen: CalibSeqlen = 2048,
    seed: Seed = 0,
    eval_data: EvalData = "default",
    seqlen: Seqlen = 2048,
    windows: Annotated[int, typer.Option("--windows", help="Perplexity windows for the before/after check.")] = 8,
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
    """
    from slimlm.api import CalibrationSettings, compress as compress_job
    from slimlm.progress import console

    calibration = CalibrationSettings(calib_data, calib_samples, calib_seqlen, seed)
    evaluation = None if no_eval else _settings(eval_data, "evaluation", seqlen, windows, 4)
    manifest = compress_job(model, recipe, out, calibration, evaluation, overwrite, allow_pickle, device)
    metrics = manifest["metrics"]
    if "compressed" in metrics:
        before, after = metrics["base"]["perplexity"], metrics["compressed"]["perplexity"]
        console.print(f"perplexity {before:.3f} → {after:.3f} ({after / before - 1:+.1%}), KL {metrics['compressed']['kl_divergence']:.4f}")
        console.print(f"[dim]{metrics['compressed']['protocol']}[/dim]")
    storage = manifest["storage"]
    console.print(f"sparsity {metrics['sparsity']:.1%} · weights {storage['weight_bytes'] / 1e6:.1f} MB (base {metrics['base_dense_bytes'] / 1e6:.1f} MB)")
    if "quantized_share_of_fp16" in storage:
        console.print(f"quantized linears take {storage['quantized_share_of_fp16']:.1%} of their fp16 bytes")
    console.print(f"saved: {out}")


@app.command(name="eval")
def eval_(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", help="'default', a .txt/.jsonl file, 'wikitext2:DIR' or 'hf:NAME[:CONFIG]'.")] = "default",
    split: Annotated[str, typer.Option("--split", help="Split of --data: evaluation/calibration (default corpus), test/valid (WikiText-2).")] = "evaluation",
    seqlen: Seqlen = 2048,
    windows: Windows = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model to measure KL divergence and top-1 agreement against.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    allow_pickle: AllowPickle = False,
    device: Device = None,
) -> None:
    """Perplexity (GPTQ protocol), KL/top-1 against a base, parameters and bytes on disk of one model.

    [bold]Examples[/bold]

      slimlm eval smollm2-135m --windows 4
      slimlm eval smol-2of4 --data wikitext2:../shared/data/wikitext-2-raw --split test
      slimlm eval smol-w4 --base smollm2-135m --windows 4 --json smol-w4.json
    """
    from slimlm.api import evaluate
    from slimlm.progress import console

    result = evaluate(model, _settings(data, split, seqlen, windows, 4), base=base, allow_pickle=allow_pickle, device=device)
    quality = result["quality"]
    line = f"perplexity {quality['perplexity']:.3f}"
    if quality["kl_divergence"] is not None:
        line += f" · KL {quality['kl_divergence']:.4f} · top-1 agreement {quality['top1_agreement']:.1%} (base ppl {result['base']['perplexity']:.3f})"
    console.print(line)
    console.print(f"[dim]{quality['protocol']}[/dim]")
    console.print(f"parameters {result['parameters'] / 1e6:.1f}M · sparsity {result['sparsity']:.1%}")
    if "storage" in result:
        console.print(f"weights on disk {result['storage']['weight_bytes'] / 1e6:.1f} MB")
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@app.command()
def recipes(name: Annotated[Optional[str], typer.Argument(help="Show this recipe's stages.")] = None) -> None:
    """List the shipped recipes and the methods their stages use, or show one recipe.

    [bold]Examples[/bold]

      slimlm recipes
      slimlm recipes magnitude-2of4
    """
    from rich.table import Table

    from slimlm.progress import console
    from slimlm.recipes import load_recipe, shipped_recipes
    from slimlm.recipes.registry import METHODS

    if name:
        recipe = load_recipe(name)
        console.print(f"[bold]{recipe.name}[/bold]: {recipe.description}")
        for index, stage in enumerate(recipe.to_list(), 1):
            console.print(f"  {index}. " + ", ".join(f"{k}={v}" for k, v in stage.items()))
        return
    table = Table(title="shipped recipes")
    table.add_column("name")
    table.add_column("stages")
    table.add_column("description")
    for recipe_name in shipped_recipes():
        recipe = load_recipe(recipe_name)
        table.add_row(recipe_name, " → ".join(stage.method for stage in recipe.stages), recipe.description)
    console.print(table)
    methods = Table(title="methods a recipe stage can use")
    methods.add_column("method")
    methods.add_column("what it does")
    for method_name, method in sorted(METHODS.items()):
        methods.add_row(method_name, method.summary)
    console.print(methods)


def main() -> None:
    from rich.markup import escape

    from slimlm.progress import console

    try:
        app()
    except SlimlmError as err:  # escaped: a path or value like "[red]x" in the message is text, not markup
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/bold red] (nothing half-written was left behind)")
        sys.exit(130)


if __name__ == "__main__":
    main()
