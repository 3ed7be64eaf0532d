"""Zero-shot tasks: the packed scoring core against a naive per-choice forward, lm-eval's metric rules on
hand-made numbers, every loader on a few lines of the real files and on malformed input."""

from __future__ import annotations

import bz2
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, TINY_CONFIGS, tiny_model, tiny_tokenizer

from slimlm.errors import SlimlmError
from slimlm.evaluate.tasks import (
    TASKS,
    evaluate_tasks,
    load_task_data,
    parse_task_spec,
    select,
)
from slimlm.evaluate.tasks.common import (
    MultipleChoice,
    aggregate,
    argmax,
    choice_requests,
    choice_score,
)
from slimlm.evaluate.tasks.scoring import LogLikelihood, encode_pair, score_requests

REQUESTS = [
    ("The quick brown fox", " jumps over"),
    ("The quick brown fox", " sleeps all day long"),
    ("The quick brown fox", " x"),
    ("small language", " models are compressed"),
    ("small language ", "models"),  # trailing space moves to the continuation
    ("", "hello there world"),  # empty context: BOS/EOS stands in
    ("a b c d e f g h", " i j"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(vocab_size=256, model_max_length=100_000)


def naive_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The reference: one full forward over context + continuation, alone, no packing, no batching."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([context_ids + continuation_ids[:-1]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)[len(context_ids) - 1 :]  # (m, V)
    target = torch.tensor(continuation_ids)
    return log_probs.gather(-1, target[:, None]).sum().item(), bool((log_probs.argmax(-1) == target).all())


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_packed_scoring_equals_naive_forward(arch, tokenizer):
    model = tiny_model(arch)
    results = score_requests(model, tokenizer, REQUESTS, token_budget=40)  # small budget: several batches
    for (context, continuation), result in zip(REQUESTS, results):
        reference, greedy = naive_loglikelihood(model, tokenizer, context, continuation)
        assert result.logprob == pytest.approx(reference, abs=1e-4), (arch, context, continuation)
        assert result.is_greedy == greedy
        assert result.tokens == len(encode_pair(tokenizer, context, continuation)[1])


def test_requests_longer_than_a_sliding_window_run_alone_and_exactly(tokenizer):
    model = tiny_model("gemma3_text")  # sliding_window=64 in the tiny config
    long_context = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    requests = [(long_context, " small"), (long_context, " language models"), ("short", " one")]
    assert len(encode_pair(tokenizer, *requests[0])[0]) > model.config.sliding_window
    for (context, continuation), result in zip(requests, score_requests(model, tokenizer, requests)):
        assert result.logprob == pytest.approx(
            naive_loglikelihood(model, tokenizer, context, continuation)[0], abs=1e-4
        )


def test_encode_pair_follows_lm_eval(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "small language ", "models")
    assert context_ids == tokenizer("small language")["input_ids"]
    whole = tokenizer("small language models")["input_ids"]
    assert context_ids + continuation_ids == whole
    bos_or_eos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert encode_pair(tokenizer, "", "hello")[0] == [bos_or_eos]
    with pytest.raises(SlimlmError, match="empty continuation"):
        encode_pair(tokenizer, "context", "")


def test_acc_and_acc_norm_on_hand_made_numbers():
    example = MultipleChoice("Q", ("ab", "abcdef", "abc"), gold=1)
    results = [LogLikelihood(-10.0, False, 1), LogLikelihood(-12.0, False, 2), LogLikelihood(-11.0, False, 1)]
    # acc: argmax(-10, -12, -11) = 0 (wrong); acc_norm: argmax(-5, -2, -3.67) = 1 (right): lengths exclude the " "
    assert choice_score(example, results) == {"acc": 0.0, "acc_norm": 1.0}
    assert choice_requests(example) == [("Q", " ab"), ("Q", " abcdef"), ("Q", " abc")]
    assert argmax([1.0, 3.0, 3.0]) == 1  # ties: the first, as numpy.argmax


def test_aggregation_matches_lm_eval_stderr():
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    mean, stderr = aggregate("acc", "mean", values)
    assert mean == 0.6
    assert stderr == pytest.approx(statistics.stdev(values) / math.sqrt(5))
    ppl, _ = aggregate("perplexity", "perplexity", [-1.0, -3.0])
    assert ppl == pytest.approx(math.exp(2.0))
    assert aggregate("acc", "mean", [1.0])[1] is None


def test_seeded_subset():
    first = select(100, 10, seed=3)
    assert first == select(100, 10, seed=3) == sorted(first) and len(set(first)) == 10
    assert first != select(100, 10, seed=4)
    assert select(5, 10, seed=0) == [0, 1, 2, 3, 4]
    with pytest.raises(SlimlmError, match="at least 1"):
        select(5, 0, seed=0)


# ---- loaders on the real files ------------------------------------------------------------------------------------


def _head(path: Path, lines: int) -> str:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return "".join(next(handle) for _ in range(lines))


def test_hellaswag_text_format_recovers_lm_eval_query(tmp_path):
    path = tmp_path / "hs.txt.bz2"
    path.write_bytes(bz2.compress(_head(SHARED_DATA / "hellaswag" / "hellaswag_val_full.txt.bz2", 12).encode()))
    examples = load_task_data(f"hellaswag:{path}").examples
    assert len(examples) == 2
    # lm-eval: activity_label + ": " + ctx_a + " " + ctx_b.capitalize()
    assert examples[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert examples[1].context.endswith("grabs the pole. The lady")
    assert examples[0].gold == 3 and examples[0].choices[3] == "starts pulling up roofing on a roof."


def test_hellaswag_jsonl_applies_lm_eval_preprocess(tmp_path):
    row = {
        "activity_label": "Home",
        "ctx_a": "[header] How to x. [title] Do y.",
        "ctx_b": "you",
        "endings": ["a [step] b", "c", "d", "e"],
        "label": "0",
    }
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (example,) = load_task_data(f"hellaswag:{path}").examples
    assert example.context == "Home: How to x.. Do y. You"  # lm-eval's preprocess, quirks included
    assert example.choices[0] == "a b" and example.gold == 0


def test_piqa_jsonl_with_labels_file(tmp_path):
    (tmp_path / "valid.jsonl").write_text(_head(SHARED_DATA / "piqa" / "valid.jsonl", 3))
    (tmp_path / "valid-labels.lst").write_text(_head(SHARED_DATA / "piqa" / "valid-labels.lst", 3))
    examples = load_task_data(f"piqa:{tmp_path / 'valid.jsonl'}").examples
    assert [e.gold for e in examples] == [0, 1, 1]  # the first three lines of valid-labels.lst
    assert examples[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(SlimlmError, match="3 examples but .* 2 labels"):
        load_task_data(f"piqa:{tmp_path / 'valid.jsonl'}")


@pytest.mark.parametrize("subset", ["ARC-Easy", "ARC-Challenge"])
def test_arc_converted_form_with_official_keys(tmp_path, subset):
    items = json.loads((SHARED_DATA / "arc" / subset / "test.json").read_text())[:5]
    (tmp_path / "test.json").write_text(json.dumps(items))
    (tmp_path / "question-answers.jsonl").write_text(_head(SHARED_DATA / "arc" / subset / "question-answers.jsonl", 5))
    examples = load_task_data(f"arc_easy:{tmp_path}").examples
    assert len(examples) == 5
    for item, example in zip(items, examples):
        assert (
            example.context.startswith("Question: ")
            and example.context.endswith("?\nAnswer:")
            or example.context.endswith("\nAnswer:")
        )
        assert example.gold == int(item["answer"][6:]) - 1
        assert all(f"Answer{i + 1}: {text}" in item["instruction"] for i, text in enumerate(example.choices))
    keys = (tmp_path / "question-answers.jsonl").read_text().splitlines()
    row = json.loads(keys[0])
    row["answerKey"] = "D" if row["answerKey"] != "D" else "A"
    (tmp_path / "question-answers.jsonl").write_text("\n".join([json.dumps(row), *keys[1:]]) + "\n")
    with pytest.raises(SlimlmError, match="line 1: answerKey .* disagrees"):
        load_task_data(f"arc_easy:{tmp_path}")


def test_arc_original_and_hub_rows(tmp_path):
    ai2 = {
        "id": "x",
        "question": {"stem": "Why?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
        "answerKey": "B",
    }
    hub = {
        "id": "y",
        "question": "How?",
        "choices": {"text": ["c", "d", "e"], "label": ["1", "2", "3"]},
        "answerKey": "3",
    }
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps(ai2) + "\n" + json.dumps(hub) + "\n")
    first, second = load_task_data(f"arc_challenge:{path}").examples
    assert (first.context, first.choices, first.gold) == ("Question: Why?\nAnswer:", ("a", "b"), 1)
    assert (second.choices, second.gold) == (("c", "d", "e"), 2)


def test_lambada_splits_last_word(tmp_path):
    path = tmp_path / "lambada.jsonl"
    path.write_text(_head(SHARED_DATA / "lambada_openai" / "lambada_test.jsonl", 2))
    data = load_task_data(f"lambada:{path}")
    first = data.examples[0]
    assert first.target == " signs" and first.context.endswith("I don't care about")
    assert data.task.requests(first) == [(first.context, " signs")]


def test_generic_formats(tmp_path):
    (tmp_path / "boolq.jsonl").write_text(
        json.dumps({"question": "is it", "passage": "P.", "answer": True})
        + "\n"
        + json.dumps({"question": "q", "passage": "p", "label": 0})
        + "\n"
    )
    yes, no = load_task_data(f"boolq:{tmp_path / 'boolq.jsonl'}").examples
    assert (yes.context, yes.choices, yes.gold, no.gold) == ("P.\nQuestion: is it?\nAnswer:", ("no", "yes"), 1, 0)

    (tmp_path / "wino.jsonl").write_text(
        json.dumps(
            {"sentence": "Tom gave Bob a gift because _ was kind.", "option1": "Tom", "option2": "Bob", "answer": "1"}
        )
        + "\n"
    )
    data = load_task_data(f"winogrande:{tmp_path / 'wino.jsonl'}")
    (blank,) = data.examples
    assert data.task.requests(blank) == [
        ("Tom gave Bob a gift because Tom", " was kind."),
        ("Tom gave Bob a gift because Bob", " was kind."),
    ]

    obqa = {
        "id": "1",
        "question": {"stem": "Sun is", "choices": [{"text": "hot", "label": "A"}, {"text": "cold", "label": "B"}]},
        "answerKey": "A",
    }
    (tmp_path / "obqa.jsonl").write_text(json.dumps(obqa) + "\n")
    (example,) = load_task_data(f"openbookqa:{tmp_path / 'obqa.jsonl'}").examples
    assert (example.context, example.gold) == ("Sun is", 0)

    truthful = [
        {"question": "Is it?", "mc1_targets": {"Yes.": 1, "No.": 0}, "mc2_targets": {"Yes.": 1, "Sure.": 1, "No.": 0}}
    ]
    (tmp_path / "mc_task.json").write_text(json.dumps(truthful))
    data = load_task_data(f"truthfulqa_mc2:{tmp_path / 'mc_task.json'}")
    (example,) = data.examples
    assert example.context.endswith("Barcelona, Spain.\n\nQ: Is it?\nA:") and example.labels == (1, 1, 0)
    # MC2 = probability mass on the true answers: exp(-1) + exp(-2) over the sum with exp(-3)
    results = [LogLikelihood(-1.0, False, 1), LogLikelihood(-2.0, False, 1), LogLikelihood(-3.0, False, 1)]
    expected = (math.exp(-1) + math.exp(-2)) / (math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert data.task.score(example, results)["acc"] == pytest.approx(expected)

    (tmp_path / "crows.csv").write_text(
        ',sent_more,sent_less,stereo_antistereo,bias_type\n0,"A is bad.","B is bad.",stereo,race-color\n'
    )
    data = load_task_data(f"crows_pairs:{tmp_path / 'crows.csv'}")
    (pair,) = data.examples
    assert data.task.requests(pair) == [("", "A is bad."), ("", "B is bad.")]
    assert data.task.score(pair, [LogLikelihood(-5.0, False, 3), LogLikelihood(-7.0, False, 3)]) == {
        "pct_stereotype": 1.0,
        "likelihood_diff": 2.0,
    }


# ---- bad input ----------------------------------------------------------------------------------------------------


def _truthful_rows(n: int) -> str:
    return json.dumps(
        [
            {"question": f"Q{i}?", "mc1_targets": {"Yes.": 1, "No.": 0}, "mc2_targets": {"Yes.": 1, "No.": 0}}
            for i in range(n)
        ]
    )


def test_truthfulqa_folder_reads_the_2021_release_and_refuses_the_2025_revision(tmp_path, capsys, monkeypatch):
    """A clone of sylinrl/TruthfulQA: data/v1/mc_task.json (2021, 817, what lm-eval scores) and data/mc_task.json
    (2025, 790). The folder gives the 817; the 790 alone is refused, whether found by folder or named."""
    monkeypatch.delenv("SLIMLM_QUIET", raising=False)
    clone = tmp_path / "TruthfulQA"
    (clone / "data" / "v1").mkdir(parents=True)
    (clone / "data" / "mc_task.json").write_text(_truthful_rows(790))
    (clone / "data" / "v1" / "mc_task.json").write_text(_truthful_rows(817))
    for spec in (f"truthfulqa_mc1:{clone}", f"truthfulqa_mc2:{clone / 'data'}"):
        data = load_task_data(spec)
        assert (
            data.source == str(clone / "data" / "v1" / "mc_task.json")
            and len(data.examples) == 817
            and data.warning is None
        )
    assert f"truthfulqa_mc2: read {clone / 'data' / 'v1' / 'mc_task.json'} (817 examples)" in capsys.readouterr().err
    with pytest.raises(SlimlmError, match="790 examples: the 2025 revision of TruthfulQA.*not the 817"):
        load_task_data(f"truthfulqa_mc1:{clone / 'data' / 'mc_task.json'}")
    (clone / "data" / "v1" / "mc_task.json").unlink()
    with pytest.raises(SlimlmError, match="2025 revision"):
        load_task_data(f"truthfulqa_mc1:{clone}")
    root = tmp_path / "root" / "truthfulqa"  # the data root's own folder, laid out as released
    (root / "v1").mkdir(parents=True)
    (root / "v1" / "mc_task.json").write_text(_truthful_rows(817))
    assert load_task_data("truthfulqa_mc1", data_root=tmp_path / "root").source == str(root / "v1" / "mc_task.json")


def test_openbookqa_folder_reads_ai2_main_test_and_warns_on_another_count(tmp_path, capsys, monkeypatch):
    row = {
        "id": "1",
        "question": {"stem": "Sun is", "choices": [{"text": "hot", "label": "A"}, {"text": "cold", "label": "B"}]},
        "answerKey": "A",
    }
    main = tmp_path / "openbookqa" / "Data" / "Main"
    main.mkdir(parents=True)
    (main / "test.jsonl").write_text((json.dumps(row) + "\n") * 500)
    (main / "train.jsonl").write_text(json.dumps(row) + "\n")
    data = load_task_data("openbookqa", data_root=tmp_path)
    assert data.source == str(main / "test.jsonl") and len(data.examples) == 500 and data.warning is None
    (main / "test.jsonl").write_text((json.dumps(row) + "\n") * 3)  # not the released 500: read, with a warning
    monkeypatch.setenv("SLIMLM_QUIET", "1")
    capsys.readouterr()
    data = load_task_data(f"openbookqa:{main.parent}")
    assert data.warning == "3 examples where the released split has 500: scores are not comparable with published ones"
    assert "warning: 3 examples where the released split has 500" in capsys.readouterr().err  # shown even when quiet
    (main / "test.jsonl").unlink()
    with pytest.raises(SlimlmError, match="holds none of the files task 'openbookqa' is released as .Main/test.jsonl"):
        load_task_data("openbookqa", data_root=tmp_path)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(SlimlmError, match="unknown task 'hellaswg'.*hellaswag, piqa"):
        parse_task_spec("hellaswg")
    assert parse_task_spec("lambada_openai")[0].name == "lambada"


@pytest.mark.parametrize(
    ("task", "content", "message"),
    [
        ("piqa", '{"goal": "g", "sol1": "a", "label": 0}\n', r"line 1: missing field 'sol2'"),
        ("lambada", '{"text": "fine words"}\n{"text": 3}\n', r"line 2: field 'text' should be str"),
        ("boolq", '{"question": "q", "passage": "p", "answer": true}\nnot json\n', r"line 2: not valid JSON"),
        (
            "winogrande",
            '{"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}\n',
            r"line 1: field 'sentence' has no '_'",
        ),
        ("hellaswag", "ctx: a b\n7\na\nb\nc\nd\n", r"line 2: gold label '7'"),
        ("hellaswag", "ctx: a b\n1\na\n", r"not a multiple of 6"),
    ],
)
def test_malformed_files_name_line_and_field(tmp_path, task, content, message):
    path = tmp_path / ("data.txt" if task == "hellaswag" else "data.jsonl")
    path.write_text(content)
    with pytest.raises(SlimlmError, match=message):
        load_task_data(f"{task}:{path}")


def test_empty_dataset_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SlimlmError, match="holds no examples"):
        load_task_data(f"lambada:{tmp_path / 'empty.jsonl'}")
    with pytest.raises(SlimlmError, match="not found"):
        load_task_data(f"lambada:{tmp_path / 'nope.jsonl'}")


def test_evaluate_tasks_end_to_end_on_a_tiny_model(tmp_path, tokenizer):
    model = tiny_model("llama")
    rows = [
        {"goal": f"goal {i}", "sol1": "the quick brown fox", "sol2": f"small models {i}", "label": i % 2}
        for i in range(6)
    ]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lambada.jsonl").write_text(
        "".join(json.dumps({"text": f"the quick brown fox number {i}"}) + "\n" for i in range(4))
    )
    with pytest.raises(SlimlmError, match="at least 1"):
        evaluate_tasks(model, tokenizer, [f"piqa:{tmp_path / 'piqa.jsonl'}"], limit=0)
    piqa, lambada = evaluate_tasks(
        model,
        tokenizer,
        [f"piqa:{tmp_path / 'piqa.jsonl'}", f"lambada:{tmp_path / 'lambada.jsonl'}"],
        limit=4,
        seed=1,
        progress=False,
    )
    assert (piqa.examples, piqa.total, piqa.requests) == (4, 6, 8)
    chosen = [rows[i] for i in select(6, 4, 1)]
    expected = []
    for row in chosen:  # acc recomputed with the naive reference
        context = f"Question: {row['goal']}\nAnswer:"
        lls = [naive_loglikelihood(model, tokenizer, context, " " + row[s])[0] for s in ("sol1", "sol2")]
        expected.append(float(argmax(lls) == row["label"]))
    assert piqa.metrics["acc"] == pytest.approx(sum(expected) / 4)
    assert set(lambada.metrics) == {"acc", "perplexity"} and lambada.metrics["perplexity"] > 1
    assert "seeded subset (seed 1) of 4" in piqa.protocol


def test_every_registered_task_has_a_summary_and_metrics():
    for name, task in TASKS.items():
        assert task.name == name and task.summary and task.aggregation


@pytest.mark.slow
def test_smollm2_scores_real_tasks_above_chance():
    from slimlm.models.load import load_model

    loaded = load_model("smollm2-135m", device="cpu")
    results = {
        r.task: r for r in evaluate_tasks(loaded.model, loaded.tokenizer, ["piqa", "lambada"], limit=40, progress=False)
    }
    assert results["piqa"].metrics["acc"] > 0.55  # chance is 0.5; the Q4_1 SmolLM2-135M-Instruct scores about 0.67
    assert results["lambada"].metrics["acc"] > 0.08  # chance is about 0; this model scores about 0.19 (lm-eval agrees)


def _generic_files(tmp_path: Path) -> list[str]:
    """A few hand-made rows in each generic task's hub layout, as task specs."""
    rows = {
        "boolq": [
            {"question": "is the sky blue", "passage": "The sky is blue.", "label": 1},
            {"question": "is fire cold", "passage": "Fire is hot.", "label": 0},
        ],
        "winogrande": [
            {"sentence": "Tom gave Bob a gift because _ was kind.", "option1": "Tom", "option2": "Bob", "answer": "1"},
            {
                "sentence": "The cup fell off the table because _ was slippery.",
                "option1": "cup",
                "option2": "table",
                "answer": "2",
            },
        ],
        "openbookqa": [
            {
                "id": "1",
                "question_stem": "The sun is",
                "choices": {"text": ["hot", "cold", "wet", "blue"], "label": ["A", "B", "C", "D"]},
                "answerKey": "A",
            }
        ],
        "truthfulqa_mc1": [
            {
                "question": "Is it?",
                "mc1_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]},
                "mc2_targets": {"choices": ["Yes.", "Sure.", "No."], "labels": [1, 1, 0]},
            }
        ],
        "crows_pairs": [
            {
                "sent_more": "Poor people are lazy.",
                "sent_less": "Rich people are lazy.",
                "stereo_antistereo": "stereo",
                "bias_type": "socioeconomic",
            }
        ],
    }
    rows["truthfulqa_mc2"] = rows["truthfulqa_mc1"]
    specs = []
    for name, items in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        specs.append(f"{name}:{path}")
    return specs


def test_lm_eval_scores_the_same_requests_and_metrics(tmp_path, tokenizer):
    """lm-eval's own HFLM and task definitions, on the same rows: identical (context, continuation) pairs and metrics.
    Skips unless lm-eval 0.4.x is importable (`pip install 'slimlm[lm-eval]'`)."""
    pytest.importorskip("lm_eval")
    from slimlm.evaluate.tasks import score_task
    from slimlm.evaluate.tasks.harness import make_hflm, score_with_lm_eval

    model = tiny_model("llama")
    model.config.max_position_embeddings = (
        4096  # the byte-level test tokenizer makes long sequences; RoPE does not care
    )
    lm = make_hflm(model, tokenizer, batch_size=4)
    specs = ["hellaswag", "piqa", "arc_easy", "arc_challenge", "lambada", *_generic_files(tmp_path)]
    for spec in specs:
        data = load_task_data(spec)
        indices = select(len(data.rows), 6, seed=0)
        ours = score_task(model, tokenizer, data, 6, 0, progress=False)
        theirs = score_with_lm_eval(lm, data, indices, tmp_path)
        assert theirs.requests == [data.task.requests(data.examples[i]) for i in indices], spec
        for name, value in ours.metrics.items():
            assert theirs.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (spec, name)


# ---- the command line ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from slimlm.checkpoint.save import save_model

    root = tmp_path_factory.mktemp("cli")
    save_model(tiny_model("qwen2"), tiny_tokenizer(), root / "tiny", {})
    (root / "piqa.jsonl").write_text(
        "".join(json.dumps({"goal": f"g{i}", "sol1": "a b", "sol2": "c d e", "label": i % 2}) + "\n" for i in range(5))
    )
    (root / "lambada.jsonl").write_text(
        "".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(5))
    )
    return root


def test_cli_eval_tasks_and_speed(tiny_dir):
    from conftest import run_cli

    out = tiny_dir / "eval.json"
    result = run_cli(
        "eval",
        tiny_dir / "tiny",
        "--tasks",
        f"piqa:{tiny_dir / 'piqa.jsonl'},lambada:{tiny_dir / 'lambada.jsonl'}",
        "--limit",
        "3",
        "--seed",
        "1",
        "--speed",
        "--json",
        out,
    )
    assert result.returncode == 0, result.stdout
    payload = json.loads(out.read_text())
    assert "quality" not in payload  # --tasks alone skips perplexity
    assert payload["tasks"]["piqa"]["examples"] == 3 and payload["tasks"]["piqa"]["total"] == 5
    # per example: which one of the data set (the seeded subset), its row, its scores; they make up the mean
    per_example = payload["tasks"]["piqa"]["per_example"]
    assert [row["index"] for row in per_example] == select(5, 3, 1)
    assert per_example[0]["where"] == f"{tiny_dir / 'piqa.jsonl'} line {per_example[0]['index'] + 1}"
    assert sum(row["acc"] for row in per_example) / 3 == pytest.approx(payload["tasks"]["piqa"]["metrics"]["acc"])
    speed = payload["speed"]
    assert set(speed["throughput_tokens_per_s"]) == {"1", "8", "32"} and speed["tpot_ms"] > 0
    # no meter here is reported as unavailable, never estimated; with a readable meter there is a number
    assert (speed["energy_joules_per_token"] is None) == speed["energy_meter"].startswith("unavailable")
    assert "zero-shot" in result.stdout and "energy meter" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "hellaswg"], "unknown task 'hellaswg'.*known tasks: hellaswag, piqa"),
        (["--tasks", "piqa", "--limit", "0"], "--limit 0: must be at least 1"),
        (["--tasks", ","], "--tasks names no task"),
    ],
)
def test_cli_eval_refuses_bad_task_options(tiny_dir, args, message):
    from conftest import run_cli

    result = run_cli("eval", tiny_dir / "tiny", *args)
    assert result.returncode == 2 and re.search(message, " ".join(result.stdout.split())), result.stdout


def test_cli_eval_names_the_bad_line_and_field(tiny_dir):
    from conftest import run_cli

    bad = tiny_dir / "bad.jsonl"
    bad.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g", "sol1": "a", "label": 1}\n')
    result = run_cli("eval", tiny_dir / "tiny", "--tasks", f"piqa:{bad}")
    assert result.returncode == 2
    assert "line 2: missing field 'sol2'" in " ".join(result.stdout.split()) and "Traceback" not in result.stdout
