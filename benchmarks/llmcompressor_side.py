"""Run llm-compressor on the same base weights and calibration token ids as slimlm, for side-by-side tables.

Not part of slimlm: run it with a Python that has `llmcompressor` installed (it pins its own transformers and
compressed-tensors, so keep it in its own virtual environment):

    python -m venv lc-venv && lc-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    lc-venv/bin/python benchmarks/llmcompressor_side.py BASE_DIR CALIB.pt METHOD OUT_DIR [EVAL.pt]

BASE_DIR is a dense Hugging Face directory (benchmarks/pruning.py writes one), CALIB.pt the (N, L) int64 token
ids slimlm calibrated on. The result is saved dense (uncompressed) so any evaluator can read it. Prints one JSON
line with the wall time of `oneshot`.

Quantization methods (gptq-w4-g64, gptq-w4-g64-sym, awq-w4-g64, smoothquant-gptq-w8a8) save OUT_DIR as a plain
dense model whose weights are the dequantized integer weights (what the quantized model computes with), and
OUT_DIR-packed in llm-compressor's own compressed format (its size on disk). Methods that also quantize
activations (W8A8) cannot be evaluated from dense weights: with EVAL.pt ((W, L) token ids) the perplexity is
measured here, in llm-compressor's process, where compressed-tensors quantizes the activations on the fly.
"""

import json
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

LINEARS = ["re:.*self_attn\\.(q|k|v|o)_proj$", "re:.*mlp\\.(gate|up|down)_proj$"]


def weight_args(bits: int, group_size: int | None, symmetric: bool) -> dict:
    strategy = {"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"}
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, **strategy}


def quantization_recipe(method: str) -> list:
    """llm-compressor's modifiers for the quantization rows; every projection of every block, lm_head left dense."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    w4_asym = {"group_0": {"targets": LINEARS, "weights": weight_args(4, 64, False)}}
    w4_sym = {"group_0": {"targets": LINEARS, "weights": weight_args(4, 64, True)}}
    return {
        "gptq-w4-g64": lambda: [GPTQModifier(config_groups=w4_asym, ignore=["lm_head"])],
        "gptq-w4-g64-sym": lambda: [GPTQModifier(config_groups=w4_sym, ignore=["lm_head"])],
        "awq-w4-g64": lambda: [AWQModifier(), QuantizationModifier(config_groups=w4_asym, ignore=["lm_head"])],
        "smoothquant-gptq-w8a8": lambda: [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets=LINEARS, scheme="W8A8", ignore=["lm_head"]),
        ],
    }[method]()


QUANTIZATION = ("gptq-w4-g64", "gptq-w4-g64-sym", "awq-w4-g64", "smoothquant-gptq-w8a8")
QUANTIZES_ACTIVATIONS = ("smoothquant-gptq-w8a8",)


def dequantized_copy(model, base_dir: str):
    """A plain model (no quantization config) whose linears hold the dequantized integer weights of `model`."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    wanted = plain.state_dict().keys()
    plain.load_state_dict(
        {key: value for key, value in model.state_dict().items() if key in wanted}
    )  # smoothed norms too (AWQ, SmoothQuant)
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            zero_point = getattr(module, "weight_zero_point", None)
            weight = fake_quantize(module.weight, module.weight_scale, zero_point, scheme.weights)
            plain.get_submodule(name).weight.copy_(weight)
    return plain


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token loss) over (W, L) windows, tokens 2..L of each: slimlm's GPTQ protocol."""
    total = count = 0.0
    for window in windows:
        logits = model(window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
    return float(torch.exp(torch.tensor(total / count)))


def modifier(method: str):
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    kind, _, shape = method.partition("-")
    mask = {"50": "0:0", "2of4": "2:4"}[shape]
    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[kind]
    return cls(sparsity=0.5, mask_structure=mask, targets=LINEARS)


def main(base_dir: str, calib_path: str, method: str, out_dir: str, eval_path: str | None = None) -> None:
    from llmcompressor import oneshot
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins cached activations for faster host-to-device copies, which raises on a
        # machine without an accelerator; on CPU there is nothing to copy, so pinning is skipped
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    ids = torch.load(calib_path)  # (N, L)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=quantization_recipe(method) if method in QUANTIZATION else [modifier(method)],
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    result = {"method": method, "oneshot_seconds": seconds, "samples": ids.shape[0], "seqlen": ids.shape[1]}
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if method in QUANTIZATION:
        if eval_path and method in QUANTIZES_ACTIVATIONS:
            result["perplexity_in_process"] = perplexity(model, torch.load(eval_path))
        dequantized_copy(model, base_dir).save_pretrained(out_dir)
        model.save_pretrained(f"{out_dir}-packed", save_compressed=True)
        tokenizer.save_pretrained(f"{out_dir}-packed")
    else:
        model.save_pretrained(out_dir, save_compressed=False)
    tokenizer.save_pretrained(out_dir)
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:6])
