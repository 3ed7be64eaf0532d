"""What llama.cpp does to a matmul's *input*: its CPU backend rounds the activations to the weight type's
`vec_dot_type` before the dot products (ggml-cpu's `type_traits_cpu`), so a GGUF file's logits differ from its
dequantized weights' logits in fp32 even when the weights are exact.

    q8_0, q8_1  blocks of 32 along the row: d = max|x| / 127 (stored fp16), q = round(x / d)   (Q4_0 ... Q8_0)
    q8_k        blocks of 256: d = −max / 127 for the value of largest magnitude, q ≤ 127    (the k-quants)
    f16, bf16   the activations converted to the weight's float type                           (F16, BF16)
    f32         unchanged

Q8_1 also stores its block's sum, which changes no value. Measured on SmolLM2 with every weight exact (its shipped
Q4_1 codes), this rounding is the whole KL llama.cpp reports against F16; the search models it so that it can spend
spare bytes where the engine's rounding costs most (`search.rerank.LiveModel`, `search.statistics`).
"""

from __future__ import annotations

import torch

from slimlm.export.gguf_types import gguf_type


def _int8_blocks(x: torch.Tensor, block: int, scale_to_fp16: bool) -> torch.Tensor:
    shape = x.shape
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} do not split into llama.cpp's activation blocks of {block}")
    blocks = x.reshape(-1, block)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    if scale_to_fp16:  # q8_0 / q8_1: q from the exact scale, the dot product uses the stored fp16 one
        d = amax / 127
        q = torch.round(blocks * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
        return (q * d.to(torch.float16).float()).reshape(shape)
    # q8_k: the largest-magnitude value maps to −127 (its sign kept), the scale stays float32
    top = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    iscale = torch.where(amax > 0, -127 / top, torch.zeros_like(top))
    q = torch.round(blocks * iscale).clamp_(max=127)
    d = torch.where(amax > 0, 1 / iscale, torch.zeros_like(iscale))
    return (q * d).reshape(shape)


ROUNDING_BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q8_1": 32, "q8_k": 256}


def engine_activations(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """x (..., in) as llama.cpp's CPU matmul sees it against a `weight_type` tensor."""
    return rounded_activations(x, gguf_type(weight_type).activations)


def rounded_activations(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (..., in) rounded to the activation type `kind` (a key of ROUNDING_BLOCK), back in x's dtype."""
    if kind == "f32":
        return x
    if kind in ("f16", "bf16"):
        return x.to(torch.float16 if kind == "f16" else torch.bfloat16).to(x.dtype)
    return _int8_blocks(x.float(), ROUNDING_BLOCK[kind], scale_to_fp16=kind != "q8_k").to(x.dtype)
