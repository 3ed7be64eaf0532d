"""The Python API: compress a model with a recipe, evaluate a model, and run the main job.

The CLI (`slimlm.cli`) is a thin layer over these three functions.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from slimlm.checkpoint.atomic import check_output_dir
from slimlm.checkpoint.save import WEIGHTS, save_model
from slimlm.data.calibration import CalibrationSet, sample_calibration
from slimlm.data.text import load_text
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import linear_sparsity, parameter_count, peak_memory, shipped_bytes
from slimlm.evaluate.perplexity import (
    EvalWindows,
    ReferenceLogits,
    evaluate_quality,
    make_windows,
)
from slimlm.evaluate.speculative import (
    ACCEPTANCE,
    SPECULATIVE,
    SpeculativeSettings,
    TokensOf,
    greedy_acceptance,
    greedy_answers,
)
from slimlm.export import export_loaded, export_model
from slimlm.models.load import ALIASES, LoadedModel, load_model, resolve_alias
from slimlm.pipeline import check_recipe, compress_, recipe_needs
from slimlm.progress import stage
from slimlm.quantize.kv_cache import (
    DEFAULT_CHUNK,
    KVCacheConfig,
    kv_cache_setting,
    kv_cache_summary,
)
from slimlm.recipes import Recipe, load_recipe, parse_stage
from slimlm.sensitivity import SensitivityTable, layer_sensitivity
from slimlm.settings import (
    COMPRESS_EVALUATION,
    DEFAULT_CONSTRAINTS,
    DEFAULT_MODEL,
    DEFAULT_RUN_RECIPES,
    DEFAULT_SEARCH,
    DEFAULT_SENSITIVITY_STAGE,
    RUN_CALIBRATION,
    SEARCH_EVALUATION,
    SENSITIVITY_CALIBRATION,
    SENSITIVITY_EVALUATION,
    CalibrationSettings,
    Constraints,
    EvalSettings,
    SearchSettings,
)
from slimlm.train.distributed import world


@dataclass
class Variant:
    """One row of a report: a model and what it cost and bought."""

    name: str
    recipe: list[dict] | None
    metrics: dict = field(default_factory=dict)
    path: str | None = None
    purpose: str | None = None  # what the row is for (the main job's default rows say it)


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the model as a dense checkpoint in its own dtype (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def quality_metrics(
    model: nn.Module,
    windows: EvalWindows,
    reference: ReferenceLogits | None,
    keep_reference: int = 0,
    kv_cache: KVCacheConfig | None = None,
    chunk_size: int | None = None,
) -> tuple[dict, ReferenceLogits | None]:
    """Quality of `model`; through its quantized KV cache when it carries a kv-cache setting (or `kv_cache` is given)."""
    kv_cache = kv_cache or kv_cache_setting(model)
    quality, kept = evaluate_quality(
        model, windows, reference=reference, keep_reference=keep_reference, kv_cache=kv_cache, chunk_size=chunk_size
    )
    metrics = asdict(quality)
    broken = [name for name, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
    if broken:
        raise SlimlmError(
            f"the evaluation gave non-finite {', '.join(f'{n} ({metrics[n]})' for n in broken)}: the model's outputs overflow",
            "look for NaN/Inf weights or a stage that overflowed; slimlm reports no result computed from them",
        )
    return metrics, kept


def kv_cache_metrics(model: nn.Module, windows: EvalWindows, config: KVCacheConfig, chunk_size: int | None) -> dict:
    """The KV cache's bytes at the window length against float16, and the perplexity of the same chunked protocol
    with a full-precision cache: what the quantized cache costs."""
    full, _ = evaluate_quality(model, windows, chunk_size=chunk_size or DEFAULT_CHUNK)
    return {
        **kv_cache_summary(config, model.config, windows.seqlen),
        "fp_cache_perplexity": full.perplexity,
        "fp_cache_protocol": full.protocol,
    }


def calibration_for(recipe: Recipe, tokenizer, settings: CalibrationSettings) -> CalibrationSet | None:
    """Draw calibration samples only when some stage needs statistics."""
    if "calibration" not in recipe_needs(recipe):
        return None
    text = load_text(settings.data, split="calibration")
    return sample_calibration(tokenizer, text, settings.samples, settings.seqlen, settings.seed)


def _compress(
    model: nn.Module, tokenizer, recipe: Recipe, calibration_settings: CalibrationSettings, device: torch.device | None
) -> tuple[nn.Module, dict]:
    """Compress `model` in place (pass a copy to keep the original); returns it and what the run did. The caller
    has run `check_recipe` on the model (before its slow base evaluation)."""
    calibration = calibration_for(recipe, tokenizer, calibration_settings)
    start = time.perf_counter()
    # a distill stage reads its data with the tokenizer
    logs = compress_(model, recipe, calibration, device, tokenizer=tokenizer, checked=True)
    info = {
        "compress_seconds": time.perf_counter() - start,
        "stages": [asdict(log) for log in logs],
        "calibration": calibration.describe() if calibration else "none: every stage of this recipe is data-free",
    }
    return model, info


def _manifest(base: LoadedModel, recipe: Recipe, info: dict, metrics: dict) -> dict:
    return {
        "base_model": {"source": base.source, "resolved": base.resolved, "kind": base.kind},
        "recipe": {"name": recipe.name, "description": recipe.description, "stages": recipe.to_list()},
        "calibration": info["calibration"],
        "stages": info["stages"],
        "compress_seconds": info["compress_seconds"],
        "metrics": metrics,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def compress(
    model: str = DEFAULT_MODEL,
    recipe: str = "magnitude-2of4",
    out: str | Path = "slimlm-out",
    calibration: CalibrationSettings = CalibrationSettings(),
    evaluation: EvalSettings | None = COMPRESS_EVALUATION,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
) -> dict:
    """Compress `model` with `recipe`, evaluate base and result (unless `evaluation` is None), save to `out`.

    Returns the manifest written to `out/slimlm.json`.
    """
    check_output_dir(out, overwrite)
    parsed = load_recipe(recipe)
    main_process = (
        world().is_main
    )  # under torchrun every process compresses (training is sharded); rank 0 evaluates and saves
    evaluation = evaluation if main_process else None
    text = load_text(evaluation.data, evaluation.split) if evaluation is not None else None
    base = load_model(model, allow_pickle=allow_pickle, device=device)
    check_recipe(base.model, parsed, has_calibration=True)  # fail before the (slow) base evaluation
    metrics: dict = {}
    reference = windows = None
    if evaluation is not None:
        windows = make_windows(base.tokenizer, text, evaluation.seqlen, evaluation.max_windows)
        with stage("evaluating the base model"):
            metrics["base"], reference = quality_metrics(
                base.model, windows, None, keep_reference=evaluation.kl_windows
            )
    metrics["base_dense_bytes"] = dense_bytes(base.model)
    metrics["base_parameters"] = parameter_count(base.model)
    with stage(f"compressing with {parsed.name}"):
        compressed, info = _compress(
            base.model, base.tokenizer, parsed, calibration, base.model.device
        )  # in place: the base is not needed again
    if windows is not None:
        with stage(f"evaluating {parsed.name}"):
            metrics["compressed"], _ = quality_metrics(compressed, windows, reference)
    metrics["sparsity"] = linear_sparsity(compressed)
    metrics["parameters"] = parameter_count(compressed)
    metrics["peak_memory"] = peak_memory()
    manifest = _manifest(base, parsed, info, metrics)
    if not main_process:
        return manifest
    saved = save_model(compressed, base.tokenizer, out, manifest, overwrite=overwrite)
    written = dict(saved.manifest)
    if parsed.export is not None:  # from the model in memory and the manifest just written: nothing read back
        path = saved.path
        target = Path(f"{path}.gguf") if parsed.export.format == "gguf" else Path(f"{path}-{parsed.export.format}")
        in_memory = LoadedModel(
            compressed.to("cpu"), base.tokenizer, str(path), str(path), "slimlm-dir", saved.manifest
        )
        if parsed.export.tensors:
            written["export"] = _replay_search(in_memory, parsed.export, target, overwrite)
        else:
            written["export"] = export_loaded(
                in_memory,
                parsed.export.format,
                target,
                gguf_type=parsed.export.gguf_type,
                overwrite=overwrite,
                gguf=parsed.export.gguf_options() if parsed.export.format == "gguf" else None,
            )
    return written


def _replay_search(loaded: LoadedModel, step, out: Path, overwrite: bool) -> dict:
    """The export step of a `slimlm search` recipe: the searched artifact rebuilt (`slimlm.search.replay`)."""
    from slimlm.export import source_gguf
    from slimlm.search.replay import replay

    settings = step.calibration
    drawn = sample_calibration(
        loaded.tokenizer,
        load_text(settings.data, split="calibration"),
        settings.samples,
        settings.seqlen,
        settings.seed,
    )
    result = {
        "model": loaded.source,
        "format": step.format,
        "path": str(out),
        "replayed_tensors": len(step.tensors),
        "calibration": drawn.describe(),
    }
    with stage(f"replaying the searched {step.format} artifact ({len(step.tensors)} tensors)"):
        written = replay(
            loaded.model,
            loaded.tokenizer,
            step.format,
            dict(step.tensors),
            step.remove_blocks,
            drawn.input_ids,
            out,
            source_gguf=source_gguf(loaded),
            manifest={"replayed_from": "a slimlm search recipe"},
            overwrite=overwrite,
        )
    if step.format == "gguf":
        return result | {key: value for key, value in asdict(written).items() if key != "path"}
    return result | {"bytes": (out / WEIGHTS).stat().st_size}


def load_tasks(evaluation: EvalSettings) -> list:
    """Read (and check) every zero-shot task's data before any model is loaded, so bad input fails at once."""
    from slimlm.evaluate.tasks import check_limit, load_task_data

    check_limit(evaluation.task_limit)
    return [load_task_data(spec, evaluation.task_data) for spec in evaluation.tasks]


def task_and_speed_metrics(
    model: nn.Module, tokenizer, tasks: list, evaluation: EvalSettings, per_example: bool = False
) -> dict:
    """{"tasks": {name: result}, "speed": {...}} for what `evaluation` asks (nothing when it asks for neither);
    `per_example` keeps each task's per-example scores (data-set index, row, metrics) to compare models on."""
    from slimlm.evaluate.speed import measure_speed
    from slimlm.evaluate.tasks import score_task

    metrics: dict = {}
    if tasks:
        results = [score_task(model, tokenizer, data, evaluation.task_limit, evaluation.task_seed) for data in tasks]
        metrics["tasks"] = {
            r.task: {k: v for k, v in asdict(r).items() if per_example or k != "per_example"} for r in results
        }
    if evaluation.speed is not None:
        metrics["speed"] = asdict(measure_speed(model, evaluation.speed))
    return metrics


def evaluate(
    model: str,
    evaluation: EvalSettings = EvalSettings(),
    base: str | None = None,
    allow_pickle: bool = False,
    device: str | None = None,
    engine: str | None = None,
    threads: int = 2,
    draft: str | None = None,
    speculative: SpeculativeSettings = SPECULATIVE,
    acceptance: SpeculativeSettings | None = ACCEPTANCE,
) -> dict:
    """Perplexity of `model` (and KL/top-1 against `base` when given), its parameters and bytes on disk; zero-shot
    task scores (with each example's, under "per_example") and speed when `evaluation` asks for them.

    With `base`, also the greedy acceptance of `model` drafting for `base` at each k of `acceptance` ("draft_acceptance",
    `slimlm.evaluate.speculative.greedy_acceptance`): how often the model's next token is its parent's, on the
    parent's own greedy answers. On by default because it is cheap beside the perplexity windows: prompts ×
    (new_tokens + k) decode steps of the base (72 with ACCEPTANCE) and one forward per answer of the model, a few
    seconds for SmolLM2-135M on 2 CPU cores; None skips it.

    With `engine` ("transformers" or "llama.cpp") instead: one row of the engine comparison, the same figures from
    either engine (perplexity, KL and top-1 to `base`, prefill/decode tok/s and peak RSS on `threads` threads, file
    bytes); see `evaluate_on_engine`.

    With `draft` instead: speculative decoding of `model` drafted by `draft`, measured on the real path at each k of
    `speculative` (identical to the target's greedy text, acceptance, tokens per target forward, decode tok/s against
    the target alone, on `threads` threads); see `slimlm.evaluate.speculative.speculative_table`."""
    if draft is not None:
        from slimlm.evaluate.speculative import evaluate_speculative

        if engine is not None or base is not None:
            raise SlimlmError(
                "a draft measures speculative decoding against the model itself", "drop base and engine, or drop draft"
            )
        return evaluate_speculative(
            model, [draft], speculative, device=device, threads=threads, allow_pickle=allow_pickle
        )
    if engine is not None:
        return evaluate_on_engine(model, engine, evaluation, base, threads, allow_pickle, device)
    tasks = load_tasks(evaluation)
    text = load_text(evaluation.data, evaluation.split) if evaluation.perplexity else None
    loaded = load_model(model, allow_pickle=allow_pickle, device=device)
    result: dict = {"model": model}
    if text is not None:
        windows = make_windows(loaded.tokenizer, text, evaluation.seqlen, evaluation.max_windows)
        reference = answers = None
        if base is not None:
            base_loaded = load_model(base, allow_pickle=allow_pickle, device=device)
            if acceptance is not None:
                _check_acceptance_tokenizers(base_loaded, loaded)  # before the slow evaluation
            with stage(f"evaluating the base {base}"):
                result["base"], reference = quality_metrics(
                    base_loaded.model, windows, None, keep_reference=evaluation.kl_windows
                )
            if acceptance is not None:
                with stage(f"greedy answers of {base} for the draft acceptance ({acceptance.describe()})"):
                    answers = greedy_answers(
                        base_loaded.model, base_loaded.tokenizer, acceptance, TokensOf.of(base_loaded).end_ids
                    )
            result["base_dense_bytes"] = dense_bytes(base_loaded.model)
            del base_loaded
        with stage(f"evaluating {model}"):
            result["quality"], _ = quality_metrics(
                loaded.model, windows, reference, kv_cache=evaluation.kv_cache, chunk_size=evaluation.chunk_size
            )
        if answers is not None:
            with stage(f"draft acceptance of {model} for {base}"):
                result["draft_acceptance"] = [asdict(figure) for figure in greedy_acceptance(loaded.model, answers)]
        kv_cache = evaluation.kv_cache or kv_cache_setting(loaded.model)
        if kv_cache is not None:
            result["kv_cache"] = kv_cache_metrics(loaded.model, windows, kv_cache, evaluation.chunk_size)
    result.update(task_and_speed_metrics(loaded.model, loaded.tokenizer, tasks, evaluation, per_example=True))
    result["parameters"] = parameter_count(loaded.model)
    result["sparsity"] = linear_sparsity(loaded.model)
    if loaded.kind == "slimlm-dir":
        result["storage"] = loaded.manifest["storage"]
    return result


def _check_acceptance_tokenizers(base: LoadedModel, model: LoadedModel) -> None:
    """The draft acceptance feeds the base's token ids to the model: refuse a model with another tokenizer."""
    from slimlm.serve.backends import check_draft

    try:
        check_draft(TokensOf.of(base), TokensOf.of(model))
    except SlimlmError as err:
        raise SlimlmError(
            err.problem, "pass --no-acceptance (acceptance=None) to evaluate against this base without it"
        ) from None


ENGINES = ("transformers", "llama.cpp")


def evaluate_on_engine(
    model: str,
    engine: str,
    evaluation: EvalSettings = EvalSettings(),
    base: str | None = None,
    threads: int = 2,
    allow_pickle: bool = False,
    device: str | None = None,
) -> dict:
    """`model` run in `engine`: perplexity on `evaluation`'s windows, KL(base || model) and top-1 agreement when
    `base` is given, prefill/decode tokens/s and peak RSS (batch 1, `threads` threads), and file bytes.

    llama.cpp runs a .gguf file; transformers runs anything `load_model` reads (HF, compressed-tensors, slimlm
    directories, a GGUF dequantized). The base runs in llama.cpp when it is a .gguf file and `engine` is llama.cpp,
    else in transformers. Both engines' logits are scored by the same code on the same token ids, so rows from
    the two engines are directly comparable; speed figures carry the machine's load when they were taken."""
    from slimlm.evaluate.llama_cpp import check_gguf, llama_cpp_quality, llama_cpp_speed, load_average
    from slimlm.evaluate.speed import SpeedSettings, measure_speed

    if engine not in ENGINES:
        raise SlimlmError(f"unknown engine '{engine}'", f"use one of: {', '.join(ENGINES)}")
    if (
        evaluation.tasks
        or evaluation.kv_cache is not None
        or evaluation.chunk_size is not None
        or evaluation.speed is not None
    ):
        raise SlimlmError(
            "an engine comparison measures perplexity, KL, top-1 and speed only",
            "drop --tasks, --kv-bits, --chunk-size and --speed, or drop --engine for the full transformers evaluation",
        )
    if threads < 1:
        raise SlimlmError(f"threads must be at least 1, got {threads}", "pass e.g. --threads 2")
    # not a GGUF, llama.cpp missing: refused before any work; the built-in alias is a GGUF file too
    gguf_path = check_gguf(resolve_alias(model) if model in ALIASES else model) if engine == "llama.cpp" else None
    base_path = (
        check_gguf(base) if engine == "llama.cpp" and base is not None and Path(base).suffix == ".gguf" else None
    )
    text = load_text(evaluation.data, evaluation.split)
    speed_settings = SpeedSettings(batch_sizes=(1,))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loaded = base_loaded = None
        if base is not None and base_path is None:
            base_loaded = load_model(base, allow_pickle=allow_pickle, device=device)
            tokenizer = base_loaded.tokenizer
        elif engine == "transformers":
            loaded = load_model(model, allow_pickle=allow_pickle, device=device)
            tokenizer = loaded.tokenizer
        else:
            tokenizer = _gguf_tokenizer(base_path or gguf_path)
        windows = make_windows(tokenizer, text, evaluation.seqlen, evaluation.max_windows)
        result: dict = {"model": model, "engine": engine, "threads": threads}
        reference = None
        if base is not None:
            with stage(f"evaluating the base {base} in {'llama.cpp' if base_path else 'transformers'}"):
                if base_path is not None:
                    quality, reference = llama_cpp_quality(
                        base_path, windows, keep_reference=evaluation.kl_windows, threads=threads
                    )
                    base_metrics = asdict(quality)
                else:
                    base_metrics, reference = quality_metrics(
                        base_loaded.model, windows, None, keep_reference=evaluation.kl_windows
                    )
            result["base"] = {
                "model": base,
                "engine": "llama.cpp" if base_path else "transformers",
                "quality": base_metrics,
            }
            del base_loaded
        with stage(f"evaluating {model} in {engine}"):
            if gguf_path is not None:
                quality, _ = llama_cpp_quality(gguf_path, windows, reference, threads=threads)
                result["quality"] = asdict(quality)
            else:
                loaded = loaded or load_model(model, allow_pickle=allow_pickle, device=device)
                result["quality"], _ = quality_metrics(loaded.model, windows, reference)
        with stage(f"measuring the speed of {model} in {engine} ({threads} thread{'s' if threads > 1 else ''})"):
            if gguf_path is not None:
                speed = asdict(
                    llama_cpp_speed(
                        gguf_path,
                        threads,
                        speed_settings.prompt_tokens,
                        speed_settings.new_tokens,
                        speed_settings.repeats,
                    )
                )
                result["file_bytes"] = speed.pop("file_bytes")
            else:
                load = load_average()
                measured = measure_speed(loaded.model, speed_settings)
                speed = {
                    "prefill_tokens_per_s": measured.prefill_tokens_per_s,
                    "decode_tokens_per_s": measured.decode_tokens_per_s,
                    "peak_rss_bytes": int(measured.cpu_peak_rss_mb * 2**20),
                    "peak_rss_scope": measured.cpu_peak_scope,
                    "threads": threads,
                    "transformers": _transformers_version(),
                    "prompt_tokens": measured.prompt_tokens,
                    "new_tokens": measured.new_tokens,
                    "repeats": measured.repeats,
                    "load": load,
                }
                result["file_bytes"] = _model_file_bytes(Path(loaded.resolved))
        result["speed"] = speed
    finally:
        torch.set_num_threads(previous_threads)
    return result


def _gguf_tokenizer(path: Path):
    """The tokenizer transformers builds from a GGUF's metadata: it cuts the windows both engines are fed."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as err:
        raise SlimlmError(
            f"transformers cannot build a tokenizer from '{path}': {str(err).splitlines()[0][:160]}",
            "pass --base MODEL: the windows are then cut with the base's tokenizer",
        ) from None


def _model_file_bytes(resolved: Path) -> int | None:
    """Bytes on disk of a model file, or of the weight files of a model directory; None for a hub id."""
    if resolved.is_file():
        return resolved.stat().st_size
    if not resolved.is_dir():
        return None
    weights = [p for p in resolved.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin", ".pt", ".pth")]
    return sum(p.stat().st_size for p in weights)


def _transformers_version() -> str:
    import transformers

    return f"transformers {transformers.__version__}, torch {torch.__version__}"


def sensitivity(
    model: str = DEFAULT_MODEL,
    stage: dict | None = None,
    evaluation: EvalSettings = SENSITIVITY_EVALUATION,
    calibration: CalibrationSettings = SENSITIVITY_CALIBRATION,
    allow_pickle: bool = False,
    device: str | None = None,
) -> SensitivityTable:
    """Rank the model's block linears by the KL divergence from the base when each alone is compressed with `stage`
    (a recipe stage as a dict; default int4 RTN, groups of 64). Returns a `SensitivityTable`, most sensitive first.
    Calibration data is drawn only for stages that need statistics (e.g. gptq)."""
    config = parse_stage(stage or DEFAULT_SENSITIVITY_STAGE, "sensitivity stage")
    text = load_text(evaluation.data, evaluation.split)
    loaded = load_model(model, allow_pickle=allow_pickle, device=device)
    windows = make_windows(loaded.tokenizer, text, evaluation.seqlen, evaluation.max_windows)
    calibration_set = calibration_for(Recipe("sensitivity", "", (config,)), loaded.tokenizer, calibration)
    return layer_sensitivity(loaded.model, windows, config, calibration_set, loaded.model.device)


def run(
    model: str = DEFAULT_MODEL,
    recipes: tuple[str, ...] = tuple(DEFAULT_RUN_RECIPES),
    evaluation: EvalSettings = EvalSettings(),
    calibration: CalibrationSettings = RUN_CALIBRATION,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
    acceptance: SpeculativeSettings | None = ACCEPTANCE,
) -> Path:
    """The main job: evaluate the base, compress it with each recipe, evaluate and save each, write one report.

    Writes `out_dir/report.{json,md,html}`, the quality-vs-cost plots and `out_dir/models/<recipe>/`; returns
    `out_dir`. Zero-shot tasks and speed are measured on every variant when `evaluation` asks for them. Each
    compressed row carries its greedy draft acceptance for the base at each k of `acceptance` (None: not measured):
    the base's answers are decoded once (prompts × (new_tokens + k) decode steps, ~3 s for SmolLM2-135M on 2 CPU
    cores with ACCEPTANCE), then each row costs one forward per answer (~80 tokens each, well under a second).
    """
    from slimlm.report import write_report

    out = Path(out_dir or Path("slimlm-runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    check_output_dir(out, overwrite)
    parsed = [load_recipe(name) for name in recipes]  # refuse a bad recipe before any work
    text = load_text(evaluation.data, evaluation.split)
    tasks = load_tasks(evaluation)
    base = load_model(model, allow_pickle=allow_pickle, device=device)
    for recipe in parsed:
        check_recipe(base.model, recipe, has_calibration=True)
    windows = make_windows(base.tokenizer, text, evaluation.seqlen, evaluation.max_windows)
    with stage("evaluating the base model"):
        base_quality, reference = quality_metrics(base.model, windows, None, keep_reference=evaluation.kl_windows)
    answers = None
    if acceptance is not None:  # every variant shares the base's tokenizer: nothing to check
        with stage(f"greedy answers of the base for the draft acceptance ({acceptance.describe()})"):
            answers = greedy_answers(base.model, base.tokenizer, acceptance, TokensOf.of(base).end_ids)
    base_bytes = shipped_bytes(base.model)  # as a user would ship it (16-bit), not as loaded (fp32)
    variants = [
        Variant(
            "base",
            None,
            {
                "quality": base_quality,
                "parameters": parameter_count(base.model),
                "sparsity": linear_sparsity(base.model),
                "weight_bytes": base_bytes,
                "compression_ratio": 1.0,
                **task_and_speed_metrics(base.model, base.tokenizer, tasks, evaluation),
            },
            purpose="the model as shipped, counted at 16-bit weights",
        )
    ]
    models_dir = out / "models"
    for number, recipe in enumerate(parsed, 1):
        with stage(f"compressing with {recipe.name} ({number}/{len(parsed)})"):
            compressed, info = _compress(
                copy.deepcopy(base.model), base.tokenizer, recipe, calibration, base.model.device
            )
        with stage(f"evaluating {recipe.name} ({number}/{len(parsed)})"):
            quality, _ = quality_metrics(compressed, windows, reference)
        metrics = {
            "quality": quality,
            "parameters": parameter_count(compressed),
            "sparsity": linear_sparsity(compressed),
        }
        if answers is not None:
            metrics["draft_acceptance"] = [asdict(figure) for figure in greedy_acceptance(compressed, answers)]
        metrics.update(task_and_speed_metrics(compressed, base.tokenizer, tasks, evaluation))
        saved = save_model(
            compressed,
            base.tokenizer,
            models_dir / recipe.name,
            _manifest(base, recipe, info, metrics),
            overwrite=overwrite,
        )
        storage = saved.manifest["storage"]
        metrics.update(
            storage,
            compression_ratio=base_bytes / storage["weight_bytes"],
            compress_seconds=info["compress_seconds"],
            peak_memory=peak_memory(),
        )
        variants.append(
            Variant(
                recipe.name,
                recipe.to_list(),
                metrics,
                str(saved.path),
                DEFAULT_RUN_RECIPES.get(recipe.name, recipe.description),
            )
        )
        del compressed
    context = {
        "model": {"source": base.source, "resolved": base.resolved, "dtype": str(next(base.model.parameters()).dtype)},
        "evaluation": {
            "protocol": windows.protocol(),
            "kl_windows": min(evaluation.kl_windows, windows.input_ids.shape[0]),
            "kl": reference.describe() if reference else None,
            "draft_acceptance": acceptance.describe()
            + ", exact greedy acceptance of each variant drafting for the base"
            if acceptance
            else None,
        },
        "device": str(base.model.device),
        "peak_memory": peak_memory(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_report(out, variants, context)
    return out


def search(
    model: str = DEFAULT_MODEL,
    out_dir: str | Path | None = None,
    constraints: Constraints = DEFAULT_CONSTRAINTS,
    settings: SearchSettings = DEFAULT_SEARCH,
    evaluation: EvalSettings = SEARCH_EVALUATION,
    database: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
):
    """The best deployable file under `constraints`, with the measured front (`slimlm.search.run.run_search`).

    Writes `out_dir/{model.gguf, recipe.yaml, front.json, front-size.png, report.html}` (with
    `settings.target="compressed-tensors"`, out_dir is the checkpoint itself, beside the same report) and returns the
    SearchResult; the variant database (reused across budgets) goes to `database` (default: a per-model cache, see
    `slimlm.search.driver.default_database`).
    """
    from slimlm.search.run import run_search

    out = Path(out_dir or Path("slimlm-runs") / datetime.now().strftime("search-%Y%m%d-%H%M%S"))
    return run_search(
        model,
        out,
        constraints,
        settings,
        evaluation,
        database_dir=database,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        device=device,
    )


export = export_model  # the API's export verb is slimlm.export.export_model itself (one signature, one docstring)
