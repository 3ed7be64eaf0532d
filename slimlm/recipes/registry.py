"""The method table: the name a recipe stage uses -> where that method's `Stage` record lives, and what it does.

Adding a method is one file (its config dataclass, its applier and a `Stage` record at the bottom) and one row
here; nothing is discovered by walking packages. A row names its record as `module:ATTRIBUTE` and the module is
imported on first use, so listing recipes and methods (`slimlm recipes`) does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from slimlm.stage import Stage


@dataclass(frozen=True)
class Row:
    stage: str  # "module:ATTRIBUTE" of the method's Stage record
    summary: str  # one line for `slimlm recipes`


ROWS: dict[str, Row] = {
    "magnitude": Row(
        stage="slimlm.prune.magnitude:MAGNITUDE",
        summary="prune the smallest |W| per output row, unstructured or n:m",
    ),
    "wanda": Row(
        stage="slimlm.prune.wanda:WANDA",
        summary="prune the smallest |W|·‖X‖ per output row (Wanda), unstructured or n:m; needs calibration data",
    ),
    "sparsegpt": Row(
        stage="slimlm.prune.sparsegpt:SPARSEGPT",
        summary="prune by OBS saliency and update the kept weights to compensate (SparseGPT), unstructured or n:m;"
        " needs calibration data",
    ),
    "owl": Row(
        stage="slimlm.prune.owl:OWL",
        summary="per-block sparsity from each block's share of outlier Wanda scores (OWL), then Wanda or magnitude;"
        " unstructured; needs calibration data",
    ),
    "rtn": Row(
        stage="slimlm.quantize.rtn:RTN",
        summary="round-to-nearest integer weights, per channel or per group, stored packed",
    ),
    "gptq": Row(
        stage="slimlm.quantize.gptq:GPTQ",
        summary="integer weights chosen column by column, later columns updated to cancel the output error (GPTQ),"
        " per channel or per group, stored packed; needs calibration data",
    ),
    "awq": Row(
        stage="slimlm.quantize.awq:AWQ",
        summary="activation-aware per-channel scales folded into norms / producer rows, clipped ranges, then integer"
        " weights (AWQ); quantize: false only folds the scales (AWQ + GPTQ); needs calibration data",
    ),
    "smoothquant": Row(
        stage="slimlm.quantize.smoothquant:SMOOTHQUANT",
        summary="move activation outliers into the weights with per-channel scales folded into the norms"
        " (SmoothQuant); function unchanged; run before w8a8; needs calibration data",
    ),
    "w8a8": Row(
        stage="slimlm.quantize.w8a8:W8A8",
        summary="int8 weights per output channel (round to nearest) and int8 activations per token at run time"
        " (W8A8); int8_matmul: real int8 matmuls on CPU",
    ),
    "gptq-w8a8": Row(
        stage="slimlm.quantize.w8a8:GPTQ_W8A8",
        summary="W8A8 with the int8 weights chosen by GPTQ (llm-compressor's W8A8 recipe after SmoothQuant);"
        " needs calibration data",
    ),
    "depth": Row(
        stage="slimlm.prune.depth:DEPTH",
        summary="remove whole decoder blocks, the lowest block influence first (ShortGPT); needs calibration data",
    ),
    "rotate": Row(
        stage="slimlm.quantize.rotation:ROTATE",
        summary="rotate the residual stream by a random Hadamard matrix, norm gains fused (QuaRot): same function,"
        " fewer outliers for the quantizer that follows",
    ),
    "width": Row(
        stage="slimlm.prune.width:WIDTH",
        summary="remove the least active MLP channels and key/value head groups in every block (Minitron);"
        " needs calibration data",
    ),
    "distill": Row(
        stage="slimlm.distill.stage:DISTILL",
        summary="train the model to match the recipe's base model (KD: forward/reverse KL, GKD's JSD, TV, ULD;"
        " optional hidden-state and CE terms), fully or with LoRA merged back; keeps pruned zeros",
    ),
    "qat": Row(
        stage="slimlm.quantize.qat:QAT",
        summary="quantization-aware training: fake-quantized weights (straight-through rounding) and learned"
        " per-group scales (LSQ), distilled from the recipe's base (LLM-QAT; samples: teacher is data-free);"
        " starts from RTN qparams or refines an earlier rtn/gptq/awq result; stored packed",
    ),
    "finetune": Row(
        stage="slimlm.finetune.stage:FINETUNE",
        summary="fine-tune on the recipe's data (text, or chat jsonl with the loss on the answers): LoRA/DoRA merged"
        " back, or full; dp_epsilon: DP-SGD through Opacus, the ε spent in the manifest",
    ),
    "kv-cache": Row(
        stage="slimlm.quantize.kv_cache:KV_CACHE",
        summary="quantize the KV cache at inference, keys per channel and values per token, newest tokens in full"
        " precision (KIVI); weights untouched",
    ),
}


class MethodTable(Mapping[str, Stage]):
    """`METHODS[name]` is the method's Stage record (its module imported on first access); names and summaries
    need no import."""

    def __init__(self, rows: dict[str, Row]) -> None:
        self.rows = rows

    def __getitem__(self, name: str) -> Stage:
        module, attribute = self.rows[name].stage.split(":")
        return getattr(importlib.import_module(module), attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self, name: str) -> str:
        return self.rows[name].summary


METHODS = MethodTable(ROWS)
