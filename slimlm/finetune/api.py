"""`slimlm finetune`: adapt a model to a user's data with a parameter-efficient method, optionally with DP-SGD,
planted canaries and teacher-written extra rows (`slimlm.finetune.augment`), through the house training loop
(`slimlm.train.trainer.train`).

The output directory holds the adapter in peft's format (adapter_config.json + adapter_model.safetensors; load it
with plain transformers + peft), the tokenizer, `finetune.json` (settings, data and its augmentation, held-out
perplexity before and after, trainable parameters, peak memory, tokens/s, the privacy budget spent, canary
exposure), and on request a merged Hugging Face model (`merged/`) and a GGUF LoRA adapter for llama.cpp
(`adapter.gguf`). Full fine-tuning writes the whole model instead of an adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from slimlm.checkpoint.atomic import atomic_directory, check_output_dir
from slimlm.checkpoint.save import save_model
from slimlm.data.text import load_text
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import peak_memory
from slimlm.evaluate.perplexity import make_windows
from slimlm.finetune.data import PoissonRows, Rows, ShuffledRows, concat_rows, pad_id_of, read_rows, split_heldout
from slimlm.finetune.peft_methods import apply_method, finetune_loss, per_sample_nll, trainable_parameters
from slimlm.finetune.settings import FinetuneSettings
from slimlm.models.load import LoadedModel, load_model
from slimlm.progress import stage
from slimlm.quantize.linear import QuantizedLinear
from slimlm.train.trainer import TrainConfig, train

MANIFEST = "finetune.json"
EVAL_BATCH = 8


def base_fingerprint(model: nn.Module) -> dict:
    """What identifies the base an adapter belongs to: its shape and a hash of its first weights."""
    config = model.config
    digest = hashlib.sha256()
    for name, tensor in list(model.state_dict().items())[:6]:
        digest.update(f"{name}:{tuple(tensor.shape)}:{float(tensor.float().sum()):.5e}".encode())
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "weights": digest.hexdigest()[:16],
    }


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-set high-water mark (Linux: clear_refs 5), so the peak measured after training
    is the training's own, not the model loading's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb(field: str = "VmHWM") -> float | None:
    """This process's VmHWM (peak) or VmRSS (now) in MiB (Linux), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 16


def return_large_frees() -> None:
    """Have glibc give blocks of 64 KiB and more back to the kernel when they are freed (QLoRA, where memory is the
    point). Its default threshold rises with every large block freed, after which such blocks come from the heap,
    where the activations kept for the backward pass fragment it: QLoRA dequantizes each layer's weight on every
    call (up to 3.5 MB on SmolLM2), and its training peak was 1,878 MB on SmolLM2's int4 model, 1,247 MB with this
    set, at 80 instead of 110 tokens/s (the page faults of fresh mappings); a 256 KiB threshold gave 1,318 MB at
    82, 1 MiB 1,702 MB at 110. Elsewhere (not glibc) a no-op."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # musl and other libcs: no mallopt, nothing to set
        pass


@torch.no_grad()
def heldout_perplexity(model: nn.Module, rows: Rows) -> dict:
    """exp(mean NLL) over the held-out rows' labelled tokens (text windows: every token but the first of each,
    as the GPTQ protocol; chat: the answers)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), EVAL_BATCH):
            batch = {k: v.to(device) for k, v in rows.take(range(start, min(start + EVAL_BATCH, len(rows)))).items()}
            nll, tokens = per_sample_nll(model, batch)
            total += float(nll.sum())
            count += int(tokens.sum())
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


def heldout_rows(tokenizer, train_rows: Rows, eval_data: str | None, settings: FinetuneSettings) -> tuple[Rows, Rows]:
    """(training rows, held-out rows): `eval_data`'s evaluation split in GPTQ-protocol windows, or a seeded share of
    the training data."""
    if eval_data is not None:
        windows = make_windows(tokenizer, load_text(eval_data, "evaluation"), settings.seqlen, settings.eval_windows)
        ids = windows.input_ids
        return train_rows, Rows(ids, ids.clone(), torch.ones_like(ids), windows.protocol())
    train_part, held = split_heldout(train_rows, settings.heldout, settings.seed)
    if settings.eval_windows is not None:
        held = held.subset(torch.arange(min(settings.eval_windows, len(held))), held.label)
    return train_part, held


def finetune(
    model: str,
    data: str,
    out: str | Path,
    settings: FinetuneSettings = FinetuneSettings(),
    eval_data: str | None = None,
    merge: bool = False,
    gguf: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
) -> dict:
    """Fine-tune `model` on `data` with `settings.method`, evaluate on the held-out split before and after, and
    save to `out` (see the module docstring). Returns the manifest written to `out/finetune.json`."""
    check_output_dir(out, overwrite)
    if merge and settings.method not in ("lora", "dora"):
        raise SlimlmError(
            f"--merge folds LoRA/DoRA updates into the weights; {settings.method} has none to fold", "drop --merge"
        )
    if gguf and settings.method != "lora":
        raise SlimlmError("llama.cpp's GGUF adapters hold LoRA only", "use --method lora with --gguf")
    if settings.private:
        from slimlm.finetune.privacy import require_opacus

        require_opacus()
    base = load_model(model, allow_pickle=allow_pickle, device=device)
    quantized = any(isinstance(m, QuantizedLinear) for m in base.model.modules())
    if quantized:
        return_large_frees()
    if merge and quantized:
        raise SlimlmError(
            "merging into packed quantized layers would re-quantize the update away",
            "drop --merge: the adapter loads onto the quantized model",
        )
    if gguf and base.kind not in ("gguf", "alias-gguf"):
        raise SlimlmError(
            "--gguf writes an adapter for a GGUF base model, but this base is not a GGUF file",
            "fine-tune the .gguf (or the alias smollm2-135m), or export the merged model with slimlm export",
        )
    tokenizer = base.tokenizer
    fingerprint = base_fingerprint(base.model)
    with stage("reading the data"):
        rows, held = heldout_rows(tokenizer, read_rows(data, tokenizer, settings.seqlen), eval_data, settings)
    augmentation = None
    if settings.augment:  # the training split only, before the canaries: the teacher never sees held-out rows
        from slimlm.finetune.augment import augment_training

        rows, augmentation = augment_training(rows, base.model, tokenizer, settings, model, allow_pickle)
    canaries = []
    if settings.canaries:
        from slimlm.finetune.canaries import canary_rows, make_canaries

        canaries = make_canaries(settings.canaries, settings.seed)
        rows = concat_rows(rows, canary_rows(canaries, tokenizer, settings.canary_repeats), pad_id_of(tokenizer))
    metrics: dict = {}
    with stage("evaluating the base model on the held-out split"):
        metrics["base"] = heldout_perplexity(base.model, held)
    adapted = apply_method(base.model, settings)
    metrics["trainable_parameters"] = trainable_parameters(adapted)
    metrics["total_parameters"] = sum(p.numel() for p in adapted.parameters())
    config = TrainConfig(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.peak_lr,
        warmup_steps=min(settings.warmup, settings.steps - 1),
        clip_norm=None if settings.private else 1.0,
        seed=settings.seed,
        eval_every=settings.eval_every,
    )
    trained, wrap, privacy = adapted, None, None
    if settings.private:
        from slimlm.finetune.privacy import make_private, plan_privacy

        privacy = plan_privacy(
            len(rows),
            settings.batch_size,
            settings.steps,
            settings.dp_delta,
            settings.max_grad_norm,
            settings.accountant,
            settings.dp_epsilon,
            settings.noise_multiplier,
        )
        trained, wrap = make_private(adapted, privacy, len(rows), settings.seed)
        source = PoissonRows(rows, settings.batch_size, settings.seed)
    else:
        source = ShuffledRows(rows, settings.seed)
    peak_reset = reset_peak_rss()
    start_rss = rss_mb("VmRSS")  # what loading left resident (weights, and heap the loaders freed but kept)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # peak_memory()'s CUDA figure is then the training's
    start = time.perf_counter()
    result = train(
        trained,
        finetune_loss,
        source,
        config,
        eval_fn=lambda m: heldout_perplexity(m, held),
        run={"finetune": _plain(settings)},
        description=f"finetune ({settings.method}{', DP' if privacy else ''})",
        wrap_optimizer=wrap,
    )
    seconds = time.perf_counter() - start
    if privacy is not None:
        trained.remove_hooks()  # Opacus' per-sample hooks: not wanted for evaluation and saving
    with stage("evaluating the fine-tuned model on the held-out split"):
        metrics["finetuned"] = heldout_perplexity(adapted, held)
    metrics.update(
        train_seconds=seconds,
        tokens_per_second=result.tokens_per_second,
        losses=result.losses,
        evaluations=result.evaluations,
        peak_memory=peak_memory(),
        training_peak_rss_mb=rss_mb() if peak_reset else None,
        training_start_rss_mb=start_rss,
        weight_bytes=sum(t.numel() * t.element_size() for t in [*adapted.parameters(), *adapted.buffers()]),
    )
    if privacy is not None:
        metrics["privacy"] = privacy.record(len(rows))
    if canaries:
        from slimlm.finetune.canaries import exposure

        with stage(f"measuring the exposure of {len(canaries)} canaries"):
            metrics["canaries"] = exposure(adapted, tokenizer, canaries, settings.canary_candidates, seed=settings.seed)
    manifest = {
        "base_model": {"source": base.source, "resolved": base.resolved, "kind": base.kind, "fingerprint": fingerprint},
        "method": settings.method,
        "settings": _plain(settings),
        "data": {
            "train": source.describe(),
            "heldout": held.label,
            "heldout_rows": len(held),
            **({"augment": augmentation} if augmentation else {}),
        },
        "metrics": metrics,
    }
    _save(adapted, base, tokenizer, out, manifest, settings, canaries, merge, gguf, overwrite)
    return manifest


def _plain(settings: FinetuneSettings) -> dict:
    return asdict(settings)


def _save(
    adapted: nn.Module,
    base: LoadedModel,
    tokenizer,
    out,
    manifest: dict,
    settings: FinetuneSettings,
    canaries,
    merge: bool,
    gguf: bool,
    overwrite: bool,
) -> None:
    if settings.method == "full":
        save_model(adapted, tokenizer, out, {"finetune": manifest}, overwrite=overwrite)
        (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return
    with atomic_directory(out, overwrite) as staging:
        adapted.save_pretrained(staging)
        _point_at_base(staging, base)
        tokenizer.save_pretrained(staging)
        if canaries:
            (staging / "canaries.json").write_text(json.dumps([asdict(c) for c in canaries], indent=2) + "\n")
        if gguf:
            from slimlm.finetune.gguf_adapter import write_lora_gguf

            manifest["gguf_adapter"] = write_lora_gguf(adapted, staging / "adapter.gguf", base.resolved)
            manifest["gguf_adapter"]["path"] = str(Path(out) / "adapter.gguf")
        if merge:
            merged = adapted.merge_and_unload()
            save_model(
                merged,
                tokenizer,
                staging / "merged",
                {"finetune": {k: manifest[k] for k in ("base_model", "method", "settings")}},
            )
            manifest["merged"] = str(Path(out) / "merged")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _point_at_base(directory: Path, base: LoadedModel) -> None:
    """peft records the base as the model's internal name; record what the user loaded instead."""
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base.resolved
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """The peft model of `model` with the adapter saved in `adapter_dir` (a `slimlm finetune` output), refusing an
    adapter fine-tuned from another base. Quantized bases get the QLoRA layers their adapter was trained with."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    manifest_path = adapter_dir / MANIFEST
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SlimlmError(
            f"'{adapter_dir}' holds no peft adapter (adapter_config.json)",
            "pass the --out directory of slimlm finetune",
        )
    if manifest_path.is_file():
        recorded = json.loads(manifest_path.read_text())["base_model"]
        ours = base_fingerprint(model)
        if recorded["fingerprint"] != ours:
            raise SlimlmError(
                f"the adapter in '{adapter_dir}' was fine-tuned from {recorded['source']} ({_shape(recorded['fingerprint'])}), not from this model ({_shape(ours)})",
                f"load it onto {recorded['source']}",
            )
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        from slimlm.finetune.qlora import register_quantized_lora

        register_quantized_lora(config)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config)


def _shape(fingerprint: dict) -> str:
    return f"{fingerprint['model_type']}, {fingerprint['layers']} layers, width {fingerprint['hidden_size']}, weights {fingerprint['weights']}"
