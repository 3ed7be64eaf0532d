"""The compressed-tensors target's search run: `slimlm search --target compressed-tensors` on the driver's machinery
(database of variants, knapsack, re-ranking by true KL, front, report, recipe.yaml), over the codes and file bytes
of `search/compressed_tensors.py`."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from slimlm.checkpoint.save import WEIGHTS
from slimlm.checkpoint.sizes import safetensors_bytes
from slimlm.errors import SlimlmError
from slimlm.search.compressed_tensors import (
    CT_METHODS,
    DENSE,
    STORAGE_DTYPE,
    TARGET,
    CTSizer,
    ct_search_space,
    is_ct_type,
    tensor_entries,
    write_ct_configuration,
)
from slimlm.search.space import Option
from slimlm.settings import CT_SEARCH_TYPES as CT_TYPES
from slimlm.settings import FAST_CT_SEARCH_TYPES as FAST_CT_TYPES


def ct_live_copy(model: nn.Module, database):
    """The re-ranking's live model: a copy whose dense tensors are rounded to the checkpoint's bfloat16."""
    from slimlm.search.rerank import LiveModel, ScoreStore

    live = copy.deepcopy(model).eval()
    with torch.no_grad():
        for tensor in [*live.parameters(), *live.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(STORAGE_DTYPE).to(tensor.dtype))
    return LiveModel(live, database, store=ScoreStore(database.path))


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
        raise SlimlmError(
            f"--types {','.join(unknown)}: not compressed-tensors types", f"use some of: {', '.join(CT_TYPES)}"
        )
    return settings.types


def run_ct_search(
    model: str,
    out: Path,
    constraints,
    settings,
    evaluation,
    database_dir=None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
    extra_budgets: tuple[str, ...] = (),
):
    """Search `model` for the best compressed-tensors checkpoint within `constraints.max_size`; write it to DIR
    (config.json, model.safetensors, tokenizer, slimlm.json) with DIR/{recipe.yaml, front.json, report.html}."""
    import time
    from dataclasses import asdict

    from slimlm.checkpoint.atomic import check_output_dir
    from slimlm.models.load import load_model
    from slimlm.progress import plain_line, stage
    from slimlm.search.driver import (
        Point,
        Searcher,
        SearchResult,
        _choose,
        _metrics,
        distinct_budgets,
        evaluate_points,
        search_basis,
        searched_line,
        searched_name,
    )
    from slimlm.search.report import write_search_report
    from slimlm.settings import parse_bytes

    started = time.perf_counter()
    if constraints.min_decode_tps is not None or constraints.max_ram is not None:
        raise SlimlmError(
            "--min-decode-tps / --max-ram are measured in llama.cpp: the compressed-tensors target has no cost model",
            "drop them, or search --target gguf",
        )
    out = Path(out)
    check_output_dir(out, overwrite)
    base = load_model(model, allow_pickle=allow_pickle, device=device)
    base.model.eval()
    space = ct_search_space(
        base.model, _ct_types(settings), tuple(m for m in settings.methods if m in CT_METHODS) or CT_METHODS
    )
    basis = search_basis(base, space, settings, database_dir, default_ct_database)
    database, stages, depth = basis.database, basis.stages, basis.depth
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
    budgets = distinct_budgets(
        {
            *(_ct_limit(b, uniform_sizes, parse_bytes) for b in extra_budgets),
            *(s for s in uniform_sizes.values() if smallest <= s < limit),
        },
        limit,
    )
    searcher.capacity = max(budgets)
    points = []
    with stage("search: knapsack + re-ranking"):
        for budget in budgets:
            generations = settings.generations if budget == limit else settings.front_generations
            configuration, proxy, knapsack_kl, reranked_kl, ran = searcher.search(
                budget, [c for _, _, c in uniform], generations
            )
            name = searched_name(budget)
            plain_line(searched_line(name, knapsack_kl, reranked_kl, ran, generations, settings.patience))
            points.append(
                Point(
                    name,
                    "searched",
                    configuration,
                    sizer(configuration),
                    proxy,
                    reranked_kl,
                    budget=budget,
                    note=f"knapsack answer's KL {knapsack_kl:.4f}",
                )
            )
    points.extend(Point(name, kind, configuration, sizer(configuration)) for name, kind, configuration in uniform)
    base_quality, windows, reference = evaluate_points(base, points, live, evaluation, stages[1], limit)
    chosen = _choose(points, limit, constraints)
    manifest = {
        "recipe": {"search": TARGET, "point": chosen.name},
        "source": {"model": base.source},
        "metrics": chosen.metrics,
    }
    with stage(f"search: writing the checkpoint {out}"):
        write_ct_configuration(
            base.model, base.tokenizer, chosen.configuration, database, out, manifest, overwrite=overwrite
        )
        written = (out / WEIGHTS).stat().st_size
        if written != chosen.file_bytes:
            raise SlimlmError(
                f"the written model.safetensors has {written} bytes, the search counted {chosen.file_bytes}",
                "report this as a bug in slimlm's compressed-tensors byte accounting",
            )
    everything = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    base_entries = [e for e in sizer.layout(()).fixed] + [
        e for k in space.knobs for e in tensor_entries(k.module, Option(DENSE, "ref"), k.shape)
    ]
    base_point = Point("base (bfloat16)", "base", None, safetensors_bytes(base_entries), metrics=_metrics(base_quality))
    context = {
        "model": {"source": base.source, "resolved": base.resolved},
        "target": TARGET,
        "constraints": asdict(constraints),
        "budget_bytes": limit,
        "budget_counts": "model.safetensors (header included); config.json, tokenizer and slimlm.json are not budgeted",
        "checkpoint_directory_bytes": everything,
        "settings": asdict(settings) | {"types": list(_ct_types(settings))},
        **basis.context(),
        "evaluation": {"protocol": windows.protocol(), "kl": reference.describe() if reference else None},
        "depth": [{"block": b, "kl": kl} for b, kl in depth],
        "sparsity": "not searched: vLLM and compressed-tensors > 0.14 no longer read sparse-compressed layouts",
        "seconds": round(time.perf_counter() - started, 1),
    }
    result = SearchResult(out, chosen, [base_point, *points], basis.info, context)
    write_search_report(result, database)
    return result


def _ct_limit(max_size: str | None, uniform_sizes: dict[str, int], parse_bytes) -> int:
    """Bytes of --max-size: a size, or a uniform point's name (int4-g32/gptq) for its size; default int4-g64/gptq."""
    key = (max_size or "int4-g64/gptq").strip().lower()
    if key in uniform_sizes:
        return uniform_sizes[key]
    if max_size is None:
        raise SlimlmError(
            "no --max-size given and the search has no uniform int4-g64/gptq point to size it by",
            "pass --max-size, e.g. 120MB",
        )
    return parse_bytes(max_size, "--max-size")
