"""The compressed-tensors target of the search: exact model.safetensors bytes, the checkpoint within budget, loading
in slimlm and in plain transformers + compressed-tensors with the live model's logits, and the uniform baselines."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_search import TINY_EVALUATION
from test_search import TINY_SEARCH as GGUF_TINY_SEARCH

from slimlm.errors import SlimlmError
from slimlm.search.compressed_tensors import (
    CTSizer,
    ct_decode,
    ct_encode,
    ct_grid,
    ct_search_space,
    write_ct_configuration,
)
from slimlm.search.database import build_database
from slimlm.search.rerank import Configuration, blocks_skipped, searchable_variants
from slimlm.search.run import run_search
from slimlm.search.space import Option
from slimlm.search.statistics import collect_statistics
from slimlm.settings import Constraints

TYPES = ("int4-g32", "int4-g64", "int8-channel", "dense")
TINY_SEARCH = dataclasses.replace(GGUF_TINY_SEARCH, target="compressed-tensors", types=TYPES)


def test_types_parse_to_grids_and_bad_ones_are_refused():
    assert ct_grid("int4-g32-asym") == ct_grid("int4-g32-asym") and not ct_grid("int4-g32-asym").symmetric
    assert ct_grid("int8-channel").group_size is None and ct_grid("dense") is None
    with pytest.raises(SlimlmError, match="not a compressed-tensors type"):
        ct_grid("int3-g32")


@pytest.mark.parametrize("type_", (*TYPES, "int4-g32-asym"))
def test_payload_round_trips_to_what_the_layer_computes(type_):
    from slimlm.quantize.grid import dequantize
    from slimlm.quantize.rtn import rtn_quantize

    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    option = Option(type_, "ref" if type_ == "dense" else "rtn")
    decoded = ct_decode(ct_encode(weight, option, None), option, (48, 64))
    grid = ct_grid(type_)
    expected = (
        weight.to(torch.bfloat16).float() if grid is None else dequantize(*rtn_quantize(weight, grid), torch.float32)
    )
    assert torch.equal(decoded, expected)


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ct-db")
    model = tiny_model("llama")
    space = ct_search_space(model, TYPES)
    ids = torch.randint(3, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, build_database(directory, model, space, lambda: collect_statistics(model, ids, progress=False), "ids")


@pytest.fixture(scope="module")
def asym_database(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ct-db-asym")
    model = tiny_model("llama")
    space = ct_search_space(model, ("int4-g32-asym", "dense"), ("rtn",))
    return model, build_database(
        directory,
        model,
        space,
        lambda: collect_statistics(model, torch.randint(3, 200, (2, 16)), progress=False),
        "ids",
    )


def test_counted_bytes_equal_the_written_checkpoint_with_zero_points(asym_database, tmp_path):
    model, db = asym_database
    searchable = searchable_variants(db)
    for n, removed in enumerate([(), (1,)]):
        configuration = Configuration(tuple(s[(n + i) % len(s)] for i, s in enumerate(searchable)), removed)
        out = write_ct_configuration(model, tiny_tokenizer(), configuration, db, tmp_path / f"c{n}", {})
        assert (out / "model.safetensors").stat().st_size == CTSizer(model, db)(configuration)


def test_counted_bytes_equal_the_written_checkpoint(database, tmp_path):
    """Every option on every tensor, with and without a removed block: the sizer's count is model.safetensors' size."""
    model, db = database
    searchable = searchable_variants(db)
    sizer = CTSizer(model, db)
    widest = max(len(s) for s in searchable)
    for n, removed in enumerate([(), (), (0,), (1,)]):
        choice = tuple(s[(n + i) % len(s)] for i, s in enumerate(searchable)) if n else tuple(s[0] for s in searchable)
        configuration = Configuration(choice, removed)
        out = write_ct_configuration(model, tiny_tokenizer(), configuration, db, tmp_path / f"c{n}", {})
        assert (out / "model.safetensors").stat().st_size == sizer(configuration)
        knapsack_bound = (
            sizer.layout(removed).header_bytes
            + sizer.layout(removed).fixed_bytes
            + sum(db.variants[k.tensor][i].bytes for k, i in zip(db.space.knobs, choice) if k.block not in removed)
        )
        assert sizer(configuration) <= knapsack_bound  # the knapsack's sizes are an upper bound
    assert widest >= 6


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ct-search")
    tiny_model("llama").save_pretrained(directory / "tiny")
    tiny_tokenizer().save_pretrained(directory / "tiny")
    result = run_search(
        str(directory / "tiny"),
        directory / "out",
        Constraints(max_size="int4-g64/gptq"),
        TINY_SEARCH,
        TINY_EVALUATION,
        database_dir=directory / "db",
    )
    return result, directory


def test_search_writes_a_checkpoint_within_budget(searched):
    result, _ = searched
    out = result.out
    assert {"model.safetensors", "config.json", "slimlm.json", "front.json", "recipe.yaml", "report.html"} <= {
        p.name for p in out.iterdir()
    }
    front = json.loads((out / "front.json").read_text())
    budget = next(p for p in front["points"] if p["name"] == "uniform int4-g64/gptq")["file_bytes"]
    assert (out / "model.safetensors").stat().st_size == result.chosen.file_bytes <= budget
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"


def test_search_beats_every_uniform_point_it_could_afford(searched):
    """On held-out text, the chosen checkpoint's KL is no worse than any uniform point within its budget."""
    result, _ = searched
    chosen = result.chosen
    affordable = [p for p in result.points if p.kind == "uniform" and p.file_bytes <= chosen.budget]
    assert affordable
    for point in affordable:
        assert chosen.rerank_kl <= point.rerank_kl + 1e-9
        assert chosen.metrics["kl_divergence"] <= point.metrics["kl_divergence"] + 1e-6


def _live_logits(result, directory, ids):
    """The searched model as the search scored it: the base with the chosen codes, removed blocks skipped."""
    from slimlm.search.ct_search import ct_live_copy
    from slimlm.search.database import Database, _read_variants

    base = tiny_model("llama")
    space = ct_search_space(base, TYPES)
    db = Database(directory / "db", space, {k.tensor: _read_variants(directory / "db", k) for k in space.knobs})
    live = ct_live_copy(base, db)
    live.apply(result.chosen.configuration)
    with torch.no_grad(), blocks_skipped(live.model, result.chosen.configuration.removed):
        return live.model(ids).logits


def test_checkpoint_loads_in_slimlm_and_transformers_with_the_searched_logits(searched):
    from transformers import AutoModelForCausalLM

    from slimlm.models.load import load_model
    from slimlm.quantize.linear import QuantizedLinear

    result, directory = searched
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(5))
    expected = _live_logits(result, directory, ids)
    mine = load_model(str(result.out)).model.eval()
    assert any(isinstance(m, QuantizedLinear) for m in mine.modules())
    theirs = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(theirs(ids).logits, expected, atol=2e-3, rtol=2e-3)
    assert theirs.config.num_hidden_layers == 2 - len(result.chosen.configuration.removed)


def test_search_refuses_gguf_types_and_llama_cpp_constraints(tmp_path):
    with pytest.raises(SlimlmError, match="llama.cpp"):
        run_search(
            "unused", tmp_path / "o", Constraints(max_size="1MB", min_decode_tps=10), TINY_SEARCH, TINY_EVALUATION
        )
    with pytest.raises(SlimlmError, match="not compressed-tensors types"):
        from slimlm.search.ct_search import _ct_types

        _ct_types(dataclasses.replace(TINY_SEARCH, types=("q4_0",)))


def test_compress_replays_the_recipe_into_the_same_checkpoint(searched, tmp_path):
    from safetensors.torch import load_file

    from slimlm.api import compress

    result, directory = searched
    manifest = compress(
        str(directory / "tiny"), recipe=str(result.out / "recipe.yaml"), out=tmp_path / "replayed", evaluation=None
    )
    replayed = load_file(str(tmp_path / "replayed-compressed-tensors" / "model.safetensors"))
    searched_file = load_file(str(result.out / "model.safetensors"))
    assert replayed.keys() == searched_file.keys()
    for name, array in searched_file.items():
        assert torch.equal(replayed[name], array), name
    assert manifest["export"]["bytes"] == result.chosen.file_bytes
