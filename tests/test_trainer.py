"""The training loop: schedule, data positions, accumulation, exact resume, refusals, NaN and OOM handling."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from slimlm.distill.data import TokenWindows
from slimlm.errors import SlimlmError
from slimlm.train.trainer import (
    CHECKPOINT,
    TrainConfig,
    lr_factor,
    micro_batch_samples,
    train,
)


def lm_loss(model, batch):
    ids = batch["input_ids"]
    logits = model(ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def source(seqlen=16):
    """Learnable ids: a counting sequence modulo 37 (the next token is the current one plus one)."""
    return TokenWindows(torch.arange(40 * seqlen) % 37 + 3, seqlen, 0, "counting ids")


def test_lr_schedule():
    config = TrainConfig(steps=11, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(11)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[-1] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(factors[2:]))
    assert factors[2 + 4] == pytest.approx(0.55)  # cosine halfway
    linear = TrainConfig(steps=11, warmup_steps=2, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(6, linear) == pytest.approx(0.5)
    assert lr_factor(7, TrainConfig(steps=11, schedule="constant")) == 1.0


def test_processes_split_the_global_batch():
    config = TrainConfig(batch_size=4, grad_accum=3)
    for step in range(3):
        for micro in range(3):
            single = micro_batch_samples(step, micro, config, 0, 1)
            split = [*micro_batch_samples(step, micro, config, 0, 2), *micro_batch_samples(step, micro, config, 1, 2)]
            assert list(single) == split
    assert list(micro_batch_samples(1, 2, config, 0, 1)) == list(range(20, 24))


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_accumulation_equals_a_larger_batch():
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = train(a, lm_loss, source(), TrainConfig(steps=3, batch_size=4, lr=1e-3))
    rb = train(b, lm_loss, source(), TrainConfig(steps=3, batch_size=2, grad_accum=2, lr=1e-3))
    assert ra.losses == pytest.approx(rb.losses, rel=1e-5)
    for x, y in zip(params(a), params(b)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_training_lowers_the_loss(optimizer):
    model = tiny_model("qwen2")
    result = train(
        model,
        lm_loss,
        source(),
        TrainConfig(
            steps=8, batch_size=4, lr=3e-3 if optimizer == "adamw" else 3e-2, optimizer=optimizer, warmup_steps=1
        ),
    )
    assert result.losses[-1] < result.losses[0] - 0.1
    assert result.tokens == 8 * 4 * 16 and result.tokens_per_second > 0


class Interrupt(Exception):
    pass


def interrupting(after_calls):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    return loss_fn


def test_interrupted_run_resumes_exactly(tmp_path):
    config = TrainConfig(
        steps=6, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=2, checkpoint_dir=str(tmp_path), checkpoint_every=2
    )
    whole = tiny_model("llama")
    reference = train(whole, lm_loss, source(), TrainConfig(**{**config.__dict__, "checkpoint_dir": None}))

    model = tiny_model("llama")
    with pytest.raises(KeyboardInterrupt):  # stops inside step 5 (4 steps x 2 micro-steps done)
        train(model, interrupting(9), source(), config)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 4

    fresh = tiny_model("llama", seed=7)  # other weights: everything must come from the checkpoint
    resumed = train(fresh, lm_loss, source(), TrainConfig(**{**config.__dict__, "checkpoint_every": 3}))
    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert resumed.losses == reference.losses
    for x, y in zip(params(fresh), params(whole)):
        assert torch.equal(x, y)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    config = TrainConfig(steps=2, batch_size=2, lr=1e-3, checkpoint_dir=str(tmp_path))
    train(tiny_model("llama"), lm_loss, source(), config)
    with pytest.raises(SlimlmError, match=r"another run or config \(config\.lr: checkpoint 0\.001, now 0\.002"):
        train(tiny_model("llama"), lm_loss, source(), TrainConfig(**{**config.__dict__, "lr": 2e-3}))
    with pytest.raises(SlimlmError, match="another run"):
        train(tiny_model("llama"), lm_loss, source(seqlen=8), config)  # other data
    with pytest.raises(SlimlmError, match="another run"):
        train(tiny_model("qwen2"), lm_loss, source(), config)  # other model
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(SlimlmError, match="cannot read checkpoint"):
        train(tiny_model("llama"), lm_loss, source(), config)


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = lm_loss(model, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    model = tiny_model("llama")
    with pytest.raises(SlimlmError, match="loss became nan at step 3.*after step 2"):
        train(model, loss_fn, source(), TrainConfig(steps=5, batch_size=2, checkpoint_dir=str(tmp_path)))
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["step"] == 2 and len(saved["losses"]) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for name, value in model.state_dict().items():  # the weights in memory are the saved ones: not updated by NaN
        assert torch.equal(saved["model"][name], value)


def test_out_of_memory_names_the_settings():
    def loss_fn(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(
        SlimlmError, match=r"out of memory at step 1: micro-batch of 2 sequences × 16 tokens.*lower batch_size"
    ):
        train(tiny_model("llama"), loss_fn, source(), TrainConfig(steps=1, batch_size=2))


def test_eval_every(tmp_path):
    result = train(
        tiny_model("llama"),
        lm_loss,
        source(),
        TrainConfig(steps=4, batch_size=2, eval_every=2),
        eval_fn=lambda model: {"training": float(model.training)},
    )
    assert result.evaluations == [{"step": 2, "training": 0.0}, {"step": 4, "training": 0.0}]


@pytest.mark.parametrize(
    "raw",
    [{"steps": 0}, {"lr": 0.0}, {"schedule": "step"}, {"optimizer": "sgd"}, {"clip_norm": 0.0}, {"min_lr_ratio": 2.0}],
)
def test_config_refuses_bad_values(raw):
    with pytest.raises(SlimlmError):
        TrainConfig(**raw)
