"""Run llm-compressor on the same base weights and calibration token ids as slimlm, for side-by-side tables.

Not part of slimlm: run it with a Python that has `llmcompressor` installed (it pins its own transformers and
compressed-tensors, so keep it in its own virtual environment):

    python -m venv lc-venv && lc-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    lc-venv/bin/python benchmarks/llmcompressor_side.py BASE_DIR CALIB.pt METHOD OUT_DIR

BASE_DIR is a dense Hugging Face directory (benchmarks/pruning.py writes one), CALIB.pt the (N, L) int64 token
ids slimlm calibrated on. The result is saved dense (uncompressed) so any evaluator can read it. Prints one JSON
line with the wall time of `oneshot`.
"""

import json
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

LINEARS = ["re:.*self_attn\\.(q|k|v|o)_proj$", "re:.*mlp\\.(gate|up|down)_proj$"]


def modifier(method: str):
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    kind, _, shape = method.partition("-")
    mask = {"50": "0:0", "2of4": "2:4"}[shape]
    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[kind]
    return cls(sparsity=0.5, mask_structure=mask, targets=LINEARS)


def main(base_dir: str, calib_path: str, method: str, out_dir: str) -> None:
    from llmcompressor import oneshot

    ids = torch.load(calib_path)  # (N, L)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[modifier(method)],
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir, save_compressed=False)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    print(json.dumps({"method": method, "oneshot_seconds": seconds, "samples": ids.shape[0], "seqlen": ids.shape[1]}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
