"""slimlm finetune --augment on tiny random models: teacher-written rows carry the loss on what the teacher wrote, the
held-out split never reaches the teacher, degenerate rows are dropped, a teacher with another tokenizer is refused,
and augment 0 trains on exactly the rows it did before. One slow test on the real SmolLM2."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from conftest import TEXT, run_cli, tiny_model, tiny_tokenizer

import slimlm.finetune.augment as augment
from slimlm.distill.data import SamplingSettings, generate
from slimlm.errors import SlimlmError
from slimlm.finetune.api import finetune, heldout_rows
from slimlm.finetune.augment import augment_rows, augment_training, repetitive
from slimlm.finetune.data import IGNORE, Rows, read_rows
from slimlm.finetune.settings import FinetuneSettings

pytest.importorskip("peft")
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
SAMPLING = SamplingSettings(temperature=0.7, top_p=0.9, greedy_tokens=0)
END = 1  # the tiny tokenizer's <eos>, which the chat template closes every message with
END_IDS = {END, 2}  # what `turn_end_ids` finds: that and the tiny configs' eos_token_id


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_chats(path, count: int):
    """`count` conversations, every third with two turns."""
    lines = []
    for i in range(count):
        messages = [
            {"role": "user", "content": f"question {i}: where is the fox"},
            {"role": "assistant", "content": f"answer {i}: over the lazy dog"},
        ]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "and then"}, {"role": "assistant", "content": f"it ran {i} miles"}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


def unpadded(rows: Rows, i: int) -> tuple[list[int], list[int]]:
    n = int(rows.attention_mask[i].sum())
    return rows.input_ids[i, :n].tolist(), rows.labels[i, :n].tolist()


def unlabelled_prefix(ids: list[int], labels: list[int]) -> tuple[int, ...]:
    """The tokens before the last run of labelled tokens (a chat row's last prompt)."""
    start = max(t for t in range(1, len(labels)) if labels[t] != IGNORE and labels[t - 1] == IGNORE)
    return tuple(ids[:start])


def saved(tmp_path, name="tiny", tok=None, seed=0):
    path = tmp_path / name
    tiny_model("llama", seed).save_pretrained(path)
    (tok or chat_tokenizer()).save_pretrained(path)
    return path


# --- generation ---------------------------------------------------------------------------------------------------


def test_left_padded_prompts_generate_what_each_prompt_does_alone(arch):
    model = tiny_model(arch)
    with (
        torch.no_grad()
    ):  # weights of std 0.1: greedy text that depends on the context (at 0.02 it repeats the last token)
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(weight.numel())) * 0.1)
    prompts = [[5, 17, 42, 99, 3, 250, 7], [8, 11, 64]]
    width = max(map(len, prompts))
    batch = torch.zeros((2, width), dtype=torch.int64)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    together = generate(
        model, batch, 6, SAMPLING, 0, greedy_tokens=6, attention_mask=mask
    )  # greedy: independent of the batch
    alone = [generate(model, torch.tensor([p]), 6, SAMPLING, 0, greedy_tokens=6)[0, len(p) :].tolist() for p in prompts]
    assert together[:, width:].tolist() == alone
    unmasked = generate(model, batch, 6, SAMPLING, 0, greedy_tokens=6)
    assert (
        unmasked[1, width:].tolist() != alone[1]
    )  # the padding would change the short prompt's answer: the mask is what keeps it out


# --- the rows -----------------------------------------------------------------------------------------------------


def test_teacher_answers_keep_the_prompt_and_carry_the_loss_only_on_the_answer(tmp_path):
    tok = chat_tokenizer()
    rows = read_rows(write_chats(tmp_path / "c.jsonl", 6), tok, 128)
    out, record = augment_rows(rows, tiny_model("llama"), tok, END_IDS, 2, 12, 128, SAMPLING, seed=0)
    assert record["kinds"] == {"answer": 6} and record["generated"] == 12 and record["kept"] + record["dropped"] == 12
    assert len(out) == len(rows) + record["kept"] and record["kept"] >= 10
    for i in range(len(rows)):  # the original rows first, unchanged
        assert unpadded(out, i) == unpadded(rows, i)
    prompts = [unlabelled_prefix(*unpadded(rows, i)) for i in range(len(rows))]
    for i in range(len(rows), len(out)):
        ids, labels = unpadded(out, i)
        prompt = unlabelled_prefix(ids, labels)
        assert prompt in prompts  # the original's last prompt, earlier turns included ...
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)  # ... and no loss on it (nor on an earlier answer)
        assert labels[len(prompt) :] == ids[len(prompt) :] and 1 <= len(ids) - len(prompt) <= 12
        assert (
            not set(ids[len(prompt) : -1]) & END_IDS
        )  # cut at the teacher's first end-of-turn (kept as the last token)
    assert max(Counter(unlabelled_prefix(*unpadded(out, i)) for i in range(len(rows), len(out))).values()) <= 2
    two_turns = [i for i in range(len(rows), len(out)) if "and then" in tok.decode(unpadded(out, i)[0])]
    assert two_turns  # a two-turn conversation's new row: the first answer is context, the new second one is learned
    for i in two_turns:
        ids, labels = unpadded(out, i)
        assert "over the lazy dog" not in tok.decode([t for t in labels if t != IGNORE])


def test_text_is_rewritten_through_the_chat_template_or_continued_without_one(tmp_path):
    (tmp_path / "d.txt").write_text(TEXT)
    for tok, kind in ((chat_tokenizer(), "rewrite"), (tiny_tokenizer(), "continuation")):
        rows = read_rows(tmp_path / "d.txt", tok, 32)
        out, record = augment_rows(rows, tiny_model("llama"), tok, END_IDS, 1, 16, 32, SAMPLING, seed=0)
        assert record["kinds"] == {kind: len(rows)} and record["kept"] >= len(rows) - 2
        for i in range(len(rows), len(out)):
            ids, labels = unpadded(out, i)
            if kind == "rewrite":  # a text row of its own: loss on every token, no instruction in it
                assert labels == ids and len(ids) <= 16
            else:  # the original's first half, then the continuation with the loss
                half = len(unpadded(rows, 0)[0]) // 2
                assert labels == [IGNORE] * half + ids[half:] and ids[:half] in [
                    unpadded(rows, r)[0][:half] for r in range(len(rows))
                ]


def test_empty_looping_and_duplicate_rows_are_dropped(tmp_path, monkeypatch):
    tok = chat_tokenizer()
    rows = read_rows(write_chats(tmp_path / "c.jsonl", 1), tok, 128)  # one two-turn conversation
    ids, labels = unpadded(rows, 0)
    prompt = unlabelled_prefix(ids, labels)
    original = ids[len(prompt) :]  # the original second answer and its <eos>
    good = tok("a fresh and different answer", add_special_tokens=False)["input_ids"]
    scripted = [
        original,
        [END, 9, 9],
        [7, 8] * 10,
        good + [END],
        good + [END],
        tok(" A FRESH and  different answer ")["input_ids"],
    ]

    def teacher_writes(model, prompts, new_tokens, sampling, seed, greedy_tokens=0, attention_mask=None):
        assert prompts[:, -len(prompt) :].tolist() == [list(prompt)] * len(scripted)
        return torch.stack(
            [torch.tensor(prompts[r].tolist() + (s + [0] * new_tokens)[:new_tokens]) for r, s in enumerate(scripted)]
        )

    monkeypatch.setattr(augment, "generate", teacher_writes)
    out, record = augment_rows(rows, tiny_model("llama"), tok, END_IDS, len(scripted), 24, 128, SAMPLING, seed=0)
    assert (
        record["dropped_by_reason"] == {"duplicate": 3, "empty": 1, "repetitive": 1}
        and record["kept"] == 1
        and len(out) == 2
    )
    assert unpadded(out, 1)[0] == list(prompt) + good + [END]
    assert repetitive([3] * 6) and not repetitive(good) and not repetitive([3, 3, 3])  # too short to call a loop


def test_a_teacher_that_only_loops_adds_nothing(tmp_path):
    tok = chat_tokenizer()
    rows = read_rows(write_chats(tmp_path / "c.jsonl", 4), tok, 64)
    looping = tiny_model("llama")
    looping.lm_head = torch.nn.Linear(64, 320)  # every position's top token is 39 ("I"), whatever the input
    torch.nn.init.zeros_(looping.lm_head.weight)
    with torch.no_grad():
        looping.lm_head.bias.fill_(-30.0)
        looping.lm_head.bias[39] = 30.0
    out, record = augment_rows(rows, looping, tok, END_IDS, 2, 16, 64, SAMPLING, seed=0)
    assert record["dropped_by_reason"] == {"repetitive": 8} and out is rows


# --- the verb -----------------------------------------------------------------------------------------------------


def test_the_heldout_split_never_reaches_the_teacher(tmp_path, monkeypatch):
    base = saved(tmp_path)
    data = write_chats(tmp_path / "c.jsonl", 10)
    seen = []

    def spy(model, prompts, *args, attention_mask=None, **kwargs):
        seen.extend(tuple(p[m.bool()].tolist()) for p, m in zip(prompts, attention_mask))
        return generate(model, prompts, *args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(augment, "generate", spy)
    settings = FinetuneSettings(seqlen=64, steps=2, batch_size=2, heldout=0.3, augment=2, augment_tokens=6)
    manifest = finetune(str(base), str(data), tmp_path / "out", settings)
    train, held = heldout_rows(chat_tokenizer(), read_rows(data, chat_tokenizer(), 64), None, settings)
    held_prompts = {unlabelled_prefix(*unpadded(held, i)) for i in range(len(held))}
    train_prompts = {unlabelled_prefix(*unpadded(train, i)) for i in range(len(train))}
    assert (
        len(held) == 3 and set(seen) == train_prompts and len(seen) == 2 * len(train) and not held_prompts & set(seen)
    )
    record = manifest["data"]["augment"]
    assert (
        record["rows_in"] == 7
        and manifest["data"]["heldout_rows"] == 3
        and manifest["data"]["train"]["rows"] == 7 + record["kept"]
    )
    assert (
        manifest["metrics"]["base"]["tokens"] == held.loss_tokens()
    )  # evaluated on the held-out rows as read, nothing added


def test_augment_zero_trains_on_exactly_the_old_rows(tmp_path, monkeypatch):
    base = saved(tmp_path)
    data = write_chats(tmp_path / "c.jsonl", 8)
    monkeypatch.setattr(augment, "augment_training", lambda *a, **k: pytest.fail("augmentation ran with augment 0"))
    settings = FinetuneSettings(seqlen=64, steps=1, batch_size=2)
    manifest = finetune(str(base), str(data), tmp_path / "out", settings)
    train, _ = heldout_rows(chat_tokenizer(), read_rows(data, chat_tokenizer(), 64), None, settings)
    assert (
        manifest["data"]["train"] == {"kind": "shuffled", "seed": 0, **train.describe()}
        and "augment" not in manifest["data"]
    )


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    base = saved(tmp_path)
    other = tiny_tokenizer(vocab_size=300)
    other.chat_template = CHAT_TEMPLATE
    teacher = saved(tmp_path, "other-teacher", other, seed=1)
    settings = FinetuneSettings(seqlen=64, steps=1, batch_size=2, augment=1, augment_teacher=str(teacher))
    with pytest.raises(
        SlimlmError, match=re.escape(f"the augmentation teacher {teacher} does not share the tokenizer of {base} ")
    ):
        finetune(str(base), str(write_chats(tmp_path / "c.jsonl", 4)), tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"augment": 1, "dp_epsilon": 8.0}, "DP-SGD's per-example guarantee would not cover them"),
        ({"augment_teacher": "smollm2-135m"}, r"an augmentation teacher \(smollm2-135m\) is given, but augment is 0"),
        ({"augment": -1}, "augment is -1, must be 0 or more"),
        ({"augment": 1, "augment_tokens": 0}, "augment_tokens is 0, must be at least 1"),
    ],
)
def test_bad_augmentation_settings_are_refused(fields, needle):
    with pytest.raises(SlimlmError, match=needle):
        FinetuneSettings(**fields)


def test_cli_augments_with_a_second_teacher_and_records_it(tmp_path):
    base, teacher = saved(tmp_path), saved(tmp_path, "teacher", seed=3)  # same tokenizer, other weights
    data = write_chats(tmp_path / "c.jsonl", 10)
    out = tmp_path / "out"
    result = run_cli(
        "finetune",
        base,
        "--data",
        data,
        "--out",
        out,
        "--seqlen",
        "64",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--augment",
        "2",
        "--augment-teacher",
        teacher,
        "--augment-tokens",
        "8",
        "--augment-temperature",
        "1.0",
    )
    assert result.returncode == 0, result.stdout
    manifest = json.loads((out / "finetune.json").read_text())
    record = manifest["data"]["augment"]
    assert record["teacher"] == str(teacher) and record["sampling"]["temperature"] == 1.0 and record["new_tokens"] == 8
    assert record["generated"] == 2 * 9 and record["kept"] + record["dropped"] == 18 and record["seconds"] > 0
    assert manifest["data"]["train"]["rows"] == 9 + record["kept"] and manifest["settings"]["augment"] == 2
    assert f"augmentation: {teacher} wrote 18 rows, {record['kept']} kept" in " ".join(result.stdout.split())


def test_the_finetune_stage_augments_its_training_split(tmp_path):
    from slimlm.pipeline import compress_
    from slimlm.recipes import parse_recipe

    (tmp_path / "d.txt").write_text(TEXT)
    data = str(tmp_path / "d.txt")
    stage = dict(method="finetune", data=data, rank=4, steps=3, batch_size=4, seqlen=32, augment=1, augment_tokens=8)
    logs = compress_(tiny_model("qwen2"), parse_recipe([stage], "test"), tokenizer=tiny_tokenizer())
    record = logs[0].details["augment"]
    assert (
        record["teacher"] == "the recipe's model"
        and record["kinds"] == {"continuation": record["rows_in"]}
        and record["generated"] == record["rows_in"]
    )
    with pytest.raises(SlimlmError, match="'augment' is set with dp_epsilon"):
        parse_recipe([{**stage, "dp_epsilon": 8}], "test")


# --- the real model -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_its_prompts_in_words_and_fine_tunes_on_them(tmp_path):
    from slimlm.models.load import load_model

    questions = [
        "What is the capital of France?",
        "How do I boil an egg?",
        "Name three colors.",
        "Why is the sky blue?",
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "I do not know."}]}
            )
            + "\n"
            for q in questions
        )
    )
    loaded = load_model("smollm2-135m")
    settings = FinetuneSettings(seqlen=128, augment=1, augment_tokens=48, steps=2, batch_size=2)
    rows = read_rows(path, loaded.tokenizer, settings.seqlen)
    out, record = augment_training(rows, loaded.model, loaded.tokenizer, settings, "smollm2-135m")
    assert record["kept"] >= 3, record
    for i in range(len(rows), len(out)):
        ids, labels = unpadded(out, i)
        answer = loaded.tokenizer.decode([t for t in labels if t != IGNORE], skip_special_tokens=True)
        words = answer.split()
        assert len(words) >= 3 and sum(w.strip(".,;:!?()'\"").isalpha() for w in words) >= 0.7 * len(words), answer
        assert answer.strip() != "I do not know."
    manifest = finetune(
        "smollm2-135m",
        str(path),
        tmp_path / "out",
        FinetuneSettings(seqlen=128, augment=1, augment_tokens=32, steps=2, batch_size=2, heldout=0.25),
    )
    assert (
        manifest["data"]["augment"]["rows_in"] == 3
        and manifest["data"]["train"]["rows"] == 3 + manifest["data"]["augment"]["kept"]
    )
    assert manifest["metrics"]["finetuned"]["perplexity"] > 0
