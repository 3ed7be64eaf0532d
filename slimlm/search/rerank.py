"""True KL of whole configurations, and their re-ranking by an evolutionary search (EvoPress, Sieberling et al. 2024).

Per-layer damage is not additive: the knapsack's answer is optimal for the proxy, not for the model. So whole
configurations are scored by the mean KL(base ‖ configuration) on held-out calibration tokens, with the live model
holding each tensor's *decoded database bytes* (what the file holds), its matmul inputs rounded as llama.cpp rounds them
for each weight type (`export.gguf_activations`; the GGUF target), and removed blocks skipped. Starting from the
best of the seeds (the knapsack's answers, the uniform points within budget: the first answer, and the best of
the others by a quick score, are scored on the large stage), each generation makes `offspring`
budget-preserving mutations (one tensor changes option; if that breaks the budget, other tensors step down to a
cheaper option until it fits), scores them on a few tokens, re-scores the best `survivors` on more tokens (EvoPress's
staged token counts) and keeps the best if it beats the parent there. The parent competes on the few tokens too (its
selection is elitist): a child it beats there is not re-scored, which halves the cost of a generation that finds
nothing (on SmolLM2 most do).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimlm.calibration.sequential import hooks_removed_after
from slimlm.evaluate.perplexity import EvalWindows, QualityResult, ReferenceLogits, evaluate_quality
from slimlm.models.adapters import adapter_for, decoder_blocks, set_linear_weight_
from slimlm.prune.depth import _skip_block
from slimlm.search.database import Database, decode
from slimlm.search.space import Knob, SearchSpace


@dataclass(frozen=True)
class Configuration:
    choice: tuple[int, ...]  # per knob of the space, an index into the database's variants of that knob
    removed: tuple[int, ...] = ()  # blocks removed whole, at the base model's numbering


def describe_configuration(configuration: Configuration, database: Database) -> dict[str, str]:
    """GGUF tensor name (base numbering) -> "type/method", for the kept tensors."""
    return {
        knob.tensor: database.variants[knob.tensor][index].option.label
        for knob, index in zip(database.space.knobs, configuration.choice)
        if knob.block not in configuration.removed
    }


SCORES_VERSION = 1  # bumped when a score of the same configuration on the same tokens would come out otherwise


class ScoreStore:
    """Every score a search measured, kept beside its database (`scores-v<SCORES_VERSION>.jsonl`), so a later budget
    on the same database scores only configurations it has not seen: the front's seeds and the baselines recur at
    every run (on SmolLM2 they were 5 of a further budget's 10 minutes). A score depends on the configuration, the
    token windows and the base's reference on them (the base is the database's: its identity is checked); lines are
    appended one score at a time, and a torn last line (an interrupted run) is skipped. A database that cannot be
    written keeps its scores for this run only."""

    def __init__(self, path: Path):
        self.path = path / f"scores-v{SCORES_VERSION}.jsonl"
        self.results: dict[tuple[str, str], QualityResult] = {}
        text = self.path.read_text() if self.path.is_file() else ""
        self.torn = bool(text) and not text.endswith("\n")  # the next line starts on a line of its own
        if text:
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                    self.results[(entry["tokens"], entry["configuration"])] = QualityResult(**entry["quality"])
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: tuple[str, str]) -> QualityResult | None:
        return self.results.get(key)

    def add(self, key: tuple[str, str], quality: QualityResult) -> None:
        self.results[key] = quality
        line = json.dumps({"tokens": key[0], "configuration": key[1], "quality": dataclasses.asdict(quality)})
        try:
            with self.path.open("a") as f:
                f.write(("\n" if self.torn else "") + line + "\n")
            self.torn = False
        except OSError:
            pass


def score_key(
    database: Database, configuration: Configuration, windows: EvalWindows, reference: ReferenceLogits
) -> tuple[str, str]:
    """(the token windows and reference, the configuration: each kept tensor's option label, the blocks removed) as
    two short digests; labels, not variant indices, so the key does not hang on the order variants are listed in."""
    tokens = hashlib.sha256(windows.input_ids.to(torch.int64).numpy().tobytes())
    tokens.update(reference.input_ids.to(torch.int64).numpy().tobytes())
    tokens.update(f"{windows.seqlen}|{windows.bos_token_id}|{reference.top_k}|{reference.vocab}".encode())
    chosen = hashlib.sha256(repr(sorted(describe_configuration(configuration, database).items())).encode())
    chosen.update(repr(configuration.removed).encode())
    return tokens.hexdigest()[:20], chosen.hexdigest()[:20]


@dataclass
class LiveModel:
    """A copy of the base whose tensors are swapped to a configuration's decoded variants."""

    model: nn.Module
    database: Database
    applied: dict[str, int] = field(default_factory=dict)  # tensor -> variant index in place
    cache: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    cache_limit_bytes: int = 2 << 30
    # (configuration, id(windows), id(reference)) -> (windows, reference, quality): the value keeps both token sets
    # alive, so their ids stay theirs
    scores: dict[tuple, tuple] = field(default_factory=dict)
    store: ScoreStore | None = None  # the scores earlier runs on this database measured
    # module -> the weight type whose activation rounding its input gets (GGUF: `engine_rounded_inputs`)
    input_types: dict[str, str] = field(default_factory=dict)

    def weight(self, knob: Knob, index: int) -> torch.Tensor:
        key = (knob.tensor, index)
        if key not in self.cache:
            variant = self.database.variants[knob.tensor][index]
            decoded = decode(self.database.payload(knob.tensor, variant.option), variant.option, knob.shape)
            while (
                self.cache
                and sum(t.numel() * 4 for t in self.cache.values()) + decoded.numel() * 4 > self.cache_limit_bytes
            ):
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = decoded
        return self.cache[key]

    def apply(self, configuration: Configuration) -> None:
        for knob, index in zip(self.database.space.knobs, configuration.choice):
            if knob.block in configuration.removed or self.applied.get(knob.tensor) == index:
                continue
            module = self.model.get_submodule(knob.module)
            weight = self.weight(knob, index)
            if knob.role == "linear":
                set_linear_weight_(module, weight)
            else:
                with torch.no_grad():
                    module.weight.copy_(weight.to(module.weight.dtype))
            self.applied[knob.tensor] = index
            reader = _matmul_module(self.model, self.database.space, knob)
            if reader is not None:
                self.input_types[reader] = self.database.variants[knob.tensor][index].option.type

    def quality(self, configuration: Configuration, windows: EvalWindows, reference: ReferenceLogits) -> QualityResult:
        """Perplexity, KL and top-1 of the configuration on `windows` against `reference`; each configuration is
        scored once per token set (the uniform seeds recur at every budget, the front's points share answers)."""
        key = (self.database.canonical(configuration), id(windows), id(reference))
        quality = self._known(key, windows, reference)
        if quality is None:
            self.apply(configuration)
            with blocks_skipped(self.model, configuration.removed):
                quality, _ = evaluate_quality(self.model, windows, reference, progress=False)
            if self.store is not None:
                self.store.add(score_key(self.database, key[0], windows, reference), quality)
        self.scores[key] = (windows, reference, quality)
        return quality

    def _known(self, key: tuple, windows: EvalWindows, reference: ReferenceLogits) -> QualityResult | None:
        """The score of `key` (canonical configuration, token-set ids) measured this run or, in the store, earlier."""
        if key in self.scores:
            return self.scores[key][2]
        return None if self.store is None else self.store.get(score_key(self.database, key[0], windows, reference))

    def kl(self, configuration: Configuration, windows: EvalWindows, reference: ReferenceLogits) -> float:
        return self.quality(configuration, windows, reference).kl_divergence

    def scored(self, configuration: Configuration, windows: EvalWindows, reference: ReferenceLogits) -> bool:
        """Whether `quality` would answer from what it has already measured (this run or, in the store, an earlier one)."""
        key = (self.database.canonical(configuration), id(windows), id(reference))
        return self._known(key, windows, reference) is not None


def blocks_skipped(model: nn.Module, removed: tuple[int, ...]):
    """Context in which the `removed` decoder blocks pass their input through (a removal, without copying the model)."""
    blocks = decoder_blocks(model)
    return hooks_removed_after([blocks[i].register_forward_hook(_skip_block, with_kwargs=True) for i in removed])


def live_copy(model: nn.Module, database: Database) -> LiveModel:
    import copy

    live = LiveModel(copy.deepcopy(model).eval(), database, store=ScoreStore(database.path))
    if database.space.target == "gguf":
        engine_rounded_inputs(live.model, database, live.input_types)
    return live


def _matmul_module(model: nn.Module, space: SearchSpace, knob: Knob) -> str | None:
    """The module whose matmul reads the knob's tensor: a tied embedding's is the output head, an untied one's
    none (a lookup)."""
    if knob.role != "embedding":
        return knob.module
    return None if any(k.role == "output" for k in space.knobs) else adapter_for(model).lm_head


def engine_rounded_inputs(model: nn.Module, database: Database, input_types: dict[str, str]) -> None:
    """Round each searched matmul's input as llama.cpp does for the weight type `input_types` names (a forward
    pre-hook each, for the live copy's life). Linears reading one input (q/k/v, gate/up) at one type round it once."""
    from slimlm.export.gguf_activations import engine_activations

    last: list = [None, None, None]  # (input, type, rounded) of the latest call

    def hook(name: str):
        def round_input(_module, args):
            type_ = input_types.get(name)
            if type_ is None:
                return None
            if args[0] is not last[0] or type_ != last[1]:
                last[:] = [args[0], type_, engine_activations(args[0], type_)]
            return (last[2], *args[1:])

        return round_input

    space = database.space
    for name in {reader for knob in space.knobs if (reader := _matmul_module(model, space, knob)) is not None}:
        model.get_submodule(name).register_forward_pre_hook(hook(name))


def searchable_variants(database: Database) -> list[list[int]]:
    """Per knob, the indices of the variants the search may choose (the rest encode baselines only), each distinct
    encoding once (the first option holding it)."""
    found = []
    for knob in database.space.knobs:
        variants = database.variants[knob.tensor]
        searchable = [i for i, v in enumerate(variants) if v.option in knob.options]
        labels = {variants[i].option.label for i in searchable}
        found.append([i for i in searchable if variants[i].same_as not in labels])
    return found


MIN_GAIN = 0.01  # a generation that lowers the KL by less than 1% counts towards the re-ranking's patience


@dataclass(frozen=True)
class Stage:
    windows: EvalWindows
    reference: ReferenceLogits


@dataclass
class RerankResult:
    best: Configuration
    kl: float  # on the last stage's tokens
    start_kl: float
    evaluations: int
    history: list[float]  # best KL after each generation (last stage's tokens)
    first_seed_kl: float  # the first seed's (the knapsack's answer's) KL on the last stage's tokens


def mutate(
    configuration: Configuration,
    database: Database,
    size_of: Callable[[Configuration], int],
    budget: int,
    rng: random.Random,
    searchable: list[list[int]],
    attempts: int = 20,
) -> Configuration | None:
    """One tensor moves to another searched option; if the budget breaks, random others step down until it fits."""
    knobs = database.space.knobs
    alive = [i for i, k in enumerate(knobs) if k.block not in configuration.removed and len(searchable[i]) > 1]
    if not alive:
        return None
    choice = list(configuration.choice)
    a = rng.choice(alive)
    choice[a] = rng.choice([o for o in searchable[a] if o != choice[a]])
    candidate = Configuration(tuple(choice), configuration.removed)
    for _ in range(attempts):
        if size_of(candidate) <= budget:
            return candidate
        b = rng.choice([i for i in alive if i != a] or alive)
        variants = database.variants[knobs[b].tensor]
        cheaper = [o for o in searchable[b] if variants[o].bytes < variants[choice[b]].bytes]
        if cheaper:
            choice[b] = min(cheaper, key=lambda o: variants[o].proxy)
            candidate = Configuration(tuple(choice), configuration.removed)
    return candidate if size_of(candidate) <= budget else None


def rerank(
    live: LiveModel,
    seeds: list[Configuration],
    size_of: Callable[[Configuration], int],
    budget: int,
    stages: tuple[Stage, Stage],
    generations: int,
    offspring: int,
    survivors: int,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    patience: int | None = None,
) -> RerankResult:
    """(1 + λ) evolution with staged token counts, from the best seed. The seeds are staged as the children are: the
    first (the knapsack's answer, whose KL the caller reports) and the best of the others on the small stage go to
    the large stage (the uniform seeds rarely win, and scoring every seed on the large stage took 45 s of the main
    job). A KL of exactly 0 (the base's own logits: e.g. a model shipped quantized, given its codes back) cannot be
    beaten: the search stops; so it does after `patience` generations in a row that bettered the KL by less than
    MIN_GAIN (None: never)."""
    rng = random.Random(seed)
    small, large = stages
    database = live.database
    searchable = searchable_variants(database)
    scored = [(live.kl(seeds[0], large.windows, large.reference), seeds[0])]
    quick = []
    for s in seeds[1:] if scored[0][0] > 0.0 else []:
        quick.append((live.kl(s, small.windows, small.reference), s))
        if quick[-1][0] <= 0.0:  # identical logits: 0 on any tokens
            break
    if quick:
        best_other = min(quick, key=lambda item: item[0])[1]
        scored.append((live.kl(best_other, large.windows, large.reference), best_other))
    evaluations = len(scored) + len(quick)
    parent_kl, parent = min(scored, key=lambda item: item[0])
    start_kl, history, stale, parent_quick = parent_kl, [], 0, None
    for generation in range(generations):
        if parent_kl <= 0.0 or (patience is not None and stale >= patience):
            break
        stale += 1
        children = [
            c
            for c in (mutate(parent, database, size_of, budget, rng, searchable) for _ in range(offspring))
            if c is not None
        ]
        if children:
            if parent_quick is None:
                parent_quick = live.kl(parent, small.windows, small.reference)
                evaluations += 1
            quick = sorted(
                ((live.kl(c, small.windows, small.reference), c) for c in children), key=lambda item: item[0]
            )
            evaluations += len(children)
            for child_quick, child in quick[:survivors]:
                if child_quick >= parent_quick:  # the parent holds this survivor's place
                    break
                child_kl = live.kl(child, large.windows, large.reference)
                evaluations += 1
                if child_kl < parent_kl:
                    if child_kl < parent_kl * (1 - MIN_GAIN):
                        stale = 0
                    parent_kl, parent, parent_quick = child_kl, child, child_quick
        history.append(parent_kl)
        if progress is not None:
            progress(generation, parent_kl)
    return RerankResult(parent, parent_kl, start_kl, evaluations, history, scored[0][0])
