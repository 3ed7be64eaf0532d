"""The search: its knapsack against brute force, the proxy against measured KL, the database's resume and refusals,
exact file bytes, and the whole flow on tiny random models."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
import time

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from slimlm.errors import SlimlmError
from slimlm.search.artifact import write_configuration
from slimlm.search.database import build_database
from slimlm.search.driver import Sizer, baselines, uniform_configuration
from slimlm.search.rerank import Configuration
from slimlm.search.run import run_search
from slimlm.search.solver import knapsack
from slimlm.search.space import Option, gguf_search_space
from slimlm.search.statistics import collect_statistics, projection_proxy, shaped_proxy
from slimlm.settings import Constraints, EvalSettings, SearchSettings

GGUF_ARCHS = ["llama", "qwen2", "mistral"]


def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        groups = int(rng.integers(1, 5))
        costs = [rng.random(int(rng.integers(1, 4))) for _ in range(groups)]
        sizes = [rng.integers(1, 50, len(c)) for c in costs]
        capacity = int(rng.integers(10, 120))
        table = knapsack(costs, sizes, capacity, resolution=1000)  # unit 1 byte: exact
        for budget in range(0, capacity + 1, 7):
            feasible = [
                p
                for p in itertools.product(*(range(len(c)) for c in costs))
                if sum(s[i] for s, i in zip(sizes, p)) <= budget
            ]
            picks = table.solve(budget)
            if not feasible:
                assert picks is None
                continue
            best = min(sum(c[i] for c, i in zip(costs, p)) for p in feasible)
            assert sum(s[i] for s, i in zip(sizes, picks)) <= budget
            assert sum(c[i] for c, i in zip(costs, picks)) == pytest.approx(best)


def test_knapsack_rounds_sizes_up_so_answers_always_fit():
    rng = np.random.default_rng(1)
    costs = [rng.random(5) for _ in range(40)]
    sizes = [rng.integers(1000, 90_000, 5) for _ in range(40)]
    table = knapsack(costs, sizes, 2_000_000, resolution=500)  # coarse units: 4000 bytes
    for budget in (1_000_000, 1_500_000, 1_999_999):
        picks = table.solve(budget)
        assert picks is not None and sum(s[i] for s, i in zip(sizes, picks)) <= budget


def _ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _exact_kl(model, ids, base_log_p) -> float:
    with torch.no_grad():
        log_q = torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
    return float((base_log_p.exp() * (base_log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_proxies_against_the_measured_kl_of_a_small_perturbation(arch):
    """Both estimates are the KL to second order: the windows' Fisher estimate ½ Σ⟨G, ΔW⟩²/(N·T) within sampling
    noise, the shaped one within what its independence assumptions drop (measured here in full precision: the
    sparse-KL evaluation's float32 floor, ~1e-6, is above a perturbation this small)."""
    model = tiny_model(arch)
    ids = _ids(64, 32, 0)
    statistics = collect_statistics(model, ids, progress=False)
    with torch.no_grad():
        base_log_p = torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
    name = "model.layers.1.mlp.up_proj"
    module = model.get_submodule(name)
    delta = (
        0.02
        * module.weight.detach().std()
        * torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(3))
    )
    projected = projection_proxy(delta, statistics.gradients[name], statistics.tokens)
    shaped = shaped_proxy(delta, statistics.hessians[name], statistics.output_fisher[name])
    with torch.no_grad():
        module.weight += delta
    measured = _exact_kl(model, ids, base_log_p)
    assert 0.7 < projected / measured < 1.4
    assert 0.5 < shaped / measured < 2.0


def _database(tmp_path, arch="llama", calibration_sha="calib", types=("q4_0", "q8_0"), statistics_calls=None):
    model = tiny_model(arch)
    space = gguf_search_space(model, linear_types=types, methods=("rtn", "gptq"))
    ids = _ids(4, 32, 0)

    def statistics_for():
        if statistics_calls is not None:
            statistics_calls.append(1)
        return collect_statistics(model, ids, progress=False)

    return model, build_database(tmp_path / "db", model, space, statistics_for, calibration_sha)


def test_every_offered_option_encodes_on_k_quant_rows():
    """The default methods (gptq, ref) on rows k-quants accept: a type without a reference quantizer gets slimlm's
    rounding instead of `ref`, and every option offered writes the bytes its type declares."""
    from slimlm.export.gguf_types import TYPES, tensor_bytes
    from slimlm.search.database import encode
    from slimlm.search.space import DEFAULT_METHODS, REFERENCE_TYPES, gguf_options

    weight = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    hessian = torch.eye(256) + 0.1
    options = gguf_options(tuple(weight.shape), ("q4_0", "q8_0", "q4_k", "q5_k", "q6_k"), DEFAULT_METHODS)
    assert {o.type for o in options} == {"q4_0", "q8_0", "q4_k", "q5_k", "q6_k"}
    assert all(o.method != "ref" or o.type in REFERENCE_TYPES for o in options)
    assert Option("q4_k", "gptq") in options and Option("q4_k", "rtn") in options
    for option in options:
        data = encode(weight, option, hessian, None)
        assert data.nbytes == tensor_bytes(option.type, (4, 256)), option.label
        assert TYPES[option.type].packed


def test_weights_already_on_a_grid_reuse_its_exact_codes(monkeypatch):
    """A group whose weights the reference Q4_1 rounding reproduces exactly (a model shipped as Q4_1) gets those
    codes for q4_1/gptq and q4_1/rtn without running either; other types, and weights off the grid, still run GPTQ."""
    import slimlm.search.database as db

    generator = torch.Generator().manual_seed(0)
    on_grid = [
        db.decode(
            db.encode(torch.randn(rows, 64, generator=generator), Option("q4_1", "ref"), None, None),
            Option("q4_1", "ref"),
            (rows, 64),
        )
        for rows in (8, 4)
    ]
    hessian = torch.eye(64) + 0.1
    options = [(Option("q4_1", "gptq"), Option("q4_1", "rtn"), Option("q4_0", "gptq"), Option("q4_1", "ref"))] * 2
    ran = []
    real = db.gptq_encode
    monkeypatch.setattr(
        db, "gptq_encode", lambda w, h, type_, importance=None: ran.append(type_) or real(w, h, type_, importance)
    )
    encoded = db.encode_group(on_grid, options, hessian, None)
    assert ran == ["q4_0"]
    for weight, payloads in zip(on_grid, encoded):
        assert np.array_equal(payloads["q4_1/gptq"], payloads["q4_1/ref"]) and np.array_equal(
            payloads["q4_1/rtn"], payloads["q4_1/ref"]
        )
        assert torch.equal(db.decode(payloads["q4_1/gptq"], Option("q4_1", "gptq"), tuple(weight.shape)), weight)
    off_grid = [on_grid[0], on_grid[1] + 1e-3]  # one weight off the grid: the group runs GPTQ as usual
    ran.clear()
    db.encode_group(off_grid, options, hessian, None)
    assert sorted(ran) == ["q4_0", "q4_1"]


def test_a_model_shipped_on_a_grid_stores_and_scores_its_codes_once(tmp_path):
    """Weights already on Q4_1's grid: q4_1/gptq is the reference codes (KL proxy 0), stored once, searched once,
    and a configuration naming either option gets one canonical key (so it is scored once)."""
    from safetensors import safe_open

    from slimlm.search.database import decode, encode
    from slimlm.search.rerank import searchable_variants

    model = tiny_model("llama")
    space = gguf_search_space(model, linear_types=("q4_0", "q4_1"), methods=("gptq", "ref"))
    ref = Option("q4_1", "ref")
    with torch.no_grad():
        for knob in space.knobs:
            if knob.role == "linear":
                weight = model.get_submodule(knob.module).weight
                weight.copy_(decode(encode(weight, ref, None, None), ref, tuple(weight.shape)))
    database = build_database(
        tmp_path / "db", model, space, lambda: collect_statistics(model, _ids(2, 32, 0), progress=False), "calib"
    )
    searchable = searchable_variants(database)
    for knob, indices in zip(space.knobs, searchable):
        if knob.role != "linear":
            continue
        variants = {v.option.label: v for v in database.variants[knob.tensor]}
        assert variants["q4_1/gptq"].same_as == "q4_1/ref" and variants["q4_1/gptq"].proxy == 0.0
        assert variants["q4_0/gptq"].same_as is None and variants["q4_0/gptq"].proxy > 0
        assert np.array_equal(database.payload(knob.tensor, Option("q4_1", "gptq")), database.payload(knob.tensor, ref))
        with safe_open(str(tmp_path / "db" / "tensors" / f"{knob.tensor}.safetensors"), "np") as f:
            assert "q4_1/gptq" not in f.keys() and "q4_1/ref" in f.keys()
        assert [database.variants[knob.tensor][i].option.label for i in indices].count("q4_1/gptq") == 0
    as_gptq = uniform_configuration(database, Option("q4_1", "gptq"), Option("q8_0", "ref"))
    as_ref = uniform_configuration(database, ref, Option("q8_0", "ref"))
    assert as_gptq != as_ref and database.canonical(as_gptq) == database.canonical(as_ref) == as_ref


def test_sampled_tokens_follow_the_model_distribution():
    """The Fisher identity needs ŷ drawn from the model itself: frequencies match, a zero-probability token never comes."""
    from slimlm.search.statistics import sample_tokens

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    drawn = sample_tokens(probs.log().expand(40000, 5), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn.reshape(-1), minlength=5)
    assert drawn.shape == (40000, 1) and counts[4] == 0
    assert torch.allclose(counts / 40000, probs, atol=0.01)


def test_embedding_rounding_weighs_each_weight_by_its_share_of_the_proxy():
    """The embedding's importance is the proxy's diagonal per weight: rows of tokens the windows never read carry
    only the output head's part; rounding with it lowers that weighted error below plain rounding's."""
    from slimlm.export.gguf_types import dequantize_tensor, quantize_tensor
    from slimlm.models.adapters import adapter_for
    from slimlm.search.space import tied_output
    from slimlm.search.statistics import embedding_importance

    model = tiny_model("llama")
    ids = _ids(2, 32, 0)
    statistics = collect_statistics(model, ids, progress=False)
    adapter = adapter_for(model)
    head = adapter.lm_head if tied_output(model) else None
    weight = model.get_submodule(adapter.embed).weight.detach()
    importance = embedding_importance(statistics, head)
    assert importance.shape == weight.shape and (importance >= 0).all()
    unseen = torch.ones(weight.shape[0], dtype=torch.bool)
    unseen[ids.unique()] = False
    head_part = (
        statistics.output_fisher[head][:, None] * statistics.hessians[head].diagonal()[None, :]
        if head
        else torch.zeros_like(weight)
    )
    torch.testing.assert_close(importance[unseen], head_part[unseen])

    def weighted_error(imp):
        approx = dequantize_tensor(quantize_tensor(weight, "q4_0", imp), "q4_0", weight.shape)
        return float(((approx - weight) ** 2 * importance).sum())

    assert weighted_error(importance) < weighted_error(None)


def test_database_resumes_and_refuses_another_calibration(tmp_path):
    calls = []
    model, database = _database(tmp_path, statistics_calls=calls)
    assert calls == [1]
    knob = database.space.knobs[3]
    from slimlm.export.gguf_types import tensor_bytes

    for variant in database.variants[knob.tensor]:
        assert variant.bytes == tensor_bytes(variant.option.type, knob.shape)
        assert variant.proxy >= 0
    labels = {v.option.label for v in database.variants[knob.tensor]}
    assert {"q4_0/rtn", "q4_0/gptq", "q8_0/rtn", "q4_0/ref", "q8_0/ref"} == labels
    (tmp_path / "db" / "tensors" / f"{knob.tensor}.safetensors").unlink()  # as if interrupted before this one
    _, again = _database(tmp_path, statistics_calls=calls)
    assert calls == [1, 1] and again.variants.keys() == database.variants.keys()
    _, third = _database(tmp_path, statistics_calls=calls)
    assert calls == [1, 1]  # complete: no statistics pass at all
    with pytest.raises(SlimlmError, match="other calibration tokens"):
        _database(tmp_path, calibration_sha="other")


def _all_bytes(database) -> dict:
    return {
        (k.tensor, v.option.label): (database.payload(k.tensor, v.option).tobytes(), v.proxy)
        for k in database.space.knobs
        for v in database.variants[k.tensor]
    }


def test_database_workers_write_what_one_process_writes(tmp_path, monkeypatch):
    """Forked workers (one per core here) give the bytes and proxies of a single-process build; a worker that dies
    leaves its share to the parent, which encodes it."""
    import slimlm.search.database as db

    _, forked = _database(tmp_path / "forked", types=("q4_0", "q4_1"))
    monkeypatch.setattr(db, "_worker_count", lambda groups: 1)
    _, alone = _database(tmp_path / "alone", types=("q4_0", "q4_1"))
    assert _all_bytes(forked) == _all_bytes(alone)

    def dead_worker(run):
        pid = os.fork()
        if pid == 0:
            os._exit(1)
        return pid

    monkeypatch.setattr(db, "_worker_count", lambda groups: 2)
    monkeypatch.setattr(db, "_fork", dead_worker)
    _, rescued = _database(tmp_path / "rescued", types=("q4_0", "q4_1"))
    assert _all_bytes(rescued) == _all_bytes(alone)


def test_encoding_counts_the_workers_files_while_the_parent_is_on_a_long_knob(tmp_path, monkeypatch, capsys):
    """Off a terminal the bar counts the workers' knobs as their files appear, while this process is still on its
    first knob (the embedding: 47 s on SmolLM2, with a log at 0 all that time); each knob is counted once."""
    import slimlm.search.database as db
    from slimlm import progress

    monkeypatch.delenv("SLIMLM_QUIET", raising=False)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line per knob counted
    monkeypatch.setattr(db, "_worker_count", lambda groups: 2)
    parent, real, slowed = os.getpid(), db._encode_group, []

    def long_first_knob(model, group, statistics, embed, head, path):
        if os.getpid() == parent and not slowed:  # this process's first: on until a worker's file is seen
            slowed.append(group)
            deadline = time.monotonic() + 30
            while not any((path / "tensors").glob("*.safetensors")) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(3 * db.WATCH_EVERY_S)
            print("parent: first knob encoded", file=sys.stderr)
        yield from real(model, group, statistics, embed, head, path)

    monkeypatch.setattr(db, "_encode_group", long_first_knob)
    _, database = _database(tmp_path)
    lines = [re.sub(r"^\[slimlm [\d:]+\] ", "", line) for line in capsys.readouterr().err.splitlines()]
    knobs = len(database.space.knobs)
    assert slowed and len(database.variants) == knobs
    before = lines[: lines.index("parent: first knob encoded")]
    assert any(
        re.fullmatch(rf"search: encoding tensor variants: [1-9]\d*/{knobs} tensors, \d+s elapsed", line)
        for line in before
    ), lines
    counted = [int(m.group(1)) for m in map(re.compile(r"search: encoding tensor variants: (\d+)/").match, lines) if m]
    assert counted == list(range(knobs + 1)), lines  # the start line, one per knob but the last, the end line


def test_reranking_says_so_before_it_scores_the_seeds(tmp_path, monkeypatch, capsys):
    """The re-ranking's line comes before its seeds are scored (half a minute on SmolLM2), not after the first
    generation."""
    from slimlm.search.driver import Searcher
    from slimlm.search.rerank import Stage

    model, database = _database(tmp_path, types=("q4_0", "q4_1"))
    monkeypatch.delenv("SLIMLM_QUIET", raising=False)
    capsys.readouterr()

    class Scored:  # the live model's scoring, without a model: says when it scores, and remembers what it scored
        def __init__(self):
            self.database, self.seen = database, set()

        def kl(self, configuration, windows, reference):
            if (configuration, id(windows)) not in self.seen:
                print("scored", file=sys.stderr)
                self.seen.add((configuration, id(windows)))
            return 1.0

        def scored(self, configuration, windows, reference):
            return (configuration, id(windows)) in self.seen

    sizer = Sizer(model, tiny_tokenizer(), None, database)
    uniform = [c for _, _, c in baselines(database)]
    budget = max(sizer(c) for c in uniform)
    small, large = Stage(None, None), Stage(object(), None)  # two token sets (the fake tells them apart by id)
    searcher = Searcher(database, Scored(), sizer, (small, large), [], TINY_SEARCH, capacity=budget)
    searcher.search(budget, uniform, generations=2)
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\[slimlm [\d:]+\] search: re-ranking \d+ seeds at [\d.]+ MB: 0/2 generations", lines[0]), (
        lines
    )
    assert lines[1] == "scored" and re.search(r"re-ranking \d+ seeds at [\d.]+ MB: 2/2 generations in", lines[-1]), (
        lines
    )

    # the next budget: the same seeds, already scored, and no generations (a front point): nothing to say
    searcher.search(budget, uniform, generations=0)
    assert capsys.readouterr().err == ""

    # a budget whose seeds are new and that has no generations: one stage, opened before the scoring
    searcher.live = Scored()
    searcher.search(budget, uniform, generations=0)
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\[slimlm [\d:]+\] search: scoring \d+ seeds at [\d.]+ MB …", lines[0]), lines
    assert lines[1] == "scored" and re.search(r"scoring \d+ seeds at [\d.]+ MB: done in", lines[-1]), lines


def test_reranking_stops_after_its_patience_without_a_better_child(tmp_path):
    from slimlm.search.rerank import Stage, rerank

    _, database = _database(tmp_path, types=("q4_0", "q4_1"))

    class Scored:  # the live model's scoring, without a model: a KL per call
        def __init__(self, kl):
            self.database, self.calls, self.next_kl = database, 0, kl

        def kl(self, configuration, windows, reference):
            self.calls += 1
            return self.next_kl(self.calls)

    seed = uniform_configuration(database, Option("q4_0", "gptq"), Option("q8_0", "rtn"))
    stages = (Stage(None, None), Stage(None, None))
    flat = rerank(
        Scored(lambda calls: 1.0), [seed], lambda c: 0, 1, stages, generations=10, offspring=3, survivors=1, patience=2
    )
    assert len(flat.history) == 2 and flat.kl == 1.0
    better = rerank(
        Scored(lambda calls: 1.0 / calls),
        [seed],
        lambda c: 0,
        1,
        stages,
        generations=10,
        offspring=3,
        survivors=1,
        patience=2,
    )
    assert len(better.history) == 10 and better.kl < 1.0
    creeping = rerank(
        Scored(lambda calls: 1.0 - 1e-4 * calls),
        [seed],
        lambda c: 0,
        1,
        stages,
        generations=10,
        offspring=3,
        survivors=1,
        patience=2,
    )
    assert (
        len(creeping.history) == 2 and creeping.kl < 1.0
    )  # better children are kept, but gains under 1% run out the patience


def test_reranking_rescores_only_children_that_beat_the_parent_on_the_quick_stage(tmp_path):
    """The parent competes on the quick stage: a child it beats there never reaches the large stage."""
    from slimlm.search.rerank import Stage, rerank

    _, database = _database(tmp_path, types=("q4_0", "q4_1"))
    seed = uniform_configuration(database, Option("q4_0", "gptq"), Option("q8_0", "rtn"))
    small, large = Stage("small", None), Stage("large", None)

    class Scored:
        def __init__(self, child_quick):
            self.database, self.child_quick, self.large_calls = database, child_quick, 0

        def kl(self, configuration, windows, reference):
            if windows == "large":
                self.large_calls += int(configuration != seed)
                return 0.5 if configuration != seed else 1.0
            return 1.0 if configuration == seed else self.child_quick

    worse = Scored(child_quick=2.0)
    kept = rerank(worse, [seed], lambda c: 0, 1, (small, large), generations=3, offspring=4, survivors=2)
    assert worse.large_calls == 0 and kept.best == seed and kept.kl == 1.0
    better = Scored(child_quick=0.9)
    moved = rerank(better, [seed], lambda c: 0, 1, (small, large), generations=1, offspring=4, survivors=2)
    assert better.large_calls > 0 and moved.kl == 0.5


def test_reranking_scores_the_first_seed_and_the_best_other_on_the_large_stage(tmp_path):
    from slimlm.search.rerank import Stage, rerank

    _, database = _database(tmp_path, types=("q4_0", "q4_1"))
    seeds = [
        uniform_configuration(database, Option(t, m), Option("q8_0", "rtn"))
        for t, m in (("q4_0", "gptq"), ("q4_1", "gptq"), ("q4_0", "rtn"), ("q4_1", "rtn"))
    ]
    quick_kl = {seeds[1]: 0.3, seeds[2]: 0.1, seeds[3]: 0.2}
    large_kl = {seeds[0]: 0.5, seeds[1]: 0.01, seeds[2]: 0.2, seeds[3]: 0.01}
    small, large = Stage("small", None), Stage("large", None)

    class Scored:
        def __init__(self):
            self.database, self.calls = database, []

        def kl(self, configuration, windows, reference):
            self.calls.append((seeds.index(configuration), windows))
            return (quick_kl if windows == "small" else large_kl)[configuration]

    scored = Scored()
    result = rerank(scored, seeds, lambda c: 0, 1, (small, large), generations=0, offspring=3, survivors=1)
    assert scored.calls == [(0, "large"), (1, "small"), (2, "small"), (3, "small"), (2, "large")]
    assert (
        result.first_seed_kl == 0.5 and result.best == seeds[2] and result.kl == 0.2
    )  # seed 3 lost on the quick stage
    assert result.evaluations == 5


def test_gptq_variants_beat_rtn_on_the_proxy(tmp_path):
    _, database = _database(tmp_path, types=("q4_0",))
    wins = [
        {v.option.method: v.proxy for v in database.variants[k.tensor]}
        for k in database.space.knobs
        if k.role == "linear"
    ]
    assert sum(w["gptq"] < w["rtn"] for w in wins) > 0.7 * len(wins)


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_counted_bytes_equal_the_written_file(arch, tmp_path):
    model, database = _database(tmp_path, arch, types=("q4_0", "q4_1", "q8_0"))
    sizer = Sizer(model, tiny_tokenizer(), None, database)
    rng = np.random.default_rng(0)
    for removed in ((), (0,)):
        choice = tuple(int(rng.integers(len(database.variants[k.tensor]))) for k in database.space.knobs)
        configuration = Configuration(choice, removed)
        packed = {
            k.tensor: (
                database.variants[k.tensor][i].option.type,
                database.payload(k.tensor, database.variants[k.tensor][i].option),
            )
            for k, i in zip(database.space.knobs, choice)
            if k.block not in removed
        }
        summary = write_configuration(
            model, tiny_tokenizer(), None, removed, packed, tmp_path / f"m{len(removed)}.gguf"
        )
        assert summary.path.stat().st_size == sizer(configuration)


def test_written_codes_are_the_database_bytes(tmp_path):
    """What the file holds, read back by the gguf package, is the database variant byte for byte."""
    import gguf

    model, database = _database(tmp_path, "qwen2", types=("q4_0", "q8_0"))  # qwen2: rows kept in HF order
    configuration = uniform_configuration(database, Option("q4_0", "gptq"), Option("q8_0", "rtn"))
    packed = {
        k.tensor: (
            database.variants[k.tensor][i].option.type,
            database.payload(k.tensor, database.variants[k.tensor][i].option),
        )
        for k, i in zip(database.space.knobs, configuration.choice)
    }
    path = write_configuration(model, tiny_tokenizer(), None, (), packed, tmp_path / "m.gguf").path
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        if tensor.name in packed:
            assert np.array_equal(np.asarray(tensor.data).reshape(-1), packed[tensor.name][1].reshape(-1))


def test_baselines_include_presets_and_uniform_codes(tmp_path):
    _, database = _database(tmp_path, types=("q4_0", "q8_0"))
    names = {name for name, _, _ in baselines(database)}
    assert {
        "llama.cpp Q4_0",
        "llama.cpp Q8_0",
        "slimlm uniform q4_0/gptq",
        "slimlm uniform q4_0/rtn",
        "slimlm uniform q8_0/rtn",
    } <= names


TINY_SEARCH = SearchSettings(
    types=("q4_0", "q4_1", "q8_0"),
    statistics=dataclasses.replace(SearchSettings().statistics, samples=4, seqlen=32),
    rerank_windows=2,
    generations=3,
    front_generations=1,
    offspring=3,
    depth_candidates=1,
)
TINY_EVALUATION = EvalSettings(seqlen=32, max_windows=4, kl_windows=4)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    directory = tmp_path_factory.mktemp("search")
    model_dir = directory / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    result = run_search(
        str(model_dir),
        directory / "out",
        Constraints(max_size="q4_1"),
        TINY_SEARCH,
        TINY_EVALUATION,
        database_dir=directory / "db",
    )
    return result, directory


def test_search_writes_the_chosen_file_within_budget(searched):
    result, _ = searched
    out = result.out
    assert {"model.gguf", "front.json", "recipe.yaml", "report.html", "front-size.png"} <= {
        p.name for p in out.iterdir()
    }
    front = json.loads((out / "front.json").read_text())
    q4_1 = next(p for p in front["points"] if p["name"] == "llama.cpp Q4_1")
    assert (out / "model.gguf").stat().st_size == result.chosen.file_bytes <= q4_1["file_bytes"]


def test_every_point_is_timed_side_by_side_in_llama_cpp_for_the_speed_plot(searched):
    """Every point with a file gets a decode rate measured in llama.cpp (one process, all files side by side); the
    plot of KL against measured speed and the table's column come from those measurements."""
    pytest.importorskip("llama_cpp")
    result, _ = searched
    front = json.loads((result.out / "front.json").read_text())
    assert all(p["metrics"]["decode_tps"] > 0 for p in front["points"] if p["kind"] != "base")
    assert "side by side" in front["context"]["evaluation"]["speed"]
    assert (result.out / "front-speed.png").stat().st_size > 0
    assert "decode tok/s" in (result.out / "report.html").read_text()


def test_search_beats_every_uniform_point_it_could_afford(searched):
    """The seeds include every uniform point within budget and re-ranking keeps the best: on the re-ranking tokens
    no affordable uniform point can be better than the chosen one."""
    result, _ = searched
    chosen = result.chosen
    for point in result.points:
        if point.kind in ("uniform", "preset") and point.file_bytes <= chosen.budget:
            assert chosen.rerank_kl <= point.rerank_kl + 1e-9


def test_search_file_loads_in_transformers(searched):
    from transformers import AutoModelForCausalLM

    result, _ = searched
    model = AutoModelForCausalLM.from_pretrained(str(result.out), gguf_file="model.gguf")
    assert model.config.num_hidden_layers == 2 - len(result.chosen.configuration.removed)


def test_search_refuses_a_budget_below_the_smallest_file(searched, tmp_path):
    _, directory = searched
    with pytest.raises(SlimlmError, match="below the smallest file"):
        run_search(
            str(directory / "tiny"),
            tmp_path / "o",
            Constraints(max_size="1KB"),
            TINY_SEARCH,
            TINY_EVALUATION,
            database_dir=directory / "db",
        )


def test_search_refuses_a_size_that_is_not_one(tmp_path):
    with pytest.raises(SlimlmError, match="is not a size"):
        run_search("unused", tmp_path / "o", Constraints(max_size="ninety"), TINY_SEARCH, TINY_EVALUATION)


def test_search_cli_prints_the_front_as_json(searched, tmp_path):
    from conftest import run_cli

    _, directory = searched
    result = run_cli(
        "search",
        directory / "tiny",
        "--max-size",
        "q4_0",
        "--out",
        tmp_path / "cli",
        "--database",
        directory / "db",
        "--types",
        "q4_0,q4_1,q8_0",
        "--methods",
        "rtn,gptq",
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
        "--seqlen",
        "32",
        "--windows",
        "2",
        "--generations",
        "1",
        "--front-generations",
        "0",
        "--depth-candidates",
        "1",
        "--json",
        "-",
    )
    assert result.returncode == 0, result.stdout
    data = json.loads(result.stdout[result.stdout.index("{") :])
    chosen = next(p for p in data["points"] if p["name"] == data["chosen"])
    q4_0 = next(p for p in data["points"] if p["name"] == "llama.cpp Q4_0")
    assert chosen["kind"] == "searched" and chosen["file_bytes"] <= q4_0["file_bytes"]


def test_search_cli_names_a_bad_constraint(tmp_path):
    from conftest import run_cli

    (tmp_path / "c.yaml").write_text("max_size: 92MB\nspeed: 3\n")
    result = run_cli("search", "--constraints", tmp_path / "c.yaml", "--out", tmp_path / "o")
    assert result.returncode == 2 and "unknown keys ['speed']" in result.stdout


def test_speed_constraints_without_llama_cpp_say_how_to_install_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(SlimlmError, match=r"llama.cpp, which is not installed.*\.\[engines\]"):
        run_search(
            "unused", tmp_path / "o", Constraints(max_size="92MB", min_decode_tps=100), TINY_SEARCH, TINY_EVALUATION
        )


def _gguf_tensors(path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in GGUFReader(str(path)).tensors}


def test_compress_replays_the_recipe_into_the_same_file(searched, tmp_path):
    """recipe.yaml reproduces the chosen file with `slimlm compress`: every tensor's type and bytes (the file's name
    metadata differs: the replay names its own output)."""
    from slimlm.api import compress

    result, directory = searched
    manifest = compress(
        str(directory / "tiny"), recipe=str(result.out / "recipe.yaml"), out=tmp_path / "replayed", evaluation=None
    )
    assert manifest["export"]["replayed_tensors"] == sum(
        1 for name in _gguf_tensors(result.out / "model.gguf") if not name.endswith("norm.weight")
    )
    assert _gguf_tensors(tmp_path / "replayed.gguf") == _gguf_tensors(result.out / "model.gguf")


def test_replay_recipes_refuse_what_they_cannot_rebuild(searched, tmp_path):
    import yaml

    from slimlm.api import compress

    result, directory = searched
    recipe = yaml.safe_load((result.out / "recipe.yaml").read_text())
    tensors = recipe["export"]["tensors"]
    first = next(iter(tensors))
    cases = [
        ({**tensors, first: "q4_0/fancy"}, "is not TYPE/METHOD"),
        ({**tensors, "blk.99.attn_q.weight": "q4_0/gptq"}, "not a searchable tensor"),
        ({first: tensors[first]}, "no type for"),
        ({**tensors, first: "q6_k/gptq"}, "cannot be q6_k/gptq"),
    ]
    for changed, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**recipe, "export": {**recipe["export"], "tensors": changed}}))
        with pytest.raises(SlimlmError, match=message):
            compress(str(directory / "tiny"), recipe=str(path), out=tmp_path / "o", evaluation=None, overwrite=True)


def test_searched_line_counts_generations_in_words():
    from slimlm.search.driver import searched_line

    assert searched_line("searched ≤ 91.7 MB", 0.0051, 0.0049, 0, 0, 4).endswith(
        "knapsack KL 0.0051 -> best seed 0.0049"
    )
    assert searched_line("searched ≤ 91.7 MB", 0.0051, 0.0051, 1, 1, 4).endswith("re-ranked 0.0051 (1 generation)")
    assert searched_line("searched ≤ 91.7 MB", 0.0051, 0.0049, 3, 3, 4).endswith("(3 generations)")
    assert searched_line("searched ≤ 91.7 MB", 0.0051, 0.0049, 4, 12, 4).endswith(
        "(4 of 12 generations: the last 4 gained less than 1%)"
    )


def test_a_speed_constrained_search_chooses_only_a_point_priced_within_the_constraint():
    """The front's other budgets are searched on bytes alone: a smaller budget's answer with lower KL that the cost
    model prices too slow must not become the chosen file (session 26: a --min-decode-tps search at 105.5 MB chose
    the 105.0 MB byte-only answer, measured 120.5 tok/s against the 125 asked)."""
    from slimlm.search.driver import Point, _choose

    slow, fast = Configuration((0,)), Configuration((1,))

    class Priced:
        def fits(self, configuration):
            return configuration == fast

    points = [
        Point("searched ≤ 105.0 MB", "searched", slow, 105_000_000, rerank_kl=0.002, budget=105_000_000),
        Point("searched ≤ 105.5 MB", "searched", fast, 105_400_000, rerank_kl=0.06, budget=105_500_000),
        Point("uniform", "uniform", slow, 100_000_000, rerank_kl=0.001),
    ]
    constraints = Constraints(max_size="105.5MB", min_decode_tps=125)
    assert _choose(points, 105_500_000, constraints).configuration == slow  # on bytes alone: the lower KL
    assert _choose(points, 105_500_000, constraints, Priced()).configuration == fast


def test_the_front_keeps_one_budget_per_name_and_the_chosen_one_wins():
    from slimlm.search.driver import distinct_budgets, searched_name

    budgets = distinct_budgets({91_726_624, 105_452_000, 144_810_784}, 105_454_080)
    assert budgets == [91_726_624, 105_454_080, 144_810_784]
    assert len({searched_name(b) for b in budgets}) == len(budgets)


def test_a_speed_limit_spends_the_byte_budget_on_fast_types_not_on_a_smaller_file(tmp_path):
    """With Q8_0 ten times slower per byte than Q4_0 (a made-up cost model), the knapsack that prices the speed
    limit (a multiple of each variant's share of the room added to its proxy) fits the limit and does at least as
    well as the largest byte budget whose bytes-only answer fits: session 26 shrank the budget until a slow
    mixture fitted, and chose an 82 MB file for a 105.5 MB budget."""
    from slimlm.evaluate.llama_cpp_costs import CostModel
    from slimlm.search.driver import Searcher
    from slimlm.search.rerank import Stage
    from slimlm.search.speed import Pricer

    model, database = _database(tmp_path, types=("q4_0", "q8_0"))
    types = {v.option.type for vs in database.variants.values() for v in vs} | {"f16"}
    per_byte = {t: (1e-8 if t == "q8_0" else 1e-9) for t in types}
    costs = CostModel(0.0, 0.0, per_byte, 0.0, 0.0, dict.fromkeys(types, 1.0), {}, 2, 8, 8, 1, "median", "", "", "", "")
    sizer = Sizer(model, tiny_tokenizer(), None, database)
    budget = sizer(uniform_configuration(database, Option("q8_0", "rtn"), Option("q8_0", "rtn")))
    searcher = Searcher(database, None, sizer, (Stage(None, None), Stage(None, None)), [], TINY_SEARCH, budget)
    (_, bytes_only), *_ = searcher.knapsack_answers(budget)
    pricer = Pricer(costs, database, {}, None, None)
    slowest = pricer.predict(bytes_only)["decode_tokens_per_s"]
    fastest = pricer.predict(uniform_configuration(database, *[Option("q4_0", "rtn")] * 2))["decode_tokens_per_s"]
    pricer.min_decode_tps = (slowest + fastest) / 2
    assert not pricer.fits(bytes_only)

    searcher.pricer = pricer
    (proxy, priced), *_ = searcher.knapsack_answers(budget)
    assert pricer.fits(priced) and sizer(priced) <= budget
    searcher.pricer = None
    shrunk = budget
    while not pricer.fits(searcher.knapsack_answers(shrunk)[0][1]):
        shrunk -= 256
    assert proxy <= searcher.knapsack_answers(shrunk)[0][0]


def test_scores_are_kept_beside_the_database_for_a_later_run(tmp_path, monkeypatch):
    """A second live model on the same database answers a configuration it has scored from the store, on the same
    tokens only; a torn last line (an interrupted run) is skipped."""
    import slimlm.search.rerank as rerank_module
    from slimlm.evaluate.perplexity import EvalWindows, evaluate_quality
    from slimlm.search.rerank import live_copy

    model, database = _database(tmp_path, types=("q4_0", "q4_1"))
    seed = uniform_configuration(database, Option("q4_0", "gptq"), Option("q8_0", "rtn"))
    other = uniform_configuration(database, Option("q4_1", "gptq"), Option("q8_0", "rtn"))

    def windows_of(ids):
        return EvalWindows(ids, "test", ids.shape[1], ids.shape[0], None)

    windows, shifted = windows_of(_ids(2, 32, 7)), windows_of(_ids(2, 32, 8))
    _, reference = evaluate_quality(model, windows, keep_reference=2, progress=False)
    _, shifted_reference = evaluate_quality(model, shifted, keep_reference=2, progress=False)
    first = live_copy(model, database).quality(seed, windows, reference)
    store = next(database.path.glob("scores-*.jsonl"))
    store.write_text(store.read_text() + '{"tokens": "torn')

    forwards = []
    real = rerank_module.evaluate_quality
    monkeypatch.setattr(rerank_module, "evaluate_quality", lambda *a, **k: forwards.append(1) or real(*a, **k))
    later = live_copy(model, database)
    assert later.scored(seed, windows, reference) and not later.scored(other, windows, reference)
    assert later.quality(seed, windows, reference) == first and forwards == []
    later.quality(seed, shifted, shifted_reference)  # other tokens: scored anew
    later.quality(other, windows, reference)
    assert len(forwards) == 2
    assert live_copy(model, database).scored(other, windows, reference)  # stored after the torn line, on its own
