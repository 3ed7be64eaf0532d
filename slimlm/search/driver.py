"""`slimlm search`: from a user's constraints to the best deployable file, with the measured front around it.

statistics (1 forward + backward)  ->  database of tensor variants (disk, resumable)  ->  depth candidates
->  exact knapsack on the additive proxy, per number of removed blocks  ->  re-ranking by true KL (EvoPress)
->  every front point and baseline measured on held-out text  ->  the chosen file written, its bytes checked
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.progress import plain_line, progress_bar, stage
from slimlm.search.artifact import Layout, file_bytes, measure_layout, padded, write_configuration
from slimlm.search.database import Database, build_database
from slimlm.search.rerank import (
    MIN_GAIN,
    Configuration,
    LiveModel,
    Stage,
    blocks_skipped,
    describe_configuration,
    live_copy,
    rerank,
    searchable_variants,
)
from slimlm.search.solver import knapsack
from slimlm.search.space import Option, gguf_search_space
from slimlm.search.speed import Pricer, measure_points_decode, require_llama_cpp
from slimlm.settings import Constraints, EvalSettings, SearchSettings, parse_bytes

PENALTY_START, PENALTY_MAX, PENALTY_BISECTIONS = 1e-4, 1e4, 6  # the speed / RAM multiplier's search (proxy KL units)
PRESET_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # llama.cpp's uniform presets this search places on its front
EMBEDDING_AT_8_BITS = ("q4_0", "q4_1", "q5_0", "q5_1")  # llama-quantize keeps the (tied) output at Q8_0 for these


@dataclass
class Point:
    """One configuration on the front or among the baselines."""

    name: str
    kind: str  # "searched", "uniform" (slimlm's codes), "preset" (llama.cpp's reference quantizer), "base"
    configuration: Configuration | None
    file_bytes: int
    proxy_kl: float | None = None  # the knapsack's additive estimate
    # true KL on the held-out calibration windows: the searched points, and the baselines within the chosen budget
    rerank_kl: float | None = None
    metrics: dict = field(default_factory=dict)  # held-out evaluation: perplexity, kl_divergence, top1_agreement
    budget: int | None = None
    note: str = ""

    def to_dict(self, database: Database | None) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "configuration"}
        if self.configuration is not None and database is not None:
            data["removed_blocks"] = list(self.configuration.removed)
            data["tensors"] = describe_configuration(self.configuration, database)
            counts: dict[str, int] = {}
            for label in data["tensors"].values():
                counts[label] = counts.get(label, 0) + 1
            data["option_counts"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        return data


def distinct_budgets(budgets: set[int], chosen: int) -> list[int]:
    """The front's budgets, one per name (`searched_name`): a budget within rounding of the chosen one (a --max-size
    of a preset's exact bytes, 105,454,080 against its layout's 105,45x,xxx) would print as a second point of the
    same name and write the same front file; the chosen budget is the one kept."""
    kept = {searched_name(chosen): chosen}
    for budget in sorted(budgets):
        kept.setdefault(searched_name(budget), budget)
    return sorted(kept.values())


def searched_name(budget: int) -> str:
    """A searched point's name: its budget, with the digits that tell a front's budgets apart."""
    return f"searched ≤ {budget / 1e6:.1f} MB" if budget >= 1e7 else f"searched ≤ {budget / 1e3:.1f} kB"


def searched_line(
    name: str, knapsack_kl: float, reranked_kl: float, generations: int, asked: int, patience: int
) -> str:
    """The plain progress line of one searched budget (`generations` run of the `asked`)."""
    if asked == 0:
        return f"search: {name}: knapsack KL {knapsack_kl:.4f} -> best seed {reranked_kl:.4f}"
    if reranked_kl > 0:
        stopped = (
            f" of {asked} generations: the last {patience} gained less than {MIN_GAIN:.0%}"
            if generations < asked
            else " generation" + "s" * (generations != 1)
        )
        return f"search: {name}: knapsack KL {knapsack_kl:.4f} -> re-ranked {reranked_kl:.4f} ({generations}{stopped})"
    return f"search: {name}: knapsack KL {knapsack_kl:.4f} -> {reranked_kl:.4f}, the base's own logits (re-ranking stopped)"


@dataclass
class SearchResult:
    out: Path
    chosen: Point
    points: list[Point]
    database: dict
    context: dict

    def to_dict(self) -> dict:
        return {"chosen": self.chosen.name, "context": self.context, "database": self.database}


# --- sizes and baselines -----------------------------------------------------------------------------------------


class Sizer:
    """Exact file bytes of any configuration: layout (header + fixed tensors) per removal set + padded variants."""

    def __init__(self, model: nn.Module, tokenizer, source_gguf: Path | None, database: Database):
        self.model, self.tokenizer, self.source, self.database = model, tokenizer, source_gguf, database
        self.layouts: dict[tuple[int, ...], Layout] = {}
        self.searched = {k.tensor for k in database.space.knobs}

    def layout(self, removed: tuple[int, ...]) -> Layout:
        if removed not in self.layouts:
            self.layouts[removed] = measure_layout(self.model, self.tokenizer, self.source, removed, self.searched)
        return self.layouts[removed]

    def __call__(self, configuration: Configuration) -> int:
        layout = self.layout(configuration.removed)
        variants = self.database.variants
        return (
            layout.header_bytes
            + layout.fixed_bytes
            + sum(
                padded(variants[k.tensor][i].bytes)
                for k, i in zip(self.database.space.knobs, configuration.choice)
                if k.block not in configuration.removed
            )
        )


def _index(database: Database, tensor: str, option: Option) -> int | None:
    for i, variant in enumerate(database.variants[tensor]):
        if variant.option == option:
            return i
    return None


def uniform_configuration(database: Database, linear: Option, embedding: Option) -> Configuration | None:
    """Every block linear at `linear`, the embedding (and untied head) at `embedding`; None if a tensor lacks it."""
    choice = []
    for knob in database.space.knobs:
        index = _index(database, knob.tensor, linear if knob.role == "linear" else embedding)
        if index is None:
            return None
        choice.append(index)
    return Configuration(tuple(choice))


MIXED_PRESETS = ("q4_k_m", "q5_k_m", "q6_k")  # llama.cpp's per-tensor mixes, placed by `gguf_presets`


def preset_configuration(database: Database, tensor_types: dict[str, str]) -> Configuration | None:
    """llama.cpp's per-tensor layout, each tensor by the reference quantizer where the gguf package has one, else
    slimlm's rounding of that type (k-quants); None when the database lacks a tensor's type."""
    choice = []
    for knob in database.space.knobs:
        type_ = tensor_types.get(knob.tensor)
        index = next(
            (
                i
                for method in ("ref", "rtn", "gptq")
                if (i := _index(database, knob.tensor, Option(type_, method))) is not None
            ),
            None,
        )
        if index is None:
            return None
        choice.append(index)
    return Configuration(tuple(choice))


def baselines(
    database: Database, mixes: dict[str, dict[str, str]] | None = None
) -> list[tuple[str, str, Configuration]]:
    """slimlm's uniform codes (each type × method) and llama.cpp's presets (its reference quantizer, no imatrix;
    the k-quant mixes in `mixes`: preset name -> GGUF tensor -> type)."""
    found = []
    for preset, tensor_types in (mixes or {}).items():
        configuration = preset_configuration(database, tensor_types)
        if configuration is not None:
            found.append((f"llama.cpp {preset.upper()} layout", "preset", configuration))
    methods = sorted({v.option.method for vs in database.variants.values() for v in vs})
    for type_ in PRESET_TYPES:
        embedding_type = "q8_0" if type_ in EMBEDDING_AT_8_BITS else type_
        preset = uniform_configuration(database, Option(type_, "ref"), Option(embedding_type, "ref"))
        if preset is not None:
            found.append((f"llama.cpp {type_.upper()}", "preset", preset))
        for method in ("gptq", "rtn"):
            if method in methods:
                uniform = uniform_configuration(database, Option(type_, method), Option(embedding_type, "rtn"))
                uniform = uniform or uniform_configuration(
                    database, Option(type_, method), Option(embedding_type, "ref")
                )
                if uniform is not None:
                    found.append((f"slimlm uniform {type_}/{method}", "uniform", uniform))
    return found


# --- depth candidates ---------------------------------------------------------------------------------------------


def depth_candidates(
    model: nn.Module, calibration_ids: torch.Tensor, stage_: Stage, count: int, cache: Path
) -> list[tuple[int, float]]:
    """The `count` blocks whose removal alone costs the least KL (measured), as (block, KL), least first.

    Candidates are the 2·count blocks of lowest Block Influence (ShortGPT; one forward), each then measured on
    `stage_` (the re-ranking's quick stage: a block's removal costs KL of 0.1 or more on SmolLM2, which one window
    ranks; re-ranking scores every configuration with removed blocks on the large stage anyway).
    """
    from slimlm.evaluate.perplexity import evaluate_quality
    from slimlm.prune.depth import block_influences

    if count == 0:
        return []
    if cache.exists():
        stored = json.loads(cache.read_text())
        if len(stored) >= count:
            return [tuple(item) for item in stored[:count]]
    influences = block_influences(model, calibration_ids)
    order = sorted(range(len(influences)), key=lambda i: influences[i])[: 2 * count]
    measured = []
    for index in order:
        with blocks_skipped(model, (index,)):
            quality, _ = evaluate_quality(model, stage_.windows, stage_.reference, progress=False)
        measured.append((index, quality.kl_divergence))
    measured.sort(key=lambda item: item[1])
    cache.write_text(json.dumps(measured))
    return measured[:count]


# --- the search ---------------------------------------------------------------------------------------------------


def _size_limit(constraints: Constraints, baseline_sizes: dict[str, int]) -> int | None:
    if constraints.max_size is None:
        return None
    key = constraints.max_size.strip().lower()
    if key in baseline_sizes:
        return baseline_sizes[key]
    return parse_bytes(constraints.max_size, "--max-size")


class Searcher:
    """Holds what every budget reuses: the database, the live model, the knapsack tables and the scoring stages."""

    def __init__(
        self,
        database: Database,
        live: LiveModel,
        sizer: Sizer,
        stages: tuple[Stage, Stage],
        depth: list[tuple[int, float]],
        settings: SearchSettings,
        capacity: int,
        pricer=None,
    ):
        self.database, self.live, self.sizer, self.stages, self.depth, self.settings = (
            database,
            live,
            sizer,
            stages,
            depth,
            settings,
        )
        self.space = database.space
        self.capacity = capacity  # the largest budget asked: one knapsack table per removal set answers all below it
        self.pricer = pricer  # speed / RAM constraints (None: bytes only)
        self.tables: dict[tuple[int, ...], tuple] = {}

    def priced_size(self, configuration: Configuration) -> float:
        """File bytes, or infinity when the cost model says the configuration breaks a speed or RAM constraint."""
        if self.pricer is not None and not self.pricer.fits(configuration):
            return float("inf")
        return self.sizer(configuration)

    def removal_sets(self) -> list[tuple[int, ...]]:
        blocks = [b for b, _ in self.depth]
        return [tuple(sorted(blocks[:d])) for d in range(len(blocks) + 1)]

    def table(self, removed: tuple[int, ...], capacity: int, penalty: float = 0.0):
        """The knapsack over the kept knobs, each variant's cost its proxy KL plus `penalty` x its share of the
        speed / RAM room (`Pricer.share`). Bytes-only tables (penalty 0) are kept: one per removal set answers every
        budget; a penalized one (~17 MB on SmolLM2) serves one solve."""
        if penalty == 0 and removed in self.tables and self.tables[removed][1] >= capacity:
            return self.tables[removed]
        kept = [i for i, k in enumerate(self.space.knobs) if k.block not in removed]
        every = searchable_variants(self.database)
        searchable = [every[i] for i in kept]
        costs = [self._costs(self.space.knobs[i], options, penalty) for i, options in zip(kept, searchable)]
        sizes = [
            np.array([padded(self.database.variants[self.space.knobs[i].tensor][j].bytes) for j in options])
            for i, options in zip(kept, searchable)
        ]
        table = (knapsack(costs, sizes, capacity), capacity, kept, searchable)
        if penalty == 0:
            self.tables[removed] = table
        return table

    def _costs(self, knob, options: list[int], penalty: float) -> np.ndarray:
        variants = self.database.variants[knob.tensor]
        costs = np.array([variants[j].proxy for j in options])
        if penalty:
            costs += penalty * np.array([self.pricer.share(knob.shape, variants[j].option.type) for j in options])
        return costs

    def smallest(self) -> tuple[int, tuple[int, ...]]:
        """The smallest reachable file and its removal set."""
        best = None
        for removed in self.removal_sets():
            layout = self.sizer.layout(removed)
            size = (
                layout.header_bytes
                + layout.fixed_bytes
                + sum(
                    min(padded(v.bytes) for v in self.database.variants[k.tensor] if v.option in k.options)
                    for k in self.space.knobs
                    if k.block not in removed
                )
            )
            if best is None or size < best[0]:
                best = (size, removed)
        return best

    def knapsack_answers(self, budget: int) -> list[tuple[float, Configuration]]:
        """The proxy optimum within `budget` for each removal set, best first. With speed / RAM constraints, per
        removal set the least proxy KL among the answers the cost model prices within them: the multiplier of the
        variants' shares (`table`'s penalty) grows 4x a step from PENALTY_START until the answer fits, then is
        bisected PENALTY_BISECTIONS times between the last that did not and the first that did."""
        answers = []
        for removed in self.removal_sets():
            answer = self._answer(removed, budget, 0.0)
            if answer is not None and self.pricer is not None and not self.pricer.fits(answer[1]):
                answer = self._priced_answer(removed, budget)
            if answer is not None:
                answers.append(answer)
        answers.sort(key=lambda item: item[0])
        return answers

    def _priced_answer(self, removed: tuple[int, ...], budget: int) -> tuple[float, Configuration] | None:
        low, high, found = 0.0, PENALTY_START, None
        while high <= PENALTY_MAX:
            found = self._answer(removed, budget, high)
            if found is None or self.pricer.fits(found[1]):
                break
            low, high = high, high * 4
        if found is None or not self.pricer.fits(found[1]):
            return None
        for _ in range(PENALTY_BISECTIONS):
            middle = (low + high) / 2
            answer = self._answer(removed, budget, middle)
            if answer is not None and self.pricer.fits(answer[1]):
                high, found = middle, min(found, answer, key=lambda item: item[0])
            else:
                low = middle
        return found

    def _answer(self, removed: tuple[int, ...], budget: int, penalty: float) -> tuple[float, Configuration] | None:
        """(proxy KL, configuration) of the knapsack's answer within `budget` with these blocks removed."""
        layout = self.sizer.layout(removed)
        capacity = budget - layout.header_bytes - layout.fixed_bytes
        if capacity <= 0:
            return None
        table, _, kept, searchable = self.table(removed, capacity if penalty else max(capacity, self.capacity), penalty)
        picks = table.solve(capacity)
        if picks is None:
            return None
        choice = [0] * len(self.space.knobs)  # removed blocks' tensors: any index (unused)
        proxy = sum(dict(self.depth)[b] for b in removed)
        for i, options, pick in zip(kept, searchable, picks):
            choice[i] = options[pick]
            proxy += self.database.variants[self.space.knobs[i].tensor][options[pick]].proxy
        return proxy, Configuration(tuple(choice), removed)

    def search(
        self, budget: int, uniform: list[Configuration], generations: int
    ) -> tuple[Configuration, float, float, float, int]:
        """(configuration, proxy KL of the knapsack answer, its true KL, the re-ranked true KL, generations run)
        within `budget`.

        With speed / RAM constraints the knapsack's answers are those the cost model prices within them
        (`knapsack_answers`)."""
        answers = self.knapsack_answers(budget)
        seeds = [c for _, c in answers[:2]] + [c for c in uniform if self.priced_size(c) <= budget]
        if not seeds:
            raise SlimlmError(
                f"nothing within {budget / 1e6:.2f} MB meets the speed / RAM constraints by the cost model"
                if self.pricer is not None
                else f"nothing fits in {budget / 1e6:.2f} MB",
                "relax --max-size or --min-decode-tps / --max-ram (they conflict here)"
                if self.pricer is not None
                else "raise --max-size",
            )
        # opened before the seeds are scored, with or without generations to follow: the first budget's seeds take
        # half a minute on SmolLM2, which a piped log showed as silence; a budget with nothing left to measure
        # (its seeds scored at an earlier budget, no generations) prints nothing
        small, large = self.stages
        measured = (
            self.live.scored(seeds[0], large.windows, large.reference)
            and (
                self.live.kl(seeds[0], large.windows, large.reference) <= 0.0  # rerank then scores no other seed
                or all(self.live.scored(s, small.windows, small.reference) for s in seeds[1:])
            )
        )
        at = f"{len(seeds)} seeds at {budget / 1e6:.1f} MB"
        with (
            progress_bar(f"search: re-ranking {at}", generations, unit="generations")
            if generations > 0
            else _seeds_stage(f"search: scoring {at}", show=not measured)
        ) as advance:
            result = rerank(
                self.live,
                seeds,
                self.priced_size,
                budget,
                self.stages,
                generations,
                self.settings.offspring,
                self.settings.survivors,
                seed=self.settings.seed,
                progress=lambda generation, kl: advance(),
                patience=self.settings.patience,
            )
        knapsack_kl = result.first_seed_kl if answers else float("nan")
        return result.best, answers[0][0] if answers else float("nan"), knapsack_kl, result.kl, len(result.history)


@contextmanager
def _seeds_stage(description: str, show: bool):
    """A budget without generations: its seeds' scoring as one stage (start and end lines), `advance` unused."""
    if not show:
        yield lambda: None
        return
    with stage(description):
        yield lambda: None


def run_gguf_search(
    model: str,
    out: str | Path,
    constraints: Constraints,
    settings: SearchSettings,
    evaluation: EvalSettings,
    database_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
    extra_budgets: tuple[str, ...] = (),
    export_front: bool = False,
) -> SearchResult:
    """Search `model` under `constraints`; write DIR/{model.gguf, recipe.yaml, front.json, report.html, plots}.

    The front is searched at every llama.cpp preset's size for this model and at `extra_budgets` (sizes or preset
    names); `export_front` also writes each searched point's file to DIR/front/<MB>.gguf."""
    from slimlm.checkpoint.atomic import check_output_dir
    from slimlm.export import source_gguf
    from slimlm.models.load import load_model
    from slimlm.search.report import write_search_report

    started = time.perf_counter()
    priced = constraints.min_decode_tps is not None or constraints.max_ram is not None
    if priced:
        require_llama_cpp()
    max_ram = parse_bytes(constraints.max_ram, "--max-ram") if constraints.max_ram is not None else None
    out = Path(out)
    check_output_dir(out, overwrite)
    if constraints.max_size is not None and constraints.max_size.strip().lower() not in (*PRESET_TYPES, *MIXED_PRESETS):
        parse_bytes(constraints.max_size, "--max-size")  # refuse a bad size before any work
    base = load_model(model, allow_pickle=allow_pickle, device=device)
    base.model.eval()
    space = gguf_search_space(base.model, linear_types=settings.types, methods=settings.methods)
    basis = search_basis(base, space, settings, database_dir, default_database)
    database, database_path, stages, depth = basis.database, basis.path, basis.stages, basis.depth
    live = live_copy(base.model, database)
    sizer = Sizer(base.model, base.tokenizer, source_gguf(base), database)
    searcher = Searcher(database, live, sizer, stages, depth, settings, capacity=0)
    uniform = baselines(database, _preset_mixes(base.model))
    preset_sizes = {name.split()[1].lower(): sizer(c) for name, kind, c in uniform if kind == "preset"}
    limit = _size_limit(constraints, preset_sizes)
    smallest, smallest_removed = searcher.smallest()
    if limit is not None and limit < smallest:
        raise SlimlmError(
            f"--max-size {limit / 1e6:.2f} MB is below the smallest file this search reaches: {smallest / 1e6:.2f} MB "
            f"(every tensor at its smallest type, blocks {list(smallest_removed)} removed)",
            "raise --max-size, allow more removable blocks (--depth-candidates), or search smaller types (--types)",
        )
    extra = [_size_limit(dataclasses.replace(constraints, max_size=b), preset_sizes) for b in extra_budgets]
    chosen_budget = limit if limit is not None else max(preset_sizes.values())
    budgets = distinct_budgets({*preset_sizes.values(), *extra}, chosen_budget)
    pricer = _pricer(base, database, sizer, constraints, max_ram, database_path) if priced else None
    searcher.capacity = max(budgets)
    points: list[Point] = []
    uniform_configs = [c for _, _, c in uniform]
    with stage("search: knapsack + re-ranking"):
        for budget in budgets:
            generations = settings.generations if budget == chosen_budget else settings.front_generations
            searcher.pricer = pricer if budget == chosen_budget else None  # the front itself is on bytes
            configuration, proxy, knapsack_kl, reranked_kl, ran = searcher.search(budget, uniform_configs, generations)
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
    for name, kind, configuration in uniform:
        points.append(Point(name, kind, configuration, sizer(configuration)))
    base_quality, windows, reference = evaluate_points(base, points, live, evaluation, stages[1], chosen_budget)
    chosen = _choose(points, chosen_budget, constraints, pricer)

    def write(configuration: Configuration, path: Path):
        """The configuration's GGUF at `path`, the database's bytes as they are."""
        return write_configuration(
            base.model,
            base.tokenizer,
            source_gguf(base),
            configuration.removed,
            _packed(configuration, database),
            path,
            overwrite=overwrite,
        )

    with stage(f"search: writing {out / 'model.gguf'}"):
        out.mkdir(parents=True, exist_ok=True)
        summary = write(chosen.configuration, out / "model.gguf")
        written = file_bytes(summary.path)
        if written != chosen.file_bytes:
            raise SlimlmError(
                f"the written file has {written} bytes, the search counted {chosen.file_bytes}",
                "report this as a bug in slimlm's GGUF byte accounting",
            )
    if export_front:
        for point in points:
            if point.kind == "searched" and point is not chosen:
                path = out / "front" / f"{point.budget / 1e6:.1f}MB.gguf"
                write(point.configuration, path)
                point.note += f"; file {path.relative_to(out)}"
    problems, speed_protocol = [], None
    if _llama_cpp_installed():
        with stage("search: the chosen file measured in llama.cpp"):
            chosen.metrics["llama.cpp"] = _in_llama_cpp(summary.path, windows, reference)
            if pricer is not None:
                measured = pricer.check_written(summary.path, constraints.threads)
                problems = measured.pop("problems")
                chosen.metrics["llama.cpp"]["cost_model"] = measured
        if settings.speed_rounds:
            speed_protocol = measure_points_decode(
                points,
                chosen,
                summary.path,
                write,
                database.canonical,
                constraints.threads,
                settings.speed_rounds,
            )
    base_point = Point(
        "base (16-bit)",
        "base",
        None,
        sizer.layout(()).header_bytes
        + sizer.layout(()).fixed_bytes
        + sum(padded(2 * k.shape[0] * k.shape[1]) for k in space.knobs),
        metrics=_metrics(base_quality),
    )
    context = {
        "model": {"source": base.source, "resolved": base.resolved},
        "constraints": asdict(constraints),
        "budget_bytes": chosen_budget,
        "settings": asdict(settings),
        **basis.context(),
        "evaluation": {
            "protocol": windows.protocol(),
            "kl": reference.describe() if reference else None,
            "speed": speed_protocol,
        },
        "depth": [{"block": b, "kl": kl} for b, kl in depth],
        "sparsity": "not searched: neither GGUF nor llama.cpp stores or runs unstructured / 2:4 sparse weights smaller or faster",
        "seconds": round(time.perf_counter() - started, 1),
    }
    result = SearchResult(out, chosen, [base_point, *points], basis.info, context)
    write_search_report(result, database)
    if problems:
        raise SlimlmError(
            f"the chosen file {'; '.join(problems)}",
            f"the report is in {out}; tighten --max-size or rerun on an idle machine (the cost model is in {database_path})",
        )
    return result


def evaluate_points(base, points: list[Point], live: LiveModel, evaluation: EvalSettings, large: Stage, budget: int):
    """Every point's held-out metrics (the report's columns), and the search's own objective (KL on the large
    re-ranking stage) where it chose: the searched points and the baselines within `budget`. Returns the base's
    quality, the held-out windows and the base's reference on them."""
    from slimlm.data.text import load_text
    from slimlm.evaluate.perplexity import evaluate_quality, make_windows

    with stage("search: held-out evaluation of every point"):
        text = load_text(evaluation.data, evaluation.split)
        windows = make_windows(base.tokenizer, text, evaluation.seqlen, evaluation.max_windows)
        base_quality, reference = evaluate_quality(
            base.model, windows, keep_reference=evaluation.kl_windows, progress=False
        )
        for point in points:
            point.metrics = _metrics(live.quality(point.configuration, windows, reference))
            if point.rerank_kl is None and point.file_bytes <= budget:
                point.rerank_kl = live.kl(point.configuration, large.windows, large.reference)
    return base_quality, windows, reference


def _pricer(base, database: Database, sizer: Sizer, constraints: Constraints, max_ram: int | None, database_path: Path):
    from slimlm.export.gguf import tensor_layout
    from slimlm.search.speed import cost_model_for

    types = sorted({v.option.type for vs in database.variants.values() for v in vs} | {"f16"})
    cost_model = cost_model_for(
        base, types, constraints.threads, database_path / f"costs-{constraints.threads}threads.json"
    )
    searched = {k.tensor for k in database.space.knobs}
    extra = {
        name: ("f16", tuple(shape))
        for name, shape in tensor_layout(base.model).items()
        if len(shape) == 2 and name not in searched
    }
    return Pricer(cost_model, database, extra, constraints.min_decode_tps, max_ram)


def _llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _in_llama_cpp(path: Path, windows, reference) -> dict:
    """The chosen file's perplexity and KL to the base on the held-out windows, computed by llama.cpp itself."""
    from slimlm.evaluate.llama_cpp import llama_cpp_quality

    quality, _ = llama_cpp_quality(path, windows, reference)
    return _metrics(quality)


def default_database(model: nn.Module, calibration_sha: str) -> Path:
    """$SLIMLM_CACHE (default ~/.cache/slimlm)/search/<model>-<calibration>-v<format>: every search of the same
    model and calibration reuses one database, whatever its budget or output directory; a new database format gets
    a new directory instead of refusing the old one."""
    from slimlm.search.database import VERSION, model_fingerprint
    from slimlm.settings import cache_root

    return cache_root() / "search" / f"{model_fingerprint(model)[:16]}-{calibration_sha[:12]}-v{VERSION}"


def _preset_mixes(model: nn.Module) -> dict[str, dict[str, str]]:
    from slimlm.export.gguf_presets import preset_tensor_types

    return {preset: preset_tensor_types(model, preset, imatrix=True) for preset in MIXED_PRESETS}


def _packed(configuration: Configuration, database: Database) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name (base numbering) -> (type, database bytes) of every kept tensor: what the file will hold."""
    return {tensor: (option.type, data) for tensor, (option, data) in database.chosen(configuration).items()}


@dataclass(frozen=True)
class SearchBasis:
    """What both targets' searches stand on, from one calibration sample: the variant database, the statistics
    windows it was built from, the re-ranking's two token stages (held-out windows of the same text) and the blocks
    that may be removed whole."""

    database: Database
    path: Path  # the database's directory
    statistics_ids: torch.Tensor  # (samples, seqlen)
    rerank_ids: torch.Tensor  # (rerank_windows, seqlen)
    source: str  # the calibration text's description
    stages: tuple[Stage, Stage]
    depth: list[tuple[int, float]]  # `depth_candidates`: (block, KL of its removal alone), least first
    info: dict  # `database.describe`

    def context(self) -> dict:
        """The report's record of the statistics and re-ranking tokens."""
        from slimlm.data.calibration import ids_sha256

        return {
            "statistics": {
                "windows": int(self.statistics_ids.shape[0]),
                "seqlen": int(self.statistics_ids.shape[1]),
                "source": self.source,
                "sha256": ids_sha256(self.statistics_ids),
            },
            "rerank": {
                "windows": int(self.rerank_ids.shape[0]),
                "seqlen": int(self.rerank_ids.shape[1]),
                "held_out_from": "the statistics windows (other offsets of the same calibration text)",
            },
        }


def search_basis(base, space, settings: SearchSettings, database_dir: str | Path | None, default_path) -> SearchBasis:
    """Draw the statistics and re-ranking windows, build (or reuse) the database of `space` at `database_dir` (else
    `default_path(model, statistics sha256)`), say what it holds, and find the depth candidates."""
    from slimlm.data.calibration import ids_sha256, sample_calibration
    from slimlm.data.text import load_text
    from slimlm.search.database import describe as describe_database
    from slimlm.search.statistics import collect_statistics

    stats = settings.statistics
    calibration_text = load_text(stats.data, "calibration")
    drawn = sample_calibration(
        base.tokenizer, calibration_text, stats.samples + settings.rerank_windows, stats.seqlen, stats.seed
    )
    statistics_ids, rerank_ids = drawn.input_ids[: stats.samples], drawn.input_ids[stats.samples :]
    sha = ids_sha256(statistics_ids)
    path = Path(database_dir) if database_dir else default_path(base.model, sha)
    with stage("search: database of tensor variants"):
        database = build_database(
            path,
            base.model,
            space,
            lambda: collect_statistics(
                base.model, statistics_ids, seed=settings.seed, activation_kinds=space.activation_kinds()
            ),
            sha,
        )
    info = describe_database(database)
    plain_line(
        f"search: database {info['knobs']} tensors × {len(info['options'])} options, {info['bytes'] / 1e6:.1f} MB on disk at {path}"
    )
    stages = _stages(base.model, rerank_ids, base.tokenizer)
    with stage("search: depth candidates"):
        count = settings.depth_candidates
        depth = depth_candidates(base.model, statistics_ids, stages[0], count, path / f"depth-{count}.json")
    return SearchBasis(database, path, statistics_ids, rerank_ids, drawn.source, stages, depth, info)


def _stages(model: nn.Module, ids: torch.Tensor, tokenizer) -> tuple[Stage, Stage]:
    """The quick stage (first window) and the full stage (every re-ranking window), each with the base's reference
    (one forward of the full stage's windows: the quick stage's reference is its first window's)."""
    from slimlm.evaluate.perplexity import EvalWindows, ReferenceLogits, bos_token_id, evaluate_quality

    def windows_of(rows: torch.Tensor) -> EvalWindows:
        return EvalWindows(
            input_ids=rows,
            source="held-out calibration windows",
            seqlen=rows.shape[1],
            total_windows=rows.shape[0],
            bos_token_id=bos_token_id(tokenizer),
        )

    _, full = evaluate_quality(model, windows_of(ids), keep_reference=ids.shape[0], progress=False)
    first = ReferenceLogits(
        full.top_log_probs[:1], full.top_ids[:1], full.rest_log_mass[:1], full.input_ids[:1], full.vocab
    )
    return Stage(windows_of(ids[:1]), first), Stage(windows_of(ids), full)


def _metrics(quality) -> dict:
    return {
        "perplexity": quality.perplexity,
        "kl_divergence": quality.kl_divergence,
        "top1_agreement": quality.top1_agreement,
    }


def _choose(points: list[Point], budget: int, constraints: Constraints, pricer: Pricer | None = None) -> Point:
    """The searched point at the user's budget: the least held-out-calibration KL among those within it and, with
    speed / RAM constraints, priced within them (the front's other budgets are searched on bytes alone, so a
    smaller budget's answer may be slower than the constraint allows)."""
    within = [
        p
        for p in points
        if p.kind == "searched" and p.file_bytes <= budget and (pricer is None or pricer.fits(p.configuration))
    ]
    best = min(within, key=lambda p: p.rerank_kl)
    if constraints.max_kl is not None and best.rerank_kl > constraints.max_kl:
        raise SlimlmError(
            f"--max-kl {constraints.max_kl} and --max-size conflict: the best file within {budget / 1e6:.2f} MB has KL {best.rerank_kl:.4f}",
            "raise --max-size or --max-kl",
        )
    return best
