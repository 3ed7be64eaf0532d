"""Distillation: losses against naive references, ULD, data, LoRA, and the distill stage on tiny models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TEXT, tiny_model, tiny_tokenizer

from slimlm.distill.data import (
    GeneratedSamples,
    SamplingSettings,
    TokenWindows,
    loss_mask_after,
)
from slimlm.distill.losses import (
    HiddenProjection,
    forward_kl,
    generalized_jsd,
    hidden_cosine,
    hidden_mse,
    hidden_state_loss,
    layer_mapping,
    logit_distillation_loss,
    reverse_kl,
)
from slimlm.distill.stage import Base, DistillConfig, distill_
from slimlm.distill.uld import uld_loss
from slimlm.errors import SlimlmError

LOSSES = ["forward_kl", "reverse_kl", "jsd", "tv"]


def naive_loss(
    student: torch.Tensor, teacher: torch.Tensor, loss: str, temperature: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """The textbook formulas on probabilities, averaged over positions, times T²."""
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if loss == "forward_kl":
        value = kl(p, q)
    elif loss == "reverse_kl":
        value = kl(q, p)
    elif loss == "jsd":
        m = beta * p + (1 - beta) * q
        value = beta * kl(p, m) + (1 - beta) * kl(q, m)
    else:
        value = 0.5 * (p - q).abs().sum(-1)
    return temperature**2 * value.mean()


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_when_student_equals_teacher(loss):
    z = logits(2, 3, 11)
    assert logit_distillation_loss(z, z.clone(), loss, temperature=2.0).abs().item() < 1e-12


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_value_and_gradient_match_naive_formula(loss, temperature):
    student, teacher = logits(2, 3, 7, seed=1).requires_grad_(), logits(2, 3, 7, seed=2)
    ours = logit_distillation_loss(student, teacher, loss, temperature, beta=0.3)
    reference = naive_loss(student, teacher, loss, temperature, beta=0.3)
    torch.testing.assert_close(ours, reference.to(ours.dtype), rtol=1e-5, atol=1e-7)
    (ours_grad,) = torch.autograd.grad(ours, student)
    (reference_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(ours_grad, reference_grad.to(ours_grad.dtype), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_float64(loss):
    """Analytic against numerical gradients, w.r.t. both student and teacher logits (TV: |p − q| is not
    differentiable at p = q, which random logits stay away from)."""
    student, teacher = logits(2, 3, 5, seed=3).requires_grad_(), logits(2, 3, 5, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, t: logit_distillation_loss(s, t, loss, temperature=1.7, beta=0.3), (student, teacher)
    )


def test_jsd_limits_are_the_kls():
    student, teacher = (torch.log_softmax(logits(4, 9, seed=s), -1) for s in (5, 6))
    forward, reverse = forward_kl(student, teacher), reverse_kl(student, teacher)
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.0), forward)
    torch.testing.assert_close(generalized_jsd(student, teacher, 1.0), reverse)
    small = 1e-6
    torch.testing.assert_close(generalized_jsd(student, teacher, small) / small, forward, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(student, teacher, 1 - small) / small, reverse, rtol=1e-4, atol=1e-6)
    half = generalized_jsd(student, teacher, 0.5)
    assert (half <= torch.log(torch.tensor(2.0, dtype=half.dtype)) + 1e-12).all()  # JSD is bounded by log 2


def test_mask_and_shape_mismatch():
    student, teacher = logits(2, 4, 6, seed=7), logits(2, 4, 6, seed=8)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    expected = forward_kl(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1))[mask].mean()
    torch.testing.assert_close(logit_distillation_loss(student, teacher, "forward_kl", mask=mask), expected)
    with pytest.raises(SlimlmError, match="uld"):
        logit_distillation_loss(student, logits(2, 4, 9), "forward_kl")


def test_hidden_losses_and_projection():
    h = logits(2, 3, 8, seed=9)
    assert hidden_mse(h, h).item() == 0 and abs(hidden_cosine(h, h * 3).item()) < 1e-6  # cosine ignores scale
    torch.testing.assert_close(hidden_mse(h, h + 1), torch.tensor(1.0, dtype=h.dtype))
    same = HiddenProjection(8, 8, pairs=2)
    assert len(list(same.parameters())) == 0 and same(0, h) is h
    wider = HiddenProjection(8, 12, pairs=2)
    student = tuple(logits(2, 3, 8, seed=s).float() for s in range(3))  # embeddings + 2 blocks
    teacher = tuple(logits(2, 3, 12, seed=s + 10).float() for s in range(5))  # embeddings + 4 blocks
    pairs = layer_mapping(2, 4, "uniform")
    assert pairs == [(0, 1), (1, 3)]
    loss = hidden_state_loss(student, teacher, pairs, wider, "mse")
    loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in wider.maps)


def test_layer_mapping_forms():
    assert layer_mapping(3, 3, "uniform") == [(0, 0), (1, 1), (2, 2)]
    assert layer_mapping(2, 6, "last") == [(1, 5)]
    assert layer_mapping(2, 6, "0:1,-1:-1") == [(0, 1), (1, 5)]
    with pytest.raises(SlimlmError, match="out of range"):
        layer_mapping(2, 6, "2:1")
    with pytest.raises(SlimlmError, match="pairs"):
        layer_mapping(2, 6, "every")


def naive_uld(student, teacher):
    total = 0.0
    for b in range(student.shape[0]):
        for t in range(min(student.shape[1], teacher.shape[1])):
            p = sorted(torch.softmax(teacher[b, t], -1).tolist(), reverse=True)
            q = sorted(torch.softmax(student[b, t], -1).tolist(), reverse=True)
            size = max(len(p), len(q))
            p, q = p + [0.0] * (size - len(p)), q + [0.0] * (size - len(q))
            total += sum(abs(x - y) for x, y in zip(p, q))
    return total / (student.shape[0] * min(student.shape[1], teacher.shape[1]))


def test_uld_matches_naive_and_handles_vocab_mismatch():
    student, teacher = logits(2, 5, 7, seed=11), logits(2, 4, 10, seed=12)
    assert uld_loss(student, teacher).item() == pytest.approx(naive_uld(student, teacher), abs=1e-6)
    assert uld_loss(student, student.clone()).item() < 1e-7
    # invariant to how each vocabulary is ordered, and zero-probability padding changes nothing
    permuted = teacher[..., torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    torch.testing.assert_close(uld_loss(student, permuted), uld_loss(student, teacher))
    padded = torch.cat([student, torch.full((2, 5, 3), -torch.inf, dtype=student.dtype)], -1)
    torch.testing.assert_close(uld_loss(padded, teacher), uld_loss(student, teacher))
    grad_input = student.clone().requires_grad_()
    uld_loss(grad_input, teacher).backward()
    assert grad_input.grad.abs().sum() > 0


# --- data ------------------------------------------------------------------------------------------------------


def test_token_windows_are_deterministic_and_cover_each_epoch():
    windows = TokenWindows(torch.arange(100), seqlen=10, seed=3, label="ids")
    first_epoch = windows.rows(range(10))
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 100, 10))
    assert torch.equal(windows.rows(range(4, 6)), first_epoch[4:6])  # any position can be read again
    assert not torch.equal(windows.rows(range(10, 20)), first_epoch)  # reshuffled next epoch
    assert windows.describe()["windows"] == 10


def test_loss_mask_after():
    ids = torch.tensor([[5, 6, 7, 2, 0, 0], [5, 6, 7, 8, 9, 10]])  # eos = 2, then padding
    mask = loss_mask_after(ids, prompt_length=2, eos_token_id=2)
    # position t predicts token t+1: generated tokens are 2.., row 0 ends with its eos at index 3
    assert mask.tolist() == [[False, True, True, False, False, False], [False, True, True, True, True, False]]


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_generated_samples_are_seeded(kind):
    model = tiny_model("llama")
    prompts = TokenWindows(
        torch.randint(3, 320, (200,), generator=torch.Generator().manual_seed(0)), 12, 0, "random ids"
    )
    source = GeneratedSamples(
        model,
        12,
        SamplingSettings(),
        seed=1,
        kind=kind,
        prompts=prompts if kind == "student" else None,
        prompt_tokens=4 if kind == "student" else 0,
    )
    a, b = source.batch(range(3)), source.batch(range(3))
    assert a["input_ids"].shape == (3, 12) and torch.equal(a["input_ids"], b["input_ids"])
    if kind == "student":
        assert torch.equal(a["input_ids"][:, :4], prompts.rows(range(3))[:, :4])
        assert not a["loss_mask"][:, :3].any()
    assert source.describe()["sampling"]["temperature"] == 1.0


# --- LoRA -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_zero_b_is_identity_and_merge_is_exact(arch):
    pytest.importorskip("peft")
    from slimlm.distill.lora import add_lora, lora_targets, merge_lora

    model = tiny_model(arch)
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    adapted = add_lora(model, rank=4, alpha=8.0, targets=lora_targets(model))
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, before, rtol=0, atol=0)  # B = 0: exactly the original
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
        changed = adapted(ids).logits
    assert not torch.allclose(changed, before)
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == {
        n for n, _ in adapted.named_parameters() if "lora_" in n
    }
    merged = merge_lora(adapted)
    assert merged is model and not any("lora" in name for name, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, changed, rtol=1e-4, atol=1e-5)


# --- the stage --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(TEXT * 4)
    return str(path)


def kl_to(teacher, student, ids):
    with torch.no_grad():
        return logit_distillation_loss(student(ids).logits, teacher(ids).logits).item()


def perturbed(model, scale=0.05, seed=1):
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in student.parameters():
            if parameter.ndim == 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    return student


def sharp(model):
    """Tiny random models are nearly uniform; a larger output embedding gives them distributions worth matching."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)
    return model


def text_ids(tokenizer, rows=2, length=32):
    return torch.tensor(tokenizer(TEXT)["input_ids"][: rows * length]).view(rows, length)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "uld"])
def test_distill_brings_student_to_teacher(loss, tokenizer, text_file):
    teacher = sharp(tiny_model("llama"))
    student = perturbed(teacher, scale=0.5)
    ids = text_ids(tokenizer)

    def distance():
        with torch.no_grad():
            if loss == "uld":
                return uld_loss(student(ids).logits, teacher(ids).logits).item()
            return kl_to(teacher, student, ids)

    before = distance()
    config = DistillConfig(
        loss=loss,
        steps=12,
        batch_size=4,
        seqlen=32,
        lr=3e-3,
        warmup=2,
        data=text_file,
        hidden=0.5 if loss == "jsd" else 0.0,
    )
    result = distill_(student, Base(teacher, tokenizer), config)
    assert result.steps == 12 and len(result.losses) == 12
    assert distance() < 0.6 * before
    assert not student.training and all(p.requires_grad for p in student.parameters())


def test_distill_keeps_pruned_zeros_and_refuses_lora_on_sparse(tokenizer, text_file):
    from slimlm.models.adapters import block_linears
    from slimlm.prune.magnitude import MagnitudeConfig, prune_magnitude_

    teacher = tiny_model("qwen2")
    student = copy.deepcopy(teacher)
    for index in range(2):
        prune_magnitude_(block_linears(student, index), MagnitudeConfig(sparsity=0.5))
    zeros = {n: (m.weight == 0).clone() for i in range(2) for n, m in block_linears(student, i).items()}
    distill_(
        student,
        Base(teacher, tokenizer),
        DistillConfig(steps=3, batch_size=2, seqlen=16, lr=1e-2, warmup=0, data=text_file),
    )
    for index in range(2):
        for name, module in block_linears(student, index).items():
            assert (module.weight[zeros[name]] == 0).all()
            assert (module.weight[~zeros[name]] != block_linears(teacher, index)[name].weight[~zeros[name]]).any()
    pytest.importorskip("peft")
    with pytest.raises(SlimlmError, match="sparse"):
        distill_(
            student, Base(teacher, tokenizer), DistillConfig(steps=1, batch_size=2, seqlen=16, lora=4, data=text_file)
        )


def test_distill_with_lora_returns_a_plain_model(tokenizer, text_file):
    pytest.importorskip("peft")
    teacher = sharp(tiny_model("gemma3_text"))
    student = perturbed(teacher, scale=0.5)
    ids = text_ids(tokenizer)
    before = kl_to(teacher, student, ids)
    distill_(
        student,
        Base(teacher, tokenizer),
        DistillConfig(steps=8, batch_size=4, seqlen=32, lr=1e-2, lora=8, warmup=1, data=text_file),
    )
    assert type(student).__name__ == "Gemma3ForCausalLM" and not any("lora" in n for n, _ in student.named_modules())
    assert kl_to(teacher, student, ids) < before


def test_distill_refuses_vocabulary_mismatch(tokenizer, text_file):
    import transformers
    from conftest import TINY_CONFIGS

    teacher = tiny_model("llama")
    config = TINY_CONFIGS["llama"]()
    config.vocab_size = 400
    student = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(SlimlmError, match="uld"):
        distill_(student, Base(teacher, tokenizer), DistillConfig(steps=1, batch_size=2, seqlen=16, data=text_file))


def test_distill_stage_resumes_from_its_checkpoint(tokenizer, text_file, tmp_path):
    teacher = tiny_model("llama")
    config = DistillConfig(
        steps=4,
        batch_size=2,
        seqlen=16,
        lr=1e-3,
        warmup=0,
        data=text_file,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=2,
    )
    whole = perturbed(teacher)
    distill_(whole, Base(teacher, tokenizer), config)
    again = perturbed(teacher)  # a rerun of the same stage finds the finished checkpoint and restores it
    result = distill_(again, Base(teacher, tokenizer), config)
    assert result.resumed_from == 4
    for a, b in zip(whole.parameters(), again.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(SlimlmError, match="another run"):
        distill_(perturbed(teacher), Base(teacher, tokenizer), DistillConfig(**{**config.__dict__, "lr": 2e-3}))


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"loss": "kl"}, "loss"),
        ({"beta": 1.5}, "beta"),
        ({"samples": "web"}, "samples"),
        ({"targets": "mlp"}, "targets"),
        ({"lora": 0}, "lora"),
        ({"steps": 0}, "steps"),
        ({"samples": "student", "seqlen": 8, "prompt_tokens": 8}, "prompt_tokens"),
    ],
)
def test_distill_config_refuses_bad_values(raw, match):
    with pytest.raises(SlimlmError, match=match):
        DistillConfig(**raw)


def test_recipe_prune_then_distill_learns_from_the_unpruned_model(tokenizer, text_file):
    from slimlm.evaluate.footprint import linear_sparsity
    from slimlm.pipeline import compress_
    from slimlm.recipes import parse_recipe

    model = sharp(tiny_model("qwen2"))  # untied: the blocks, not the scaled embeddings, shape the outputs
    original = copy.deepcopy(model)
    ids = text_ids(tokenizer)
    recipe = parse_recipe(
        [
            {"method": "magnitude", "sparsity": 0.5},
            {
                "method": "distill",
                "steps": 10,
                "batch_size": 4,
                "seqlen": 32,
                "lr": 3e-4,
                "warmup": 1,
                "data": text_file,
            },
        ],
        "prune-distill",
    )
    pruned = copy.deepcopy(model)
    compress_(pruned, parse_recipe([{"method": "magnitude", "sparsity": 0.5}], "prune"))
    with pytest.raises(SlimlmError, match="tokenizer"):
        compress_(copy.deepcopy(model), recipe)
    logs = compress_(model, recipe, tokenizer=tokenizer)
    assert [log.method for log in logs] == ["magnitude", "distill"]
    assert linear_sparsity(model) == pytest.approx(0.5, abs=0.01)
    assert kl_to(original, model, ids) < 0.6 * kl_to(original, pruned, ids)  # the teacher was the unpruned model


def test_cross_tokenizer_distillation_from_a_recipe_feeds_the_teacher_its_own_tokens(tokenizer, text_file, tmp_path):
    """A recipe's distill stage with `teacher:` another model whose tokenizer differs: every batch reaches the
    teacher re-encoded with its own tokenizer (Retokenized), the ULD loss trains, the loss curve reaches the log."""
    from slimlm.distill.stage import distillation_source
    from slimlm.pipeline import compress_
    from slimlm.recipes import parse_recipe

    teacher_tokenizer = tiny_tokenizer(vocab_size=300)
    teacher = tiny_model("qwen2", seed=3)
    teacher.save_pretrained(tmp_path / "teacher")
    teacher_tokenizer.save_pretrained(tmp_path / "teacher")
    stage = {
        "method": "distill",
        "loss": "uld",
        "teacher": str(tmp_path / "teacher"),
        "steps": 2,
        "batch_size": 2,
        "seqlen": 16,
        "warmup": 0,
        "data": text_file,
    }
    recipe = parse_recipe([stage], "cross-tokenizer")
    source = distillation_source(recipe.stages[0], None, teacher, tokenizer, teacher_tokenizer)
    batch = source.batch(range(2))
    text = tokenizer.decode(batch["input_ids"][0])
    expected = teacher_tokenizer(text, add_special_tokens=False)["input_ids"][:16]
    assert batch["teacher_input_ids"][0, : len(expected)].tolist() == expected
    assert not torch.equal(batch["teacher_input_ids"], batch["input_ids"])  # the student's ids would be wrong ones

    student = tiny_model("llama")
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    logs = compress_(student, recipe, tokenizer=tokenizer)
    assert any(not torch.equal(before[name], tensor) for name, tensor in student.state_dict().items())
    assert logs[0].details["steps"] == 2 and len(logs[0].details["losses"]) == 2
    assert all(math.isfinite(loss) for loss in logs[0].details["losses"])
