"""The compressed-tensors target of `slimlm search`: a checkpoint that loads in transformers + compressed-tensors
and in vLLM, searched per block linear under a byte budget by the machinery of the GGUF target (database of
variants, knapsack, re-ranking by true KL, front, report, recipe.yaml).

    types   int{4,8}-g{32,64,128} / int{4,8}-channel, symmetric, or with "-asym" an int zero point per group:
            compressed-tensors' `pack-quantized` W4A16 / W8A16 (codes packed in int32 along the input, fp16 scales
            (out, groups), int32-packed zero points, an int64 weight_shape); "dense": the linear kept in bfloat16.
            Asymmetric types are searched only when --types names them: vLLM reads their zero points, but
            transformers 5.23 + compressed-tensors 0.20 refuse them (vllm-project/llm-compressor#1618)
    method  gptq  GPTQ's error feedback on the type's grid (the search's Hessians, act-order, clipped ranges)
            rtn   min/max round-to-nearest: what llm-compressor's QuantizationModifier writes; always encoded
                  (the uniform baselines), and searchable
            ref   for "dense" only: the weight as it is

The token embedding and an untied output head stay dense (bfloat16): compressed-tensors quantizes linears, and
neither vLLM nor transformers reads a quantized embedding from it. So do norms and biases. Blocks may be removed
whole (depth pruning) as for GGUF.

The budget counts the weights file, model.safetensors, exactly: 8 bytes of length, the JSON header (one entry per
tensor, padded with spaces to 8 bytes) and every tensor's data; config.json and the tokenizer files beside it are
reported, not budgeted. The file's dense tensors are bfloat16, so the live model the search scores holds every
dense tensor rounded to bfloat16 (SmolLM2's weights are bfloat16: nothing changes).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quantize.grid import QuantGrid
from slimlm.search.space import Knob, Option, SearchSpace
from slimlm.settings import CT_SEARCH_TYPES as CT_TYPES
from slimlm.settings import FAST_CT_SEARCH_TYPES as FAST_CT_TYPES

TARGET = "compressed-tensors"
DENSE = "dense"
STORAGE_DTYPE = torch.bfloat16  # of every dense tensor in the written checkpoint
CT_METHODS = ("gptq", "rtn")
# safetensors writes tensors by dtype (its enum, largest first), then by name; offsets follow that order.
_DTYPE_RANK = {"I64": 18, "F32": 15, "I32": 13, "BF16": 12, "F16": 11, "I8": 5, "U8": 4, "BOOL": 0}
_ST_DTYPE = {torch.int64: "I64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_ST_BYTES = {"I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_OFFSET_DIGITS = 12  # an entry's offsets are counted at this width for the knapsack's upper bound (files < 1 TB)


def is_ct_type(type_: str) -> bool:
    return type_ == DENSE or type_.startswith("int")


def ct_grid(type_: str) -> QuantGrid | None:
    """'int4-g32-asym' -> QuantGrid(4, 32, False); 'dense' -> None."""
    if type_ == DENSE:
        return None
    parts = type_.split("-")
    try:
        bits = int(parts[0].removeprefix("int"))
        group = None if parts[1] == "channel" else int(parts[1].removeprefix("g"))
    except (ValueError, IndexError):
        raise SlimlmError(f"'{type_}' is not a compressed-tensors type", f"use some of: {', '.join(CT_TYPES)}") from None
    if bits not in (4, 8) or parts[2:] not in ([], ["asym"]):
        raise SlimlmError(f"'{type_}' is not a compressed-tensors type", f"use some of: {', '.join(CT_TYPES)}")
    return QuantGrid(bits, group, symmetric=parts[2:] != ["asym"])


def ct_options(shape: tuple[int, int], types: tuple[str, ...], methods: tuple[str, ...]) -> tuple[Option, ...]:
    """Every (type, method) with a group size dividing the rows; RTN always (the baselines), dense as `ref`."""
    options = []
    for type_ in types:
        grid = ct_grid(type_)
        if grid is None:
            options.append(Option(DENSE, "ref"))
        elif grid.group_size is None or shape[1] % grid.group_size == 0:
            options.extend(Option(type_, m) for m in CT_METHODS if m in methods or m == "rtn")
    return tuple(options)


def ct_search_space(model: nn.Module, types: tuple[str, ...] | None = None, methods: tuple[str, ...] = CT_METHODS) -> SearchSpace:
    """One knob per decoder-block linear (named by its HF module); the embedding and head are not searched."""
    from slimlm.models.adapters import adapter_for, decoder_blocks, linear_weight

    types = types or CT_TYPES
    for type_ in types:
        ct_grid(type_)  # refuse an unknown type up front
    adapter = adapter_for(model)
    knobs = []
    for index in range(len(decoder_blocks(model))):
        for rel in adapter.linears():
            module = f"{adapter.blocks}.{index}.{rel}"
            shape = tuple(linear_weight(model.get_submodule(module)).shape)
            options = ct_options(shape, types, methods)
            if not options:
                raise SlimlmError(f"{module} {shape}: no searched type's group size divides {shape[1]}", f"search other --types, e.g. {DENSE} or int4-channel")
            shared = next((group[0] for group in adapter.shared_inputs if rel in group), rel)
            knobs.append(Knob(module, module, index, shape, options, shared=shared))
    return SearchSpace(TARGET, tuple(knobs))


# --- one tensor: codes in the database, entries in the file --------------------------------------------------------


def ct_encode(weight: torch.Tensor, option: Option, hessian: torch.Tensor | None) -> np.ndarray:
    """weight (out, in) -> uint8 payload: codes int8 (out·in) | scale fp16 (out·groups) | zero point int8 (asym);
    for dense, the bfloat16 weight's bytes."""
    grid = ct_grid(option.type)
    w = weight.detach().float().cpu()
    if grid is None:
        return w.to(STORAGE_DTYPE).view(torch.int16).numpy().view(np.uint8).reshape(-1).copy()
    if option.method == "gptq":
        from slimlm.export.gguf_types import GGUF_GPTQ_DAMP
        from slimlm.quantize.gptq import gptq_quantize
        from slimlm.quantize.grid import shrink_ratios

        codes, scale, zero_point = gptq_quantize(w, hessian, grid, dampening=GGUF_GPTQ_DAMP, clip_ratios=shrink_ratios())
    else:
        from slimlm.quantize.rtn import rtn_quantize

        codes, scale, zero_point = rtn_quantize(w, grid)
    parts = [codes.to(torch.int8).numpy().view(np.uint8).reshape(-1), scale.to(torch.float16).numpy().view(np.uint8).reshape(-1)]
    if zero_point is not None:
        parts.append(zero_point.to(torch.int8).numpy().view(np.uint8).reshape(-1))
    return np.concatenate(parts)


def ct_unpack(data: np.ndarray, option: Option, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The payload of `ct_encode` -> (codes int8 (out, in), scale fp16 (out, groups), zero point int8 | None)."""
    grid = ct_grid(option.type)
    out_features, in_features = shape
    groups = grid.group_count(in_features)
    data = np.ascontiguousarray(data).reshape(-1)
    n, s = out_features * in_features, out_features * groups * 2
    codes = torch.from_numpy(data[:n].view(np.int8).copy()).reshape(shape)
    scale = torch.from_numpy(data[n : n + s].view(np.float16).copy()).reshape(out_features, groups)
    zero_point = None if grid.symmetric else torch.from_numpy(data[n + s : n + s + out_features * groups].view(np.int8).copy()).reshape(out_features, groups)
    return codes, scale, zero_point


def ct_decode(data: np.ndarray, option: Option, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 weight the checkpoint's layer computes with: (q − z)·s, or the bfloat16 weight."""
    from slimlm.quantize.grid import dequantize

    if option.type == DENSE:
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16).copy()).view(STORAGE_DTYPE).reshape(shape).float()
    codes, scale, zero_point = ct_unpack(data, option, shape)
    return dequantize(codes, scale, zero_point, torch.float32)


def tensor_entries(module: str, option: Option, shape: tuple[int, int]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of what the file holds for one linear's weight (its bias is fixed)."""
    grid = ct_grid(option.type)
    out_features, in_features = shape
    if grid is None:
        return [(f"{module}.weight", _ST_DTYPE[STORAGE_DTYPE], shape)]
    groups = grid.group_count(in_features)
    entries = [
        (f"{module}.weight_packed", "I32", (out_features, math.ceil(in_features * grid.bits / 32))),
        (f"{module}.weight_scale", "F16", (out_features, groups)),
        (f"{module}.weight_shape", "I64", (2,)),
    ]
    if not grid.symmetric:
        entries.append((f"{module}.weight_zero_point", "I32", (math.ceil(out_features * grid.bits / 32), groups)))
    return entries


def _data_bytes(entry: tuple[str, str, tuple[int, ...]]) -> int:
    return _ST_BYTES[entry[1]] * math.prod(entry[2])


def _entry_json(name: str, dtype: str, shape: tuple[int, ...], start: int, end: int) -> str:
    return f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":[{",".join(map(str, shape))}],"data_offsets":[{start},{end}]}}'


def variant_bytes(module: str, option: Option, shape: tuple[int, int]) -> int:
    """Data bytes plus the header entries at the widest offsets: ≥ what the variant adds to any file."""
    wide = 10**_OFFSET_DIGITS - 1
    return sum(_data_bytes(e) + len(_entry_json(e[0], e[1], e[2], wide, wide)) + 1 for e in tensor_entries(module, option, shape))


def safetensors_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> int:
    """Exact size of the safetensors file holding `entries`, as safetensors (Rust) lays it out."""
    ordered = sorted(entries, key=lambda e: (-_DTYPE_RANK[e[1]], e[0]))
    parts, offset = [f'"__metadata__":{json.dumps(metadata, separators=(",", ":"))}'], 0
    for name, dtype, shape in ordered:
        size = _data_bytes((name, dtype, shape))
        parts.append(_entry_json(name, dtype, shape, offset, offset + size))
        offset += size
    header = len("{" + ",".join(parts) + "}")
    return 8 + -(-header // 8) * 8 + offset


# --- file bytes of a configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CTLayout:
    """What a checkpoint with `removed` blocks holds beside the searched weights (the `artifact.Layout` contract)."""

    removed: tuple[int, ...]
    header_bytes: int  # length + metadata + the fixed tensors' header entries at the widest offsets + padding
    fixed_bytes: int  # data of the fixed tensors (embedding, norms, biases, untied head) in the file's dtypes
    fixed: tuple[tuple[str, str, tuple[int, ...]], ...]  # their entries, at the file's names


def renamed(module: str, removed: tuple[int, ...], blocks: str) -> str:
    """An HF module name at the base's block numbering -> its name in a model without the `removed` blocks."""
    if not module.startswith(blocks + "."):
        return module
    index, _, rest = module.removeprefix(blocks + ".").partition(".")
    index = int(index)
    return f"{blocks}.{index - sum(r < index for r in removed)}.{rest}"


class CTSizer:
    """Exact model.safetensors bytes of any configuration (the driver's `Sizer` contract)."""

    metadata = {"format": "pt"}

    def __init__(self, model: nn.Module, database):
        from slimlm.models.adapters import adapter_for

        self.model, self.database = model, database
        self.blocks = adapter_for(model).blocks
        self.layouts: dict[tuple[int, ...], CTLayout] = {}
        self.entries: dict[tuple[str, int, tuple[int, ...]], list] = {}

    def layout(self, removed: tuple[int, ...]) -> CTLayout:
        if removed not in self.layouts:
            from slimlm.models.save import _weight_tensors

            searched = {k.module + ".weight" for k in self.database.space.knobs}
            fixed = []
            for name, tensor in _weight_tensors(self.model).items():
                if name in searched or name.startswith(tuple(f"{self.blocks}.{b}." for b in removed)):
                    continue
                dtype = _ST_DTYPE[STORAGE_DTYPE] if tensor.is_floating_point() else _ST_DTYPE[tensor.dtype]
                fixed.append((renamed(name, removed, self.blocks), dtype, tuple(tensor.shape)))
            wide = 10**_OFFSET_DIGITS - 1
            header = 8 + len(f'{{"__metadata__":{json.dumps(self.metadata, separators=(",", ":"))}}}') + 7
            header += sum(len(_entry_json(n, d, s, wide, wide)) + 1 for n, d, s in fixed)
            self.layouts[removed] = CTLayout(removed, header, sum(map(_data_bytes, fixed)), tuple(fixed))
        return self.layouts[removed]

    def _entries(self, knob: Knob, index: int, removed: tuple[int, ...]) -> list:
        key = (knob.tensor, index, removed)
        if key not in self.entries:
            option = self.database.variants[knob.tensor][index].option
            self.entries[key] = tensor_entries(renamed(knob.module, removed, self.blocks), option, knob.shape)
        return self.entries[key]

    def __call__(self, configuration) -> int:
        entries = list(self.layout(configuration.removed).fixed)
        for knob, index in zip(self.database.space.knobs, configuration.choice):
            if knob.block not in configuration.removed:
                entries.extend(self._entries(knob, index, configuration.removed))
        return safetensors_bytes(entries, self.metadata)


# --- the live model and the written checkpoint ---------------------------------------------------------------------


def ct_live_copy(model: nn.Module, database):
    """The re-ranking's live model: a copy whose dense tensors are rounded to the checkpoint's bfloat16."""
    from slimlm.search.rerank import LiveModel

    live = copy.deepcopy(model).eval()
    with torch.no_grad():
        for tensor in [*live.parameters(), *live.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(STORAGE_DTYPE).to(tensor.dtype))
    return LiveModel(live, database)


def checkpoint_model(model: nn.Module, removed: tuple[int, ...], payloads: dict[str, tuple[Option, np.ndarray]]) -> nn.Module:
    """The model the checkpoint holds: `removed` blocks gone, dense tensors bfloat16, each searched linear (HF module
    at the base's numbering -> option, payload) a QuantizedLinear of those codes (the file holds what was scored)."""
    from slimlm.models.adapters import adapter_for, linear_weight, set_linear_weight_
    from slimlm.models.swap import replace_module_
    from slimlm.quantize.linear import QuantizedLinear
    from slimlm.search.artifact import pruned_copy

    blocks = adapter_for(model).blocks
    pruned = pruned_copy(model, removed).to(STORAGE_DTYPE).eval()
    for module_name, (option, data) in payloads.items():
        name = renamed(module_name, removed, blocks)
        module = pruned.get_submodule(name)
        shape = tuple(linear_weight(module).shape)
        if option.type == DENSE:
            set_linear_weight_(module, ct_decode(data, option, shape).to(linear_weight(module).dtype))
            continue
        codes, scale, zero_point = ct_unpack(data, option, shape)
        bias = module.bias.detach() if module.bias is not None else None
        replace_module_(pruned, name, QuantizedLinear(codes, scale, zero_point, ct_grid(option.type), bias, STORAGE_DTYPE))
    return pruned


def write_ct_checkpoint(model: nn.Module, tokenizer, removed: tuple[int, ...], payloads: dict[str, tuple[Option, np.ndarray]], out: Path, manifest: dict, overwrite: bool = False) -> Path:
    from slimlm.models.save import save_model

    return save_model(checkpoint_model(model, removed, payloads), tokenizer, out, manifest, overwrite=overwrite)


def write_ct_configuration(model: nn.Module, tokenizer, configuration, database, out: Path, manifest: dict, overwrite: bool = False) -> Path:
    return write_ct_checkpoint(model, tokenizer, configuration.removed, database.chosen(configuration), out, manifest, overwrite)


def default_ct_database(model: nn.Module, calibration_sha: str) -> Path:
    """Beside the GGUF target's database, in its own directory (a database holds one target's variants)."""
    from slimlm.search.driver import default_database

    path = default_database(model, calibration_sha)
    return path.with_name(path.name + "-ct")


# --- the search ------------------------------------------------------------------------------------------------


def ct_baselines(database) -> list[tuple[str, str, object]]:
    """One uniform point per searched type × method that every block linear holds (rtn: llm-compressor's W4A16 /
    W8A16 min/max scheme)."""
    from slimlm.search.driver import uniform_configuration

    found = []
    options = sorted({v.option for vs in database.variants.values() for v in vs if v.option.type != DENSE})
    for option in options:
        configuration = uniform_configuration(database, option, option)
        if configuration is not None:
            found.append((f"uniform {option.label}", "uniform", configuration))
    return found


def _ct_types(settings) -> tuple[str, ...] | None:
    """The searched types: the settings' own when they name compressed-tensors types; the GGUF presets' defaults
    (what `SearchSettings` carries unless told) mean this target's defaults."""
    from slimlm.settings import DEFAULT_SEARCH, FAST_SEARCH

    if settings.types is None or settings.types == DEFAULT_SEARCH.types:
        return CT_TYPES
    if settings.types == FAST_SEARCH.types:
        return FAST_CT_TYPES
    unknown = [t for t in settings.types if not is_ct_type(t)]
    if unknown:
        raise SlimlmError(f"--types {','.join(unknown)}: not compressed-tensors types", f"use some of: {', '.join(CT_TYPES)}")
    return settings.types


def run_ct_search(model: str, out: Path, constraints, settings, evaluation, database_dir=None, overwrite: bool = False, allow_pickle: bool = False, device: str | None = None, extra_budgets: tuple[str, ...] = ()):
    """Search `model` for the best compressed-tensors checkpoint within `constraints.max_size`; write it to DIR
    (config.json, model.safetensors, tokenizer, slimlm.json) with DIR/{recipe.yaml, front.json, report.html}."""
    import time
    from dataclasses import asdict

    from slimlm.data.calibration import ids_sha256, sample_calibration
    from slimlm.data.text import load_text
    from slimlm.evaluate.perplexity import evaluate_quality, make_windows
    from slimlm.models.load import load_model
    from slimlm.models.save import check_output_dir
    from slimlm.progress import plain_line, stage
    from slimlm.search.database import build_database
    from slimlm.search.database import describe as describe_database
    from slimlm.search.driver import (
        Point,
        Searcher,
        SearchResult,
        _choose,
        _metrics,
        _stages,
        depth_candidates,
        searched_line,
        searched_name,
    )
    from slimlm.search.report import write_search_report
    from slimlm.search.statistics import collect_statistics
    from slimlm.settings import parse_bytes

    started = time.perf_counter()
    if constraints.min_decode_tps is not None or constraints.max_ram is not None:
        raise SlimlmError("--min-decode-tps / --max-ram are measured in llama.cpp: the compressed-tensors target has no cost model", "drop them, or search --target gguf")
    out = Path(out)
    check_output_dir(out, overwrite)
    base = load_model(model, allow_pickle=allow_pickle, device=device)
    base.model.eval()
    space = ct_search_space(base.model, _ct_types(settings), tuple(m for m in settings.methods if m in CT_METHODS) or CT_METHODS)
    stats = settings.statistics
    drawn = sample_calibration(base.tokenizer, load_text(stats.data, "calibration"), stats.samples + settings.rerank_windows, stats.seqlen, stats.seed)
    statistics_ids, rerank_ids = drawn.input_ids[: stats.samples], drawn.input_ids[stats.samples :]
    database_path = Path(database_dir) if database_dir else default_ct_database(base.model, ids_sha256(statistics_ids))
    with stage("search: database of tensor variants"):
        database = build_database(database_path, base.model, space, lambda: collect_statistics(base.model, statistics_ids, seed=settings.seed), ids_sha256(statistics_ids))
    db_info = describe_database(database)
    plain_line(f"search: database {db_info['knobs']} tensors × {len(db_info['options'])} options, {db_info['bytes'] / 1e6:.1f} MB on disk at {database_path}")
    stages = _stages(base.model, rerank_ids, base.tokenizer)
    with stage("search: depth candidates"):
        depth = depth_candidates(base.model, statistics_ids, stages[1], settings.depth_candidates, database_path / f"depth-{settings.depth_candidates}.json")
    live = ct_live_copy(base.model, database)
    sizer = CTSizer(base.model, database)
    searcher = Searcher(database, live, sizer, stages, depth, settings, capacity=0)
    uniform = ct_baselines(database)
    uniform_sizes = {name.removeprefix("uniform ").lower(): sizer(c) for name, _, c in uniform}
    limit = _ct_limit(constraints.max_size, uniform_sizes, parse_bytes)
    smallest, smallest_removed = searcher.smallest()
    if limit < smallest:
        raise SlimlmError(
            f"--max-size {limit / 1e6:.2f} MB is below the smallest checkpoint this search reaches: about {smallest / 1e6:.2f} MB (blocks {list(smallest_removed)} removed)",
            "raise --max-size, allow more removable blocks (--depth-candidates), or search smaller types (--types)",
        )
    budgets = sorted({limit, *(_ct_limit(b, uniform_sizes, parse_bytes) for b in extra_budgets), *(s for s in uniform_sizes.values() if smallest <= s < limit)})
    searcher.capacity = max(budgets)
    points = []
    with stage("search: knapsack + re-ranking"):
        for budget in budgets:
            generations = settings.generations if budget == limit else settings.front_generations
            configuration, proxy, knapsack_kl, reranked_kl, ran = searcher.search(budget, [c for _, _, c in uniform], generations)
            name = searched_name(budget)
            plain_line(searched_line(name, knapsack_kl, reranked_kl, ran, generations, settings.patience))
            points.append(Point(name, "searched", configuration, sizer(configuration), proxy, reranked_kl, budget=budget, note=f"knapsack answer's KL {knapsack_kl:.4f}"))
    points.extend(Point(name, kind, configuration, sizer(configuration)) for name, kind, configuration in uniform)
    with stage("search: held-out evaluation of every point"):
        windows = make_windows(base.tokenizer, load_text(evaluation.data, evaluation.split), evaluation.seqlen, evaluation.max_windows)
        base_quality, reference = evaluate_quality(base.model, windows, keep_reference=evaluation.kl_windows, progress=False)
        for point in points:
            point.metrics = _metrics(live.quality(point.configuration, windows, reference))
            if point.rerank_kl is None:
                point.rerank_kl = live.kl(point.configuration, stages[1].windows, stages[1].reference)
    chosen = _choose(points, limit, constraints)
    manifest = {"recipe": {"search": TARGET, "point": chosen.name}, "source": {"model": base.source}, "metrics": chosen.metrics}
    with stage(f"search: writing the checkpoint {out}"):
        write_ct_configuration(base.model, base.tokenizer, chosen.configuration, database, out, manifest, overwrite=overwrite)
        written = (out / "model.safetensors").stat().st_size
        if written != chosen.file_bytes:
            raise SlimlmError(f"the written model.safetensors has {written} bytes, the search counted {chosen.file_bytes}", "report this as a bug in slimlm's compressed-tensors byte accounting")
    everything = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    base_entries = [e for e in sizer.layout(()).fixed] + [e for k in space.knobs for e in tensor_entries(k.module, Option(DENSE, "ref"), k.shape)]
    base_point = Point("base (bfloat16)", "base", None, safetensors_bytes(base_entries, CTSizer.metadata), metrics=_metrics(base_quality))
    context = {
        "model": {"source": base.source, "resolved": base.resolved},
        "target": TARGET,
        "constraints": asdict(constraints),
        "budget_bytes": limit,
        "budget_counts": "model.safetensors (header included); config.json, tokenizer and slimlm.json are not budgeted",
        "checkpoint_directory_bytes": everything,
        "settings": asdict(settings) | {"types": list(_ct_types(settings))},
        "statistics": {"windows": int(statistics_ids.shape[0]), "seqlen": int(statistics_ids.shape[1]), "source": drawn.source, "sha256": ids_sha256(statistics_ids)},
        "rerank": {"windows": int(rerank_ids.shape[0]), "seqlen": int(rerank_ids.shape[1]), "held_out_from": "the statistics windows (other offsets of the same calibration text)"},
        "evaluation": {"protocol": windows.protocol(), "kl": reference.describe() if reference else None},
        "depth": [{"block": b, "kl": kl} for b, kl in depth],
        "sparsity": "not searched: vLLM and compressed-tensors > 0.14 no longer read sparse-compressed layouts",
        "seconds": round(time.perf_counter() - started, 1),
    }
    result = SearchResult(out, chosen, [base_point, *points], db_info, context)
    write_search_report(result, database)
    return result


def _ct_limit(max_size: str | None, uniform_sizes: dict[str, int], parse_bytes) -> int:
    """Bytes of --max-size: a size, or a uniform point's name (int4-g32/gptq) for its size; default int4-g64/gptq."""
    key = (max_size or "int4-g64/gptq").strip().lower()
    if key in uniform_sizes:
        return uniform_sizes[key]
    if max_size is None:
        raise SlimlmError("no --max-size given and the search has no uniform int4-g64/gptq point to size it by", "pass --max-size, e.g. 120MB")
    return parse_bytes(max_size, "--max-size")
