"""slimlm finetune on the real SmolLM2-135M: LoRA lowers the held-out perplexity, and llama.cpp applies the GGUF
adapter beside the shipped GGUF as peft does in transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import WIKITEXT, run_cli

pytestmark = pytest.mark.slow


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def mean_nll(logits: np.ndarray, ids: list[int]) -> float:
    return float(-np.mean(log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]]))


def test_lora_on_smollm2_loads_in_peft_and_in_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from peft import PeftModel

    from slimlm.models.load import load_model, resolve_alias

    out = tmp_path / "smol-lora"
    wikitext = f"wikitext2:{WIKITEXT}"
    result = run_cli(
        "finetune",
        "smollm2-135m",
        "--data",
        wikitext,
        "--eval-data",
        wikitext,
        "--seqlen",
        "64",
        "--eval-windows",
        "8",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--out",
        out,
        "--gguf",
    )
    assert result.returncode == 0, result.stdout
    metrics = json.loads((out / "finetune.json").read_text())["metrics"]
    assert metrics["finetuned"]["perplexity"] < 0.95 * metrics["base"]["perplexity"]

    base = load_model("smollm2-135m")
    ids = base.tokenizer((WIKITEXT / "wiki.test.raw").read_text()[:3000], add_special_tokens=False)["input_ids"][:96]
    with torch.no_grad():
        plain = base.model(torch.tensor([ids])).logits[0].numpy()
        adapted = PeftModel.from_pretrained(base.model, out).eval()
        ours = adapted(input_ids=torch.tensor([ids])).logits[0].numpy()
    scores = {}
    for lora in (None, str(out / "adapter.gguf")):
        llm = llama_cpp.Llama(
            model_path=str(resolve_alias("smollm2-135m")),
            lora_path=lora,
            n_ctx=256,
            logits_all=True,
            n_threads=2,
            verbose=False,
        )
        llm.eval(ids)
        scores[lora] = np.asarray(llm.scores[: len(ids)])
    with_adapter = scores[str(out / "adapter.gguf")]
    # llama.cpp runs the Q4_1 file with 8-bit activations; transformers the dequantized weights: close, not equal
    assert abs(mean_nll(with_adapter, ids) - mean_nll(ours, ids)) < 0.05
    assert abs(mean_nll(scores[None], ids) - mean_nll(plain, ids)) < 0.05
    assert (
        mean_nll(with_adapter, ids) < mean_nll(scores[None], ids) - 0.05
    )  # the adapter changes llama.cpp's output as it changed ours
