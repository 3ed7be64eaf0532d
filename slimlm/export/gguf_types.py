"""GGUF tensor types: what each holds, its exact bytes, which shapes allow it, and slimlm's own block packers.

Block formats (ggml; a block runs along a row, fp16 scales, little-endian; `gguf.quants` dequantizes them all):

    Q8_0  32 w, 34 B: d, q[32] int8                            w = d·q
    Q4_0  32 w, 18 B: d, qs[16]                                w = d·(u − 8),   u ∈ 0..15
    Q4_1  32 w, 20 B: d, m, qs[16]                             w = d·u + m,     u ∈ 0..15
    Q5_0  32 w, 22 B: d, qh[4], qs[16]                         w = d·(u − 16),  u ∈ 0..31
    Q5_1  32 w, 24 B: d, m, qh[4], qs[16]                      w = d·u + m,     u ∈ 0..31
    (nibbles: low nibble of qs[j] is element j, high nibble element j + 16; bit j of qh is element j's 5th bit)
    Q4_K/Q5_K/Q6_K/Q2_K/Q3_K: 256-weight super-blocks (rows must be a multiple of 256); dequantize only for now.

`quantize_tensor` chooses each block's scale (and minimum) by a search that minimises the importance-weighted
squared error Σ_j imp_j·(w_j − ŵ_j)², imp being a per-input-column importance such as the diagonal of the
calibration Hessian (llama.cpp's imatrix is the same statistic); without importance every column counts alike.
Codes are then the nearest grid points for the fp16 scale the file holds, so the error measured is the file's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class GGUFType:
    name: str
    block: int  # weights per block along a row
    block_bytes: int
    ggml: str  # gguf.GGMLQuantizationType member name
    packed: bool  # slimlm can write it (else dequantize-only)


TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("f32", 1, 4, "F32", True),
        GGUFType("f16", 1, 2, "F16", True),
        GGUFType("bf16", 1, 2, "BF16", True),
        GGUFType("q8_0", 32, 34, "Q8_0", True),
        GGUFType("q4_0", 32, 18, "Q4_0", True),
        GGUFType("q4_1", 32, 20, "Q4_1", True),
        GGUFType("q5_0", 32, 22, "Q5_0", True),
        GGUFType("q5_1", 32, 24, "Q5_1", True),
        GGUFType("q2_k", 256, 84, "Q2_K", False),
        GGUFType("q3_k", 256, 110, "Q3_K", False),
        GGUFType("q4_k", 256, 144, "Q4_K", False),
        GGUFType("q5_k", 256, 176, "Q5_K", False),
        GGUFType("q6_k", 256, 210, "Q6_K", False),
    )
}
WRITABLE = tuple(name for name, t in TYPES.items() if t.packed)


def gguf_type(name: str) -> GGUFType:
    """The table entry for `name`, or a one-line error listing the known types."""
    if name not in TYPES:
        raise SlimlmError(f"unknown GGUF type '{name}'", f"use one of: {', '.join(TYPES)}")
    return TYPES[name]


def ggml_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[gguf_type(name).ggml]


def tensor_bytes(name: str, shape: Sequence[int]) -> int:
    """Exact bytes the file holds for a tensor of `shape` (rows along the last dim) in type `name`."""
    t = gguf_type(name)
    if shape[-1] % t.block:
        raise SlimlmError(f"a row of {shape[-1]} does not split into {t.block}-weight {name} blocks", f"use one of: {', '.join(types_for_shape(shape))}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // t.block) * t.block_bytes


def types_for_shape(shape: Sequence[int], writable_only: bool = True) -> list[str]:
    """Types whose block divides the row length (k-quants need rows that are a multiple of 256)."""
    return [n for n, t in TYPES.items() if shape[-1] % t.block == 0 and (t.packed or not writable_only)]


# --- block kernels ------------------------------------------------------------------------------------------


def _fp16(values: torch.Tensor) -> torch.Tensor:
    """Round to what the file holds (fp16), back as float32."""
    return values.to(torch.float16).float()


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(..., n) floats -> (..., n·2) the little-endian bytes of their fp16 values."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape[:-1], -1)


def _weighted_error(x: torch.Tensor, approx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w * (x - approx) ** 2).sum(dim=-1)


def symmetric_blocks(x: torch.Tensor, w: torch.Tensor, qmin: int, qmax: int, steps: int = 10):
    """x, w (N, B) -> (d fp16-exact (N,), codes (N, B) int in [qmin, qmax]) minimising Σ w·(x − d·q)².

    Candidates put the block's extreme value at qmin + k/steps·(a level) for k in −steps..steps (llama.cpp's
    make_qx_quants sweep), each refit by weighted least squares d = Σwxq / Σwq², then d rounded to fp16 and the
    codes re-rounded for it; the candidate with the least error wins.
    """
    idx = x.abs().argmax(dim=-1, keepdim=True)
    extreme = x.gather(-1, idx).squeeze(-1)  # signed value with the largest magnitude
    best_d = _fp16(extreme / qmin)
    best_q = _codes(x, best_d, qmin, qmax)
    best_err = _weighted_error(x, best_d[:, None] * best_q, w)
    for k in range(-steps, steps + 1):
        target = qmin + k / steps * 0.5
        d0 = extreme / target
        q = _codes(x, d0, qmin, qmax)
        den = (w * q * q).sum(-1)
        d = _fp16(torch.where(den > 0, (w * x * q).sum(-1) / den.clamp(min=1e-30), d0))
        q = _codes(x, d, qmin, qmax)
        err = _weighted_error(x, d[:, None] * q, w)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
        best_q = torch.where(better[:, None], q, best_q)
    return best_d, best_q


def _codes(x: torch.Tensor, d: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(x * inv[:, None]).clamp(qmin, qmax)


def affine_blocks(x: torch.Tensor, w: torch.Tensor, qmax: int, steps: int = 20):
    """x, w (N, B) -> (d, m fp16-exact (N,), codes (N, B) in [0, qmax]) minimising Σ w·(x − (d·u + m))².

    Candidate ranges shrink the block's [min, max] (llama.cpp's make_qkx2_quants sweep); each is refit by the
    2×2 weighted least squares for (d, m), rounded to fp16, and the codes re-rounded for it.
    """
    low, high = x.amin(-1), x.amax(-1)
    best_d, best_m = _fp16((high - low) / qmax), _fp16(low)
    best_q = _affine_codes(x, best_d, best_m, qmax)
    best_err = _weighted_error(x, best_d[:, None] * best_q + best_m[:, None], w)
    span = (high - low).clamp(min=1e-30)
    for k in range(steps + 1):
        scale = (qmax + (k - steps / 2) / steps) / span  # levels per unit
        q = torch.round((x - low[:, None]) * scale[:, None]).clamp(0, qmax)
        sw, sq, sx = w.sum(-1), (w * q).sum(-1), (w * x).sum(-1)
        sqq, sqx = (w * q * q).sum(-1), (w * q * x).sum(-1)
        det = sw * sqq - sq * sq
        ok = det > 1e-30
        d = torch.where(ok, (sw * sqx - sq * sx) / det.where(ok, torch.ones_like(det)), 1 / scale)
        m = torch.where(ok, (sqq * sx - sq * sqx) / det.where(ok, torch.ones_like(det)), low)
        d, m = _fp16(d.clamp(min=0)), _fp16(m)
        q = _affine_codes(x, d, m, qmax)
        err = _weighted_error(x, d[:, None] * q + m[:, None], w)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
        best_q = torch.where(better[:, None], q, best_q)
    return best_d, best_m, best_q


def _affine_codes(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, qmax: int) -> torch.Tensor:
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round((x - m[:, None]) * inv[:, None]).clamp(0, qmax)


def pack_blocks(name: str, u: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Unsigned codes u (N, 32) (signed int8 for q8_0), scale d (N,) and minimum m (N,) -> (N, block bytes) uint8."""
    parts = [_fp16_bytes(d[:, None])]
    if name in ("q4_1", "q5_1"):
        parts.append(_fp16_bytes(m[:, None]))
    if name == "q8_0":
        parts.append(u.to(torch.int8).view(torch.uint8))
        return torch.cat(parts, dim=1)
    u = u.to(torch.int64)
    if name in ("q5_0", "q5_1"):
        high = (u >> 4) & 1  # (N, 32): the 5th bit of element j is bit j of a little-endian uint32
        qh = (high << torch.arange(32)).sum(-1)
        parts.append(torch.stack([(qh >> (8 * i)) & 0xFF for i in range(4)], dim=1).to(torch.uint8))
    low = u & 0xF
    parts.append((low[:, :16] | (low[:, 16:] << 4)).to(torch.uint8))
    return torch.cat(parts, dim=1)


# --- tensors ------------------------------------------------------------------------------------------------


def quantize_tensor(weight: torch.Tensor, name: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """weight (..., in) -> the raw bytes the file holds, uint8 (..., in/block · block bytes).

    `importance` (in,) weights each input column's squared error (e.g. the calibration Hessian's diagonal).
    """
    t = gguf_type(name)
    x = weight.detach().float().cpu()
    if not t.packed:
        raise SlimlmError(f"slimlm cannot write GGUF {name} yet", f"use one of: {', '.join(WRITABLE)}")
    if x.shape[-1] % t.block:
        raise SlimlmError(
            f"a tensor of shape {tuple(x.shape)} cannot be {name}: rows of {x.shape[-1]} do not split into {t.block}-weight blocks",
            f"use one of: {', '.join(types_for_shape(x.shape))}",
        )
    lead = x.shape[:-1]
    if name in ("f32", "f16"):
        return x.numpy().astype(np.float32 if name == "f32" else np.float16).view(np.uint8)
    if name == "bf16":
        return x.to(torch.bfloat16).view(torch.uint8).numpy()
    blocks = x.reshape(-1, t.block)
    if importance is None:
        w = torch.ones_like(blocks)
    else:
        imp = importance.detach().float().cpu().clamp(min=0)
        if imp.shape != x.shape[-1:]:
            raise SlimlmError(f"importance of shape {tuple(imp.shape)} does not match rows of {x.shape[-1]}", "pass one value per input column")
        w = (imp + 1e-12 * imp.mean().clamp(min=1e-30)).repeat(blocks.shape[0] // (x.shape[-1] // t.block)).reshape(blocks.shape)
    if name in ("q4_0", "q5_0", "q8_0"):
        half = {"q4_0": 8, "q5_0": 16, "q8_0": 128}[name]
        qmin, qmax = (-127, 127) if name == "q8_0" else (-half, half - 1)
        d, q = symmetric_blocks(blocks, w, qmin, qmax)
        packed = pack_blocks(name, q if name == "q8_0" else q + half, d)
    else:
        d, m, q = affine_blocks(blocks, w, 15 if name == "q4_1" else 31)
        packed = pack_blocks(name, q, d, m)
    return packed.reshape(*lead, -1).numpy()


def dequantize_tensor(data: np.ndarray, name: str, shape: Sequence[int]) -> torch.Tensor:
    """Raw bytes as the file holds them -> float32 tensor of `shape`, with the `gguf` package's dequantizers."""
    from gguf import quants

    raw = np.ascontiguousarray(data).view(np.uint8).reshape(*shape[:-1], -1)
    values = quants.dequantize(raw, ggml_type(name))
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(tuple(shape)).copy())
