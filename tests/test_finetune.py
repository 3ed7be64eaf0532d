"""slimlm finetune on tiny random models of four families: data, peft methods, QLoRA, DP-SGD, canaries, GGUF adapters."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TEXT, run_cli, tiny_model, tiny_tokenizer

from slimlm.errors import SlimlmError
from slimlm.finetune.data import IGNORE, PoissonRows, ShuffledRows, read_rows, text_windows
from slimlm.finetune.peft_methods import apply_method, finetune_loss, per_sample_nll
from slimlm.finetune.settings import FinetuneSettings
from slimlm.quantize.linear import QuantizedLinear
from slimlm.quantize.rtn import RTNConfig, quantize_rtn_
from slimlm.train.trainer import TrainConfig, train

pytest.importorskip("peft")
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 64, 200, 31]])
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@functools.cache
def tokenizer():
    return tiny_tokenizer()


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def rows(seqlen=32):
    return text_windows(TEXT, tokenizer(), seqlen, "test text")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[:, -ids.shape[1] :]


def heldout_nll(model, data):
    with torch.no_grad():
        total, count = per_sample_nll(model, data.take(range(len(data))))
    return float(total.sum() / count.sum())


def short_train(model, data, lr, steps=15, source=None, wrap=None):
    config = TrainConfig(
        steps=steps, batch_size=4, lr=lr, warmup_steps=0, schedule="constant", clip_norm=None if wrap else 1.0
    )
    return train(model, finetune_loss, source or ShuffledRows(data, 0), config, wrap_optimizer=wrap)


# --- data ------------------------------------------------------------------------------------------------------


def test_chat_labels_cover_the_answers_only(tmp_path):
    path = tmp_path / "chat.jsonl"
    conversation = [
        {"role": "user", "content": "what is two and two"},
        {"role": "assistant", "content": "four, of course"},
        {"role": "user", "content": "and three"},
        {"role": "assistant", "content": "five minus two"},
    ]
    path.write_text(json.dumps({"messages": conversation}) + "\n" + json.dumps({"text": "plain text row"}) + "\n")
    tok = chat_tokenizer()
    data = read_rows(path, tok, 256)
    chat_labels = data.labels[0][data.labels[0] != IGNORE]
    assert (
        tok.decode(chat_labels) == "four, of course<eos>five minus two<eos>"
    )  # answers and their end-of-turn, no prompt
    plain = data.labels[1][data.attention_mask[1].bool()]
    assert tok.decode(plain).startswith("plain text row")
    assert int(data.attention_mask[1].sum()) < data.input_ids.shape[1]  # the shorter row is padded


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"txt": "x"}', 'line 2 has neither a string field "text" nor a "messages" list (it has "txt")'),
        ('{"messages": [{"role": "user"}]}', 'line 2: messages[0] needs string fields "role" and "content"'),
        ('{"messages": [{"role": "user", "content": "hi"}]}', 'line 2: no message has role "assistant"'),
        ("not json", "line 2 is not valid JSON"),
    ],
)
def test_bad_rows_name_the_line_and_field(tmp_path, line, needle):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(SlimlmError) as err:
        read_rows(path, chat_tokenizer(), 64)
    assert needle in str(err.value)


def test_chat_without_a_template_and_a_broken_template_are_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    with pytest.raises(SlimlmError, match="has no chat template"):
        read_rows(path, tokenizer(), 64)
    broken = tiny_tokenizer()
    broken.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(SlimlmError, match="chat template does not render"):
        read_rows(path, broken, 64)


def test_poisson_rows_draw_each_row_with_the_sampling_rate():
    data = rows()
    source = PoissonRows(data, batch_size=4, seed=0)
    sizes = [len(source.batch(range(step * 4, step * 4 + 4))["input_ids"]) for step in range(300)]
    assert abs(np.mean(sizes) - 4) < 0.4 and len(set(sizes)) > 3  # mean q·N, variable size
    assert torch.equal(
        source.batch(range(8, 12))["input_ids"], source.batch(range(8, 12))["input_ids"]
    )  # seeded by step


# --- methods ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "prompt-tuning", "adaption-prompt"])
def test_each_method_learns_the_data_on_every_family(arch, method):
    model = tiny_model(arch)
    data = rows()
    before = heldout_nll(model, data)
    settings = FinetuneSettings(method=method, rank=4)
    if method == "adaption-prompt" and arch not in ("llama", "gpt2"):
        with pytest.raises(SlimlmError, match="adaption prompts support"):
            apply_method(model, settings)
        return
    adapted = apply_method(model, settings)
    if method in ("lora", "dora", "adaption-prompt"):  # B = 0 / zero gates: the adapted model starts as the base
        torch.testing.assert_close(logits(adapted), logits(tiny_model(arch)), atol=1e-5, rtol=0)
    frozen = [n for n, p in adapted.named_parameters() if not p.requires_grad]
    assert any("norm" in n or "ln_" in n for n in frozen) and any("embed" in n or "wte" in n for n in frozen)
    short_train(adapted, data, settings.peak_lr)
    assert heldout_nll(adapted, data) < before - 0.02


def test_lora_merge_equals_the_adapted_model():
    adapted = apply_method(tiny_model("qwen2"), FinetuneSettings(method="lora", rank=4))
    short_train(adapted, rows(), 1e-2, steps=5)
    expected = logits(adapted)
    torch.testing.assert_close(logits(adapted.merge_and_unload()), expected, atol=1e-4, rtol=1e-4)


# --- QLoRA -----------------------------------------------------------------------------------------------------


def quantized(arch="llama"):
    from slimlm.models.adapters import block_linears, decoder_blocks

    model = tiny_model(arch)
    linears = {name: m for i in range(len(decoder_blocks(model))) for name, m in block_linears(model, i).items()}
    quantize_rtn_(model, linears, RTNConfig(bits=4, group_size=32))
    return model


def test_codes_matmul_gradient_equals_the_dense_one():
    layer = next(m for m in quantized().modules() if isinstance(m, QuantizedLinear))
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    dense_x = x.detach().clone().requires_grad_(True)
    F.linear(dense_x, layer.dequantized_weight()).square().sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad)


def test_qlora_trains_adapters_on_the_packed_codes():
    model = quantized()
    codes = model.model.layers[0].mlp.up_proj.weight_q.clone()
    data = rows()
    before = heldout_nll(model, data)
    adapted = apply_method(model, FinetuneSettings(method="lora", rank=4))
    base_layer = adapted.base_model.model.model.layers[0].mlp.up_proj.base_layer
    assert isinstance(base_layer, QuantizedLinear) and not any(p.requires_grad for p in base_layer.parameters())
    short_train(adapted, data, 1e-2)
    assert heldout_nll(adapted, data) < before - 0.05
    assert torch.equal(base_layer.weight_q, codes)  # the codes are untouched: only the adapters learned
    with pytest.raises(SlimlmError, match="DoRA needs the dense weight"):
        apply_method(quantized(), FinetuneSettings(method="dora"))


def test_qlora_adapter_of_a_saved_quantized_model_loads_back(tmp_path):
    from slimlm.checkpoint.save import save_model
    from slimlm.finetune.api import finetune, load_adapter
    from slimlm.models.load import load_model

    save_model(quantized(), tokenizer(), tmp_path / "int4", {"recipe": {"name": "rtn-w4-g32"}})
    (tmp_path / "d.txt").write_text(TEXT)
    manifest = finetune(
        str(tmp_path / "int4"),
        str(tmp_path / "d.txt"),
        tmp_path / "out",
        FinetuneSettings(seqlen=32, steps=6, batch_size=4),
    )
    assert manifest["metrics"]["finetuned"]["perplexity"] < manifest["metrics"]["base"]["perplexity"]
    with pytest.raises(SlimlmError, match="re-quantize the update away"):
        finetune(
            str(tmp_path / "int4"),
            str(tmp_path / "d.txt"),
            tmp_path / "merged",
            FinetuneSettings(seqlen=32, steps=1, batch_size=4),
            merge=True,
        )
    reloaded = load_adapter(load_model(str(tmp_path / "int4")).model, tmp_path / "out")
    base_layer = reloaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base_layer, QuantizedLinear)
    again = load_adapter(load_model(str(tmp_path / "int4")).model, tmp_path / "out")
    torch.testing.assert_close(logits(reloaded), logits(again))
    assert not torch.allclose(logits(reloaded), logits(load_model(str(tmp_path / "int4")).model), atol=1e-4)


# --- differential privacy ----------------------------------------------------------------------------------------


def test_dp_step_is_the_mean_of_clipped_per_sample_gradients():
    """Opacus' step (no noise) against per-sample clipping written out here: one backward per row."""
    pytest.importorskip("opacus")
    from slimlm.finetune.privacy import PrivacyPlan, make_private

    data = rows()
    clip, expected_rows = 0.05, 4.0
    adapted = apply_method(tiny_model("llama"), FinetuneSettings(method="lora", rank=4))
    for name, p in adapted.named_parameters():  # B ≠ 0, so A's gradients are not zero either
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    batch = {**data.take([0, 3, 5]), "weight": torch.ones(3)}
    naive = [torch.zeros_like(p) for p in trainable]
    for row in range(3):
        grads = torch.autograd.grad(finetune_loss(adapted, {k: v[row : row + 1] for k, v in batch.items()}), trainable)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        for total, g in zip(naive, grads):
            total += g * min(1.0, clip / (float(norm) + 1e-6)) / expected_rows
    plan = PrivacyPlan(
        noise_multiplier=0.0,
        max_grad_norm=clip,
        sample_rate=expected_rows / len(data),
        steps=1,
        delta=1e-5,
        accountant="rdp",
        target_epsilon=None,
    )
    wrapped, wrap = make_private(adapted, plan, len(data), seed=0)
    optimizer = wrap(torch.optim.SGD(trainable, lr=0.0))
    finetune_loss(wrapped, batch).backward()
    optimizer.pre_step()
    for p, expected in zip(trainable, naive):
        torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-4)


def test_dp_lora_trains_on_every_family(arch):
    pytest.importorskip("opacus")
    from slimlm.finetune.privacy import PrivacyPlan, make_private

    data = rows()
    adapted = apply_method(tiny_model(arch), FinetuneSettings(method="lora", rank=4))
    before = heldout_nll(adapted, data)
    plan = PrivacyPlan(
        noise_multiplier=0.3,
        max_grad_norm=1.0,
        sample_rate=4 / len(data),
        steps=15,
        delta=1e-4,
        accountant="rdp",
        target_epsilon=None,
    )
    wrapped, wrap = make_private(adapted, plan, len(data), seed=0)
    short_train(wrapped, data, 1e-2, source=PoissonRows(data, 4, 0), wrap=wrap)
    wrapped.remove_hooks()
    assert heldout_nll(adapted, data) < before - 0.02


def test_the_noise_is_solved_for_the_epsilon_target():
    pytest.importorskip("opacus")
    from slimlm.finetune.privacy import epsilon_spent, plan_privacy

    plan = plan_privacy(65, 4, 15, 1e-4, 1.0, "rdp", target_epsilon=20.0)
    assert 19.5 < plan.epsilon() <= 20.0  # the accountant's ε for the σ solved for the target, just below it
    assert (
        epsilon_spent(plan.noise_multiplier * 0.8, plan.sample_rate, 15, 1e-4, "rdp") > 20.0
    )  # less noise spends more


def test_dp_refuses_what_it_cannot_do():
    pytest.importorskip("opacus")
    from slimlm.finetune.privacy import PrivacyPlan, make_private, plan_privacy

    with pytest.raises(SlimlmError, match=r"cannot be reached by 5000 steps .* even noise multiplier 10 spends ε = "):
        plan_privacy(50, 10, 5000, 1e-5, 1.0, "rdp", target_epsilon=0.001)
    with pytest.raises(SlimlmError, match="exceeds the 50 training rows"):
        plan_privacy(50, 64, 10, 1e-5, 1.0, "prv", target_epsilon=8)
    with pytest.raises(SlimlmError, match="not below 1 / the 50 training rows"):
        plan_privacy(50, 8, 10, 0.05, 1.0, "prv", target_epsilon=8)
    plan = PrivacyPlan(1.0, 1.0, 0.1, 10, 1e-5, "rdp", None)
    with pytest.raises(SlimlmError, match=r"LlamaRMSNorm\).*use --method lora"):
        make_private(apply_method(tiny_model("llama"), FinetuneSettings(method="full")), plan, 50, 0)
    with pytest.raises(SlimlmError, match=r"DoraLinearLayer"):
        make_private(apply_method(tiny_model("llama"), FinetuneSettings(method="dora")), plan, 50, 0)


# --- canaries ---------------------------------------------------------------------------------------------------


def test_a_memorized_canary_has_high_exposure_and_an_unseen_one_does_not():
    from slimlm.finetune.canaries import canary_rows, exposure, make_canaries

    canaries = make_canaries(2, seed=0)
    model = tiny_model("llama")
    seen = canary_rows(canaries[:1], tokenizer(), repeats=8)
    train(
        model.requires_grad_(True),
        finetune_loss,
        ShuffledRows(seen, 0),
        TrainConfig(steps=40, batch_size=4, lr=3e-3, schedule="constant"),
    )
    result = exposure(model, tokenizer(), canaries, candidates=255)
    memorized, unseen = (c["exposure"] for c in result["canaries"])
    assert memorized == pytest.approx(8.0)  # rank 1 of 256
    assert unseen < 6.0
    assert result["canaries"][0]["rank"] == 1 and math.isclose(result["max_exposure"], 8.0)


# --- the verb ----------------------------------------------------------------------------------------------------


def saved_tiny(tmp_path, arch="llama"):
    path = tmp_path / f"tiny-{arch}"
    tiny_model(arch).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One `slimlm finetune` run of a tiny Llama (LoRA, merged too), shared by the tests of the saved output."""
    tmp_path = tmp_path_factory.mktemp("finetuned")
    base = saved_tiny(tmp_path)
    (tmp_path / "d.txt").write_text(TEXT)
    out = tmp_path / "out"
    result = run_cli(
        "finetune",
        base,
        "--data",
        tmp_path / "d.txt",
        "--out",
        out,
        "--seqlen",
        "32",
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--merge",
        "--canaries",
        "1",
        "--canary-repeats",
        "2",
    )
    assert result.returncode == 0, result.stdout
    return base, out


def test_cli_saves_a_peft_adapter_plain_peft_loads(finetuned):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, out = finetuned
    manifest = json.loads((out / "finetune.json").read_text())
    assert manifest["metrics"]["finetuned"]["perplexity"] < manifest["metrics"]["base"]["perplexity"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    torch.testing.assert_close(logits(loaded), logits(merged), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(merged), logits(tiny_model("llama")), atol=1e-4)


def test_an_adapter_for_another_base_is_refused(finetuned):
    from transformers import AutoModelForCausalLM

    from slimlm.finetune.api import load_adapter

    base, out = finetuned
    with pytest.raises(
        SlimlmError,
        match=r"was fine-tuned from .*tiny-llama \(llama, 2 layers.*not from this model \(llama, 2 layers, width 64, weights",
    ):
        load_adapter(tiny_model("llama", seed=1), out)
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(base), out)
    torch.testing.assert_close(
        logits(reloaded), logits(AutoModelForCausalLM.from_pretrained(out / "merged")), atol=1e-4, rtol=1e-4
    )


def test_exposure_of_the_saved_canaries_is_what_the_run_reported(finetuned):
    from transformers import AutoModelForCausalLM

    from slimlm.finetune.canaries import exposure, read_canaries

    base, out = finetuned
    reported = json.loads((out / "finetune.json").read_text())["metrics"]["canaries"]
    again = exposure(
        AutoModelForCausalLM.from_pretrained(out / "merged"), tokenizer(), read_canaries(out / "canaries.json")
    )
    assert [c["rank"] for c in again["canaries"]] == [c["rank"] for c in reported["canaries"]]
    with pytest.raises(SlimlmError, match="cannot read canaries"):
        read_canaries(out / "finetune.json")


def test_dp_finetune_records_epsilon_and_exposure(tmp_path):
    pytest.importorskip("opacus")
    from slimlm.finetune.api import finetune

    base = saved_tiny(tmp_path, "gpt2")
    (tmp_path / "d.txt").write_text(TEXT * 3)
    settings = FinetuneSettings(
        seqlen=32, steps=5, batch_size=4, dp_epsilon=8, dp_delta=1e-4, accountant="rdp", canaries=2, canary_repeats=2
    )
    manifest = finetune(str(base), str(tmp_path / "d.txt"), tmp_path / "out", settings)
    metrics = json.loads((tmp_path / "out" / "finetune.json").read_text())["metrics"]
    assert metrics == json.loads(json.dumps(manifest["metrics"]))
    assert 7.5 < metrics["privacy"]["epsilon"] <= 8.0 and metrics["privacy"]["accountant"] == "rdp"
    assert [c["prefix"] for c in metrics["canaries"]["canaries"]] == ["my secret code 0 is", "my secret code 1 is"]
    assert (tmp_path / "out" / "canaries.json").is_file() and (tmp_path / "out" / "adapter_model.safetensors").is_file()


# --- GGUF adapters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_applies_the_gguf_adapter_as_peft_does(arch, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from slimlm.export.gguf import write_gguf
    from slimlm.finetune.gguf_adapter import write_lora_gguf

    base = tmp_path / "base.gguf"
    write_gguf(tiny_model(arch), tokenizer(), base, "f16")
    adapted = apply_method(tiny_model(arch), FinetuneSettings(method="lora", rank=4, alpha=16))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(len(name)))
    write_lora_gguf(adapted, tmp_path / "adapter.gguf", base)
    expected, plain = logits(adapted)[0].numpy(), logits(tiny_model(arch))[0].numpy()
    llm = llama_cpp.Llama(
        model_path=str(base),
        lora_path=str(tmp_path / "adapter.gguf"),
        n_ctx=64,
        logits_all=True,
        n_threads=1,
        verbose=False,
    )
    llm.eval(IDS[0].tolist())
    got = np.asarray(llm.scores[: IDS.shape[1]])
    assert np.abs(got - expected).max() < 5e-3 * np.abs(expected).max()
    assert (
        np.abs(expected - plain).max() > 20 * np.abs(got - expected).max()
    )  # the adapter matters, and llama.cpp applied it


def test_gguf_adapter_for_another_base_is_refused(tmp_path):
    from slimlm.export.gguf import write_gguf
    from slimlm.finetune.gguf_adapter import write_lora_gguf

    other = tmp_path / "other.gguf"
    write_gguf(tiny_model("qwen2"), tokenizer(), other, "f16")
    adapted = apply_method(tiny_model("llama"), FinetuneSettings(method="lora", rank=4))
    with pytest.raises(
        SlimlmError, match=r"trained for a llama model with 2 blocks of width 64, but .*other.gguf' is a qwen2 model"
    ):
        write_lora_gguf(adapted, tmp_path / "adapter.gguf", other)
    assert not (tmp_path / "adapter.gguf").exists()


# --- the recipe stage --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dp", [False, True])
def test_finetune_stage_merges_into_a_plain_model_before_quantization(tmp_path, dp):
    if dp:
        pytest.importorskip("opacus")
    from slimlm.pipeline import compress_
    from slimlm.recipes import parse_recipe

    (tmp_path / "d.txt").write_text(TEXT * 2)
    model = tiny_model("qwen2")
    stage = {
        "method": "finetune",
        "data": str(tmp_path / "d.txt"),
        "rank": 4,
        "steps": 10,
        "batch_size": 4,
        "seqlen": 32,
    }
    if dp:
        stage.update(dp_epsilon=50, dp_delta=1e-4, accountant="rdp")
    logs = compress_(
        model, parse_recipe([stage, {"method": "rtn", "bits": 8, "group_size": 32}], "test"), tokenizer=tokenizer()
    )
    details = logs[0].details
    assert details["heldout_perplexity_after"] < details["heldout_perplexity_before"]
    assert ("privacy" in details) == dp and (not dp or details["privacy"]["epsilon"] <= 50)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)  # merged: rtn quantized plain linears
    assert not any("lora" in name for name, _ in model.named_parameters())
