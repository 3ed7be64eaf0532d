"""Hand a (compressed) model to the engines people run: one file per format.

    hf                  dense Hugging Face checkpoint (quantized linears dequantized)        export/hf.py
    compressed-tensors  transformers + compressed-tensors, vLLM: packed int codes, sparsity   slimlm's own saved format
                                                                                 (slimlm/checkpoint/) with its sparsity_config
    gguf                llama.cpp: F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K, llama.cpp's presets and per-tensor
                        mixtures, 4/5/8-bit codes kept, GPTQ / imatrix codes    export/gguf.py, gguf_types.py, gguf_presets.py,
                                                                                 gguf_calibrated.py

`export_model` loads any model slimlm loads (alias, directory, .gguf, hub id) and writes it atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from slimlm.errors import SlimlmError

FORMATS = ("hf", "compressed-tensors", "gguf")


@dataclass(frozen=True)
class GGUFOptions:
    """How a GGUF file's tensors are typed and rounded (llama-quantize's knobs, plus how codes are chosen)."""

    preset: str | None = (
        None  # q4_0 q4_1 q5_0 q5_1 q8_0 q4_k_m q5_k_m q6_k: llama.cpp's per-tensor mix (beats gguf_type)
    )
    tensor_types: Sequence[str] = ()  # REGEX=TYPE, llama-quantize's --tensor-type; first match wins
    embedding_type: str | None = None  # token_embd.weight
    output_type: str | None = None  # output.weight (token_embd.weight when tied)
    method: str = "rtn"  # rtn: no data; imatrix: importance-weighted rounding; gptq: GPTQ on each type's grid
    calibration: object = None  # CalibrationSettings for imatrix/gptq (default: the run's 32 × 512 tokens)
    exact: dict = field(default_factory=dict)  # GGUF name -> type, after everything above (the API's fine control)

    def __post_init__(self) -> None:
        from slimlm.export.gguf_calibrated import METHODS
        from slimlm.export.gguf_presets import PRESETS

        if self.preset is not None and self.preset not in PRESETS:
            raise SlimlmError(f"unknown GGUF preset '{self.preset}'", f"use one of: {', '.join(PRESETS)}")
        if self.method not in METHODS:
            raise SlimlmError(f"unknown GGUF method '{self.method}'", f"use one of: {', '.join(METHODS)}")

    @property
    def default(self) -> bool:
        """Nothing asked beyond --gguf-type (the calibration settings matter only to imatrix/gptq)."""
        return (
            self.preset,
            tuple(self.tensor_types),
            self.embedding_type,
            self.output_type,
            self.method,
            self.exact,
        ) == (None, (), None, None, "rtn", {})


def auto_gguf_type(model: nn.Module) -> str:
    """The GGUF type that keeps the model's quantized codes (q4_0 over q4_1 for symmetric 4-bit), else f16."""
    from slimlm.export.gguf import CODE_BITS, code_layout_problem
    from slimlm.quantize.linear import QuantizedLinear

    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not quantized:
        return "f16"
    for gguf_type in CODE_BITS:
        if all(code_layout_problem(m.grid, m.in_features, gguf_type) is None for m in quantized):
            return gguf_type
    return "f16"


def _calibrated(loaded, types: dict[str, str], options: GGUFOptions) -> tuple[dict, dict]:
    """Packed GPTQ bytes and importance by GGUF name (both empty for method rtn)."""
    if options.method == "rtn":
        return {}, {}
    from slimlm.data.calibration import sample_calibration
    from slimlm.data.text import load_text
    from slimlm.export.gguf_calibrated import calibrated_codes
    from slimlm.settings import RUN_CALIBRATION

    settings = options.calibration or RUN_CALIBRATION
    text = load_text(settings.data, split="calibration")
    calibration = sample_calibration(loaded.tokenizer, text, settings.samples, settings.seqlen, settings.seed)
    return calibrated_codes(loaded.model, calibration.input_ids, types, options.method)


def _check_gguf_source_config(model: str) -> None:
    """A model directory's architecture is refused from its config.json, before minutes of loading weights."""
    config_path = Path(model).expanduser() / "config.json"
    if not config_path.is_file():
        return  # an alias, a .gguf file (llama.cpp's own architectures) or a hub id: checked once loaded
    from transformers import AutoConfig

    from slimlm.export.gguf import check_gguf_config

    try:
        config = AutoConfig.from_pretrained(config_path.parent, trust_remote_code=False)
    except (ValueError, OSError, KeyError):
        return  # load_model says what is wrong with the directory
    check_gguf_config(config)


def source_gguf(loaded) -> Path | None:
    """The GGUF file the model came from (directly, or as the base of a slimlm directory), if it still exists."""
    if loaded.kind in ("gguf", "alias-gguf"):
        return Path(loaded.resolved)
    if loaded.kind == "slimlm-dir":
        base = loaded.manifest.get("base_model", {})
        if base.get("kind") in ("gguf", "alias-gguf") and Path(base.get("resolved", "")).is_file():
            return Path(base["resolved"])
    return None


def export_model(
    model: str,
    format: str,
    out: str | Path,
    gguf_type: str = "auto",
    overwrite: bool = False,
    allow_pickle: bool = False,
    gguf: GGUFOptions | None = None,
) -> dict:
    """Export `model` to `format` ("hf", "compressed-tensors" or "gguf") at `out` (a directory, or a .gguf file),
    atomically. This is the API's `export` verb (`slimlm.api.export`).

    `gguf_type`: "auto" keeps the model's quantized codes when a GGUF block format holds them (else f16), or one of
    f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k. `gguf`: presets, per-tensor types and calibrated codes
    (`GGUFOptions`). Returns what was written (path, bytes, tensor types and a per-tensor table, codes kept /
    re-quantized).
    """
    from slimlm.checkpoint.atomic import check_output_dir, check_writable
    from slimlm.models.load import load_model

    if format not in FORMATS:
        raise SlimlmError(f"unknown export format '{format}'", f"use one of: {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if format == "gguf":
        from slimlm.export.gguf import GGUF_TYPES

        if gguf_type != "auto" and gguf_type not in GGUF_TYPES:
            raise SlimlmError(f"unknown GGUF type '{gguf_type}'", f"use auto or one of: {', '.join(GGUF_TYPES)}")
        if out.suffix != ".gguf":
            raise SlimlmError(
                f"GGUF output '{out}' does not end in .gguf", "name the output file, e.g. --out model-q4_0.gguf"
            )
        if out.exists() and (not overwrite or out.is_dir()):
            raise SlimlmError(
                f"output '{out}' already exists", "choose another --out, or pass --overwrite to replace the file"
            )
        check_writable(out)
        _check_gguf_source_config(model)
    else:
        check_output_dir(out, overwrite)
    if gguf is not None and not gguf.default and format != "gguf":
        raise SlimlmError(f"GGUF options do not apply to format {format}", "pass them with --format gguf only")
    if format == "gguf" and gguf is not None:
        check_gguf_options(gguf)
    loaded = load_model(model, allow_pickle=allow_pickle, device="cpu")
    return export_loaded(loaded, format, out, gguf_type=gguf_type, overwrite=overwrite, gguf=gguf)


def check_gguf_options(options: GGUFOptions) -> None:
    """Refuse bad type names and regexes before minutes of loading."""
    from slimlm.export.gguf_presets import check_type_name, parse_tensor_type

    for spec in options.tensor_types:
        parse_tensor_type(spec)
    for kind, value in (("--embedding-type", options.embedding_type), ("--output-type", options.output_type)):
        if value is not None:
            check_type_name(value, kind)


def gguf_mixture(model, gguf_type: str, options: GGUFOptions) -> dict:
    """GGUF name -> TypeChoice for every 2-D tensor, from the preset / type, regexes and embedding/output types."""
    from slimlm.export.gguf import tensor_layout
    from slimlm.export.gguf_presets import TypeChoice, parse_tensor_type, resolve_tensor_types

    layout = tensor_layout(model)
    default = options.preset or gguf_type
    if default in ("f16", "bf16"):  # nothing quantized, unless named
        choices = {
            name: TypeChoice(default, f"--gguf-type {default}") for name, shape in layout.items() if len(shape) == 2
        }
        if options.tensor_types or options.embedding_type or options.output_type:
            named = resolve_tensor_types(
                layout,
                "q8_0",
                [parse_tensor_type(spec) for spec in options.tensor_types],
                options.embedding_type,
                options.output_type,
            )
            choices.update({name: choice for name, choice in named.items() if not choice.why.startswith("--gguf-type")})
    else:
        choices = resolve_tensor_types(
            layout,
            default,
            [parse_tensor_type(spec) for spec in options.tensor_types],
            options.embedding_type,
            options.output_type,
            imatrix=options.method != "rtn",
        )
    choices.update({name: TypeChoice(kind, "exact") for name, kind in options.exact.items()})
    return choices


def export_loaded(
    loaded, format: str, out: Path, gguf_type: str = "auto", overwrite: bool = False, gguf: GGUFOptions | None = None
) -> dict:
    """`export_model` for a model already in memory (a `LoadedModel` on the CPU; `compress` hands over the model it
    just saved instead of reading it back). Quantized linears may be dequantized in place (hf)."""
    from slimlm.checkpoint.manifest import callers_part

    result: dict = {"model": loaded.source, "format": format, "path": str(out)}
    if format == "gguf":
        from slimlm.export.gguf import K_QUANTS, write_gguf

        chosen = auto_gguf_type(loaded.model) if gguf_type == "auto" else gguf_type
        recipe = loaded.manifest.get("recipe", {}).get("name")
        name = f"{Path(loaded.resolved).stem}" + (f" ({recipe})" if recipe else "")
        options = gguf or GGUFOptions()
        if options.default and chosen not in K_QUANTS:  # k-quants: llama.cpp's fallbacks, listed
            summary = write_gguf(
                loaded.model, loaded.tokenizer, out, chosen, source_gguf(loaded), name=name, overwrite=overwrite
            )
            why = {}
        else:
            choices = gguf_mixture(loaded.model, chosen, options)
            types = {tensor: choice.type for tensor, choice in choices.items()}
            packed, importance = _calibrated(loaded, types, options)
            summary = write_gguf(
                loaded.model,
                loaded.tokenizer,
                out,
                chosen,
                source_gguf(loaded),
                name=name,
                overwrite=overwrite,
                tensor_types=types,
                importance=importance,
                packed=packed,
                file_type=options.preset,
            )
            why = {tensor: choice.why for tensor, choice in choices.items()}
            result.update(preset=options.preset, method=options.method, gptq_tensors=len(packed))
        for tensor in summary.tensors:
            tensor["why"] = why.get(tensor["name"], "")
        result.update({key: value for key, value in asdict(summary).items() if key != "path"})
        return result
    manifest = callers_part(loaded.manifest)
    manifest["export"] = {
        "format": format,
        "from": {"source": loaded.source, "resolved": loaded.resolved, "kind": loaded.kind},
    }
    if format == "hf":
        from slimlm.export.hf import write_hf

        saved = write_hf(loaded.model, loaded.tokenizer, out, manifest, overwrite)
    else:
        from slimlm.checkpoint.save import save_model
        from slimlm.checkpoint.sparsity import sparsity_config

        saved = save_model(
            loaded.model, loaded.tokenizer, out, manifest, overwrite=overwrite, sparsity=sparsity_config(loaded.model)
        )
    result.update(
        bytes=saved.manifest["storage"]["weight_bytes"], quantized_linears=len(saved.manifest["quantized_linears"])
    )
    return result
