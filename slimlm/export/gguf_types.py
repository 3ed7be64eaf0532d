"""GGUF tensor types: what each holds, its exact bytes, which shapes allow it, and slimlm's own block packers.

Block formats (ggml; a block runs along a row, fp16 scales, little-endian; `gguf.quants` dequantizes them all):

    Q8_0  32 w, 34 B: d, q[32] int8                            w = d·q
    Q4_0  32 w, 18 B: d, qs[16]                                w = d·(u − 8),   u ∈ 0..15
    Q4_1  32 w, 20 B: d, m, qs[16]                             w = d·u + m,     u ∈ 0..15
    Q5_0  32 w, 22 B: d, qh[4], qs[16]                         w = d·(u − 16),  u ∈ 0..31
    Q5_1  32 w, 24 B: d, m, qh[4], qs[16]                      w = d·u + m,     u ∈ 0..31
    (nibbles: low nibble of qs[j] is element j, high nibble element j + 16; bit j of qh is element j's 5th bit)

    k-quants: 256-weight super-blocks (rows must be a multiple of 256), sub-block scales stored as small integers
    times one fp16 super-block scale:
    Q4_K  256 w, 144 B: d, dmin, scales[12], qs[128]           w = d·sc_j·u − dmin·m_j, u ∈ 0..15, 8 sub-blocks
    Q5_K  256 w, 176 B: d, dmin, scales[12], qh[32], qs[128]   w = d·sc_j·u − dmin·m_j, u ∈ 0..31
          (sc_j, m_j 6-bit; qs[32c + l] holds elements 64c + l (low nibble) and 64c + 32 + l (high); bit 2c of
          qh[l] is the 5th bit of element 64c + l, bit 2c + 1 that of 64c + 32 + l)
    Q6_K  256 w, 210 B: ql[128], qh[64], scales[16] int8, d    w = d·sc_j·(u − 32), u ∈ 0..63, 16 sub-blocks of 16
    Q3_K  256 w, 110 B: hmask[32], qs[64], scales[12], d       w = d·sc_j·(u − 4), u ∈ 0..7, 16 sub-blocks of 16
          (sc_j + 32 6-bit: low nibbles in scales[0..7] (j, j + 8), high 2 bits of j in scales[8 + j%4] at bit 2·(j/4);
          qs[32c + l] holds the low 2 bits of element 128c + 32s + l at bit 2s, bit b of hmask[l] the 3rd bit of
          element 32b + l)
    Q2_K  256 w, 84 B: scales[16], qs[64], d, dmin             w = d·sc_j·u − dmin·m_j, u ∈ 0..3, 16 sub-blocks
          (scales[j] = sc_j | m_j << 4; qs as Q3_K's)

Every writable type is a grid per group of g weights (g = 32, 16 for Q6_K, Q3_K, Q2_K): w = S·q + O with integer codes
q ∈ [qmin, qmax] (signed for the symmetric types), S the scale and O the offset the file implies (`BlockGrid`).
`choose_grid` picks the file's fields by a search that minimises the importance-weighted squared error
Σ_j imp_j·(w_j − ŵ_j)², imp a per-input-column importance such as the diagonal of the calibration Hessian (llama.cpp's
imatrix is the same statistic; without one every column counts alike); `grid_codes` rounds to the nearest codes,
and `pack` lays them out. `quantize_tensor` is the three in a row; GPTQ (`gptq_for_type`) replaces the rounding
by its error-feedback loop on the same grid, so the codes it commits are the codes the file holds.
k-quant fields (`KQUANTS`): each sub-block's (scale, minimum) by the weighted search, the sub-block scales quantized
to the 4/6/8-bit integers with the super-block scale of least weighted error (llama.cpp's make_qp_quants), then a
local search over each sub-block's integer scale (and minimum) ±1 and the super-block scales' weighted
least-squares refit, measured on the weights themselves. The same search serves every k-quant; llama.cpp writes
Q3_K/Q2_K with make_q3_quants / make_qkx2_quants (make_qx_quants / make_qkx3_quants with an imatrix) instead.
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
    activations: str  # what llama.cpp's CPU matmul rounds the input to (ggml's vec_dot_type; `gguf_activations`)


TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("f32", 1, 4, "F32", True, "f32"),
        GGUFType("f16", 1, 2, "F16", True, "f16"),
        GGUFType("bf16", 1, 2, "BF16", True, "bf16"),
        GGUFType("q8_0", 32, 34, "Q8_0", True, "q8_0"),
        GGUFType("q4_0", 32, 18, "Q4_0", True, "q8_0"),
        GGUFType("q4_1", 32, 20, "Q4_1", True, "q8_1"),
        GGUFType("q5_0", 32, 22, "Q5_0", True, "q8_0"),
        GGUFType("q5_1", 32, 24, "Q5_1", True, "q8_1"),
        GGUFType("q2_k", 256, 84, "Q2_K", True, "q8_k"),
        GGUFType("q3_k", 256, 110, "Q3_K", True, "q8_k"),
        GGUFType("q4_k", 256, 144, "Q4_K", True, "q8_k"),
        GGUFType("q5_k", 256, 176, "Q5_K", True, "q8_k"),
        GGUFType("q6_k", 256, 210, "Q6_K", True, "q8_k"),
    )
}
WRITABLE = tuple(name for name, t in TYPES.items() if t.packed)
BLOCK_TYPES = tuple(name for name in WRITABLE if TYPES[name].block > 1)  # the quantized ones
SUPER = 256  # QK_K


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
        raise SlimlmError(
            f"a row of {shape[-1]} does not split into {t.block}-weight {name} blocks",
            f"use one of: {', '.join(types_for_shape(shape))}",
        )
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // t.block) * t.block_bytes


def types_for_shape(shape: Sequence[int], writable_only: bool = True) -> list[str]:
    """Types whose block divides the row length (k-quants need rows that are a multiple of 256)."""
    return [n for n, t in TYPES.items() if shape[-1] % t.block == 0 and (t.packed or not writable_only)]


def check_shape(name: str, shape: Sequence[int], tensor: str = "a tensor") -> None:
    """Refuse a type the shape cannot hold, naming the tensor, shape, why, and the types that can."""
    t = gguf_type(name)
    if not t.packed:
        raise SlimlmError(f"slimlm cannot write GGUF {name} yet", f"use one of: {', '.join(WRITABLE)}")
    if shape[-1] % t.block:
        raise SlimlmError(
            f"{tensor} of shape {tuple(shape)} cannot be {name}: rows of {shape[-1]} do not split into "
            f"{t.block}-weight blocks",
            f"use one of: {', '.join(types_for_shape(shape))}",
        )


# --- block kernels ------------------------------------------------------------------------------------------


def _fp16(values: torch.Tensor) -> torch.Tensor:
    """Round to what the file holds (fp16), back as float32."""
    return values.to(torch.float16).float()


def _exact(values: torch.Tensor) -> torch.Tensor:
    return values


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(..., n) floats -> (..., n·2) the little-endian bytes of their fp16 values."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape[:-1], -1)


def _weighted_error(x: torch.Tensor, approx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ w·(x − approx)² per row; `approx` is overwritten (the sweeps' temporaries are made in place, which is most
    of their speed: the same arithmetic, fewer tensors allocated)."""
    return approx.neg_().add_(x).square_().mul_(w).sum(dim=-1)


def symmetric_blocks(x: torch.Tensor, w: torch.Tensor, qmin: int, qmax: int, steps: int = 20, round_to=_fp16):
    """x, w (N, B) -> d (N,) as `round_to` leaves it, the scale whose codes in [qmin, qmax] minimise Σ w·(x − d·q)².

    Candidates put the block's extreme value at qmin + k/steps·(a level) for k in −steps..steps (llama.cpp's
    make_qx_quants sweep), each refit by weighted least squares d = Σwxq / Σwq², then d rounded as the file holds
    it (fp16; `_exact` for k-quant sub-blocks, quantized later) and the codes re-rounded for it; least error wins.
    """
    idx = x.abs().argmax(dim=-1, keepdim=True)
    extreme = x.gather(-1, idx).squeeze(-1)  # signed value with the largest magnitude
    best_d = round_to(extreme / qmin)
    best_err = _weighted_error(x, _codes(x, best_d, qmin, qmax).mul_(best_d[:, None]), w)
    wx = w * x  # the candidates' shared products (the same arithmetic as spelling them out in the loop)
    for k in range(-steps, steps + 1):
        target = qmin + k / steps
        d0 = extreme / target
        q = _codes(x, d0, qmin, qmax)
        den = (w * q).mul_(q).sum(-1)
        d = round_to(torch.where(den > 0, q.mul_(wx).sum(-1) / den.clamp(min=1e-30), d0))
        err = _weighted_error(x, _codes(x, d, qmin, qmax).mul_(d[:, None]), w)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
    return best_d


def _codes(x: torch.Tensor, d: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return (x * inv[:, None]).round_().clamp_(qmin, qmax)


def affine_blocks(
    x: torch.Tensor, w: torch.Tensor, qmax: int, steps: int = 40, round_to=_fp16, nonpositive_min: bool = False
):
    """x, w (N, B) -> (d, m (N,) as `round_to` leaves them): the scale and minimum whose codes in [0, qmax]
    minimise Σ w·(x − (d·u + m))².

    Candidate ranges shrink the block's [min, max] (llama.cpp's make_qkx2_quants sweep); each is refit by the
    2×2 weighted least squares for (d, m), rounded as the file holds them, and the codes re-rounded for it.
    `nonpositive_min`: m ≤ 0 (k-quants store −m as an unsigned integer).
    """
    low, high = x.amin(-1), x.amax(-1)
    if nonpositive_min:
        low = low.clamp(max=0)
    span = (high - low).clamp(min=1e-30)
    best_d, best_m = round_to(span / qmax), round_to(low)
    best_err = _weighted_error(x, _affine_values(x, best_d, best_m, qmax), w)
    sw, sx = w.sum(-1), (w * x).sum(-1)
    shifted = x - low[:, None]
    for k in range(steps + 1):
        scale = (qmax + (2 * k - steps) / steps) / span  # levels per unit: qmax ± 1
        q = (shifted * scale[:, None]).round_().clamp_(0, qmax)
        wq = w * q
        sq, sqq, sqx = wq.sum(-1), (wq * q).sum(-1), wq.mul_(x).sum(-1)
        det = sw * sqq - sq * sq
        ok = det > 1e-30
        d = torch.where(ok, (sw * sqx - sq * sx) / det.where(ok, torch.ones_like(det)), 1 / scale)
        m = torch.where(ok, (sqq * sx - sq * sqx) / det.where(ok, torch.ones_like(det)), low)
        if nonpositive_min:
            positive = m > 0
            d = torch.where(positive, sqx / sqq.clamp(min=1e-30), d)
            m = m.clamp(max=0)
        d, m = round_to(d.clamp(min=0)), round_to(m)
        err = _weighted_error(x, _affine_values(x, d, m, qmax), w)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
    return best_d, best_m


def _affine_codes(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, qmax: int) -> torch.Tensor:
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return (x - m[:, None]).mul_(inv[:, None]).round_().clamp_(0, qmax)


def _affine_values(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, qmax: int) -> torch.Tensor:
    """What the file's (d, m) and their codes give back for x: d·u + m."""
    return _affine_codes(x, d, m, qmax).mul_(d[:, None]).add_(m[:, None])


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


def unpack_blocks(name: str, raw: torch.Tensor) -> torch.Tensor:
    """Raw blocks (N, block bytes) uint8 of a 32-weight type -> the weights (N, 32) float32, as ggml (and the
    `gguf` package, bit for bit) computes them: fp16 scales widened, d·q (+ m) in float32. 3-5x the speed of the
    package's row-group loop, which the search calls thousands of times."""
    d = raw[:, :2].contiguous().view(torch.float16).float()  # (N, 1)
    if name == "q8_0":
        return raw[:, 2:].contiguous().view(torch.int8).float().mul_(d)
    affine = name in AFFINE
    start = 4 if affine else 2
    qs = raw[:, -16:]
    u = torch.cat([qs & 0xF, qs >> 4], dim=1)  # (N, 32)
    if name in ("q5_0", "q5_1"):
        qh = raw[:, start : start + 4].contiguous().view(torch.int32)  # (N, 1) little-endian
        u = u | (((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8) << 4)
    if affine:
        return u.float().mul_(d).add_(raw[:, 2:4].contiguous().view(torch.float16).float())
    return (u.float() - float(-SYMMETRIC[name][0])).mul_(d)


# --- grids: the file's fields as S·q + O per group --------------------------------------------------------------


@dataclass
class BlockGrid:
    """One tensor's grid (rows R, columns C): ŵ = scale·q + offset per group of `group` columns, q ∈ [qmin, qmax].

    `fields` holds what the file stores: d (and m) per 32-block; for k-quants d, dmin per super-block and the
    integer sub-block scales sc (and minima mn). scale/offset are float32 products of them, computed as ggml's
    dequantizer computes them, so S·q + O is bit-exact with what llama.cpp reads back."""

    name: str
    group: int
    qmin: int
    qmax: int
    scale: torch.Tensor  # (R, C/group) float32
    offset: torch.Tensor | None  # (R, C/group) float32, None for symmetric types
    fields: dict[str, torch.Tensor]


SYMMETRIC = {"q8_0": (-127, 127), "q4_0": (-8, 7), "q5_0": (-16, 15)}
AFFINE = {"q4_1": 15, "q5_1": 31}


@dataclass(frozen=True)
class KQuant:
    """A k-quant super-block of 256: sub-blocks of `group` codes in [qmin, qmax], each with an integer scale in
    [scale_min, scale_max] times the fp16 d, and for the affine ones an integer minimum in [0, min_max] times dmin."""

    group: int
    qmin: int
    qmax: int
    scale_min: int
    scale_max: int
    min_max: int | None = None  # None: symmetric (w = d·sc·q)


KQUANTS = {
    "q2_k": KQuant(16, 0, 3, 0, 15, 15),
    "q3_k": KQuant(16, -4, 3, -32, 31),
    "q4_k": KQuant(32, 0, 15, 0, 63, 63),
    "q5_k": KQuant(32, 0, 31, 0, 63, 63),
    "q6_k": KQuant(16, -32, 31, -128, 127),
}


def _grid_from_fields(name: str, rows: int, fields: dict[str, torch.Tensor]) -> BlockGrid:
    """scale/offset tables (R, groups) from the file's fields, computed in float32 as ggml's dequantizer does."""
    if name in SYMMETRIC or name in AFFINE:
        qmin, qmax = SYMMETRIC.get(name, (0, AFFINE.get(name)))
        m = fields.get("m")
        return BlockGrid(
            name, 32, qmin, qmax, fields["d"].reshape(rows, -1), None if m is None else m.reshape(rows, -1), fields
        )
    k = KQUANTS[name]
    d = fields["d"][:, None]  # (N, 1) per super-block
    scale = (d * fields["sc"].float()).reshape(rows, -1)  # d·sc_j
    if k.min_max is None:
        return BlockGrid(name, k.group, k.qmin, k.qmax, scale, None, fields)
    offset = -(fields["dmin"][:, None] * fields["mn"].float()).reshape(rows, -1)  # −dmin·m_j
    return BlockGrid(name, k.group, k.qmin, k.qmax, scale, offset, fields)


def _safe(grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale with 0 -> 1, offset, low, high) tables (R, groups): a zero scale has the single code 0 (ŵ = O)."""
    zero = grid.scale == 0
    scale = torch.where(zero, torch.ones_like(grid.scale), grid.scale)
    offset = grid.offset if grid.offset is not None else torch.zeros_like(scale)
    low = torch.where(zero, 0.0, float(grid.qmin)).expand_as(scale).contiguous()
    high = torch.where(zero, 0.0, float(grid.qmax)).expand_as(scale).contiguous()
    return scale, offset, low, high


def grid_codes(x: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """x (R, C) -> nearest codes (R, C) on `grid`, as the GPTQ loop rounds: clamp(round((w − O)/S), qmin, qmax)."""
    scale, offset, low, high = (t.repeat_interleave(grid.group, dim=1) for t in _safe(grid))
    return torch.div(x - offset, scale).round_().clamp_(low, high)


def grid_values(q: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """codes (R, C) -> the weights the file holds, S·q + O (float32)."""
    value = q * grid.scale.repeat_interleave(grid.group, dim=1)
    return value if grid.offset is None else value + grid.offset.repeat_interleave(grid.group, dim=1)


def _superscale(values: torch.Tensor, weights: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block scales (N, K) -> (fp16 super scale d (N,), integers L (N, K) in [lo, hi]) minimising
    Σ weights·(values − d·L)² over a sweep of the level the extreme value lands on (llama.cpp's make_qp_quants)."""
    idx = values.abs().argmax(dim=-1, keepdim=True)
    extreme = values.gather(-1, idx).squeeze(-1)
    top = float(lo if lo < 0 else hi)  # the extreme lands at the far end of the range (signed: −128 Q6_K, −32 Q3_K)
    best_d = torch.zeros_like(extreme)
    best_l = torch.zeros_like(values)
    best_err = (weights * values**2).sum(-1)
    for k in range(-8, 9):
        d0 = extreme / (top + 0.1 * k * (1 if top > 0 else -1))
        inv = torch.where(d0 != 0, 1 / d0, torch.zeros_like(d0))
        level = torch.round(values * inv[:, None]).clamp(lo, hi)
        den = (weights * level * level).sum(-1)
        d = _fp16(torch.where(den > 0, (weights * values * level).sum(-1) / den.clamp(min=1e-30), d0))
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        level = torch.round(values * inv[:, None]).clamp(lo, hi)
        err = (weights * (values - d[:, None] * level) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
        best_l = torch.where(better[:, None], level, best_l)
    return best_d, best_l


def _subblock_error(x, w, scale, offset, qmin, qmax):
    """x, w (N, K, g); scale, offset (N, K) -> weighted error (N, K) of the nearest codes."""
    zero = scale == 0
    safe = torch.where(zero, torch.ones_like(scale), scale)[..., None]
    q = (x - offset[..., None]).div_(safe).round_().clamp_(qmin, qmax).masked_fill_(zero[..., None], 0.0)
    return _weighted_error(x, (q * scale[..., None]).add_(offset[..., None]), w), q


def _kquant_fields(name: str, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Super-blocks x, w (N, 256) -> the file's fields for a k-quant (see the module docstring)."""
    n = x.shape[0]
    kq = KQUANTS[name]
    g, lo, hi, slo, shi, mhi = kq.group, kq.qmin, kq.qmax, kq.scale_min, kq.scale_max, kq.min_max or 0
    symmetric = kq.min_max is None
    xs, ws = x.reshape(n, -1, g), w.reshape(n, -1, g)  # (N, K, g)
    k = xs.shape[1]
    flat_x, flat_w = xs.reshape(-1, g), ws.reshape(-1, g)
    if symmetric:
        s = symmetric_blocks(flat_x, flat_w, lo, hi, round_to=_exact)
        mn = torch.zeros_like(s)
    else:
        s, m = affine_blocks(flat_x, flat_w, hi, round_to=_exact, nonpositive_min=True)
        mn = -m
    s, mn = s.reshape(n, k), mn.reshape(n, k)
    sw = ws.sum(-1)  # (N, K): how much each sub-block's scale matters
    d, sc = _superscale(s, sw, slo, shi)
    dmin, mi = _superscale(mn, sw, 0, mhi) if not symmetric else (torch.zeros_like(d), torch.zeros_like(sc))

    def total(d, sc, dmin, mi):
        return _subblock_error(xs, ws, d[:, None] * sc, -(dmin[:, None] * mi), lo, hi)

    err, q = total(d, sc, dmin, mi)
    steps = (-1, 0, 1)
    for _ in range(2):
        # each sub-block's integer scale (and minimum) ±1, measured on its weights
        best_err, best_sc, best_mi = err, sc, mi
        for a in steps:
            for b in steps if not symmetric else (0,):
                if a == 0 and b == 0:
                    continue
                sc_try, mi_try = (sc + a).clamp(slo, shi), (mi + b).clamp(0, mhi)
                e, _ = total(d, sc_try, dmin, mi_try)
                better = e < best_err
                best_err = torch.where(better, e, best_err)
                best_sc, best_mi = torch.where(better, sc_try, best_sc), torch.where(better, mi_try, best_mi)
        sc, mi = best_sc, best_mi
        err, q = total(d, sc, dmin, mi)
        # weighted least squares for the super-block scales given the codes: x ≈ d·(sc·q) − dmin·mi
        a_ = (sc[..., None] * q).reshape(n, -1)
        b_ = (-mi[..., None] * torch.ones_like(q)).reshape(n, -1)
        wf, xf = ws.reshape(n, -1), xs.reshape(n, -1)
        saa, sab, sbb = (wf * a_ * a_).sum(-1), (wf * a_ * b_).sum(-1), (wf * b_ * b_).sum(-1)
        sax, sbx = (wf * a_ * xf).sum(-1), (wf * b_ * xf).sum(-1)
        if symmetric:
            d_new, dmin_new = torch.where(saa > 0, sax / saa.clamp(min=1e-30), d), dmin
        else:
            det = saa * sbb - sab * sab
            ok = det > 1e-12 * (saa * sbb).clamp(min=1e-30)
            safe = torch.where(ok, det, torch.ones_like(det))
            d_new = torch.where(ok, (sbb * sax - sab * sbx) / safe, d)
            dmin_new = torch.where(ok, (saa * sbx - sab * sax) / safe, dmin)
        d_new, dmin_new = _fp16(d_new), _fp16(dmin_new)
        e_new, _ = total(d_new, sc, dmin_new, mi)
        better = e_new.sum(-1) < err.sum(-1)
        d, dmin = torch.where(better, d_new, d), torch.where(better, dmin_new, dmin)
        err, q = total(d, sc, dmin, mi)
    fields = {"d": d, "sc": sc.to(torch.int16)}
    if not symmetric:
        fields.update(dmin=dmin, mn=mi.to(torch.int16))
    return fields


def choose_grid(weight: torch.Tensor, name: str, importance: torch.Tensor | None = None) -> BlockGrid:
    """weight (R, C) -> the grid of least importance-weighted error that type `name` can hold (see module doc)."""
    t = gguf_type(name)
    x = weight.detach().float().cpu()
    rows, cols = x.shape
    w = _element_weights(importance, x)
    block = t.block
    xb, wb = x.reshape(-1, block), w.reshape(-1, block)
    chunks = [
        _block_fields(name, xc, wc) for xc, wc in zip(xb.split(SWEEP_CHUNK // block), wb.split(SWEEP_CHUNK // block))
    ]
    return _grid_from_fields(name, rows, {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]})


SWEEP_CHUNK = 65536  # values per sweep: its temporaries stay in cache (measured 2.3x faster than whole tensors; blocks are independent, so the result is the same)


def _block_fields(name: str, xb: torch.Tensor, wb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Blocks xb, wb (N, block) -> the file's fields of type `name` for them."""
    if name in SYMMETRIC:
        d = symmetric_blocks(
            xb, wb, *SYMMETRIC[name], steps=4 if name == "q8_0" else 20
        )  # 8-bit: levels are fine already
        return {"d": d}
    if name in AFFINE:
        d, m = affine_blocks(xb, wb, AFFINE[name])
        return {"d": d, "m": m}
    return _kquant_fields(name, xb, wb)


def _element_weights(importance: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if importance is None:
        return torch.ones_like(x)
    imp = importance.detach().float().cpu().clamp(min=0)
    if imp.shape != x.shape[-1:] and imp.shape != x.shape:
        raise SlimlmError(
            f"importance of shape {tuple(imp.shape)} does not match rows of {x.shape[-1]} (or the weight's {tuple(x.shape)})",
            "pass one value per input column, or one per weight",
        )
    return (imp + 1e-12 * imp.mean().clamp(min=1e-30)).expand_as(x)


def _nibbles(u: torch.Tensor, span: int) -> torch.Tensor:
    """(N, 2·span) 4-bit values -> (N, span) bytes: element l in the low nibble, element span + l in the high."""
    return ((u[:, :span] & 0xF) | ((u[:, span:] & 0xF) << 4)).to(torch.uint8)


def _crumbs(u: torch.Tensor) -> torch.Tensor:
    """(N, 256) 2-bit values -> (N, 64) bytes: element 128c + 32s + l at bits 2s of byte 32c + l (Q2_K/Q3_K's qs)."""
    shifts = (2 * torch.arange(4))[:, None]  # (4, 1) over s
    return (u.reshape(-1, 2, 4, 32) << shifts).sum(2).reshape(-1, 64).to(torch.uint8)


def pack(q: torch.Tensor, grid: BlockGrid) -> np.ndarray:
    """Codes (R, C) on `grid` -> the raw bytes the file holds, uint8 (R, C/block · block bytes)."""
    name, f = grid.name, grid.fields
    rows = q.shape[0]
    if name in SYMMETRIC or name in AFFINE:
        u = q.reshape(-1, 32)
        u = u if name == "q8_0" else u - grid.qmin  # signed codes -> the file's unsigned ones
        return pack_blocks(name, u, f["d"], f.get("m")).reshape(rows, -1).numpy()
    u = q.reshape(-1, SUPER).to(torch.int64)
    if name == "q3_k":
        u = u + 4  # (N, 256) in 0..7
        hmask = (((u >> 2) & 1).reshape(-1, 8, 32) << torch.arange(8)[:, None]).sum(1)  # (N, 32): bit b: 32b + l
        level = f["sc"].to(torch.int64) + 32  # (N, 16) 6-bit
        low, high = level & 0xF, (level >> 4).reshape(-1, 4, 4)  # high[:, s, k]: sub-block 4s + k
        scales = torch.cat([low[:, :8] | (low[:, 8:] << 4), (high << (2 * torch.arange(4))[:, None]).sum(1)], 1)
        parts = [hmask.to(torch.uint8), _crumbs(u & 3), scales.to(torch.uint8), _fp16_bytes(f["d"][:, None])]
        return torch.cat(parts, 1).reshape(rows, -1).numpy()
    if name == "q2_k":
        scales = (f["sc"].to(torch.int64) | (f["mn"].to(torch.int64) << 4)).to(torch.uint8)  # (N, 16)
        parts = [scales, _crumbs(u), _fp16_bytes(f["d"][:, None]), _fp16_bytes(f["dmin"][:, None])]
        return torch.cat(parts, 1).reshape(rows, -1).numpy()
    if name == "q6_k":
        u = u + 32
        ql = torch.cat(
            [
                torch.cat(
                    [
                        _nibbles(torch.cat([u[:, c + 0 : c + 32], u[:, c + 64 : c + 96]], 1), 32),
                        _nibbles(torch.cat([u[:, c + 32 : c + 64], u[:, c + 96 : c + 128]], 1), 32),
                    ],
                    1,
                )
                for c in (0, 128)
            ],
            1,
        )  # (N, 128)
        high = u >> 4
        qh = torch.cat(
            [
                (
                    high[:, c : c + 32]
                    | (high[:, c + 32 : c + 64] << 2)
                    | (high[:, c + 64 : c + 96] << 4)
                    | (high[:, c + 96 : c + 128] << 6)
                ).to(torch.uint8)
                for c in (0, 128)
            ],
            1,
        )  # (N, 64)
        scales = f["sc"].to(torch.int8).view(torch.uint8)
        data = torch.cat([ql, qh, scales, _fp16_bytes(f["d"][:, None])], 1)
        return data.reshape(rows, -1).numpy()
    sc, mn = f["sc"].to(torch.int64), f["mn"].to(torch.int64)  # (N, 8) 6-bit
    scales = torch.cat(
        [
            (sc[:, :4] | ((sc[:, 4:] >> 4) << 6)),
            (mn[:, :4] | ((mn[:, 4:] >> 4) << 6)),
            ((sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)),
        ],
        1,
    ).to(torch.uint8)  # (N, 12), get_scale_min_k4's layout
    qs = torch.cat([_nibbles(u[:, c : c + 64], 32) for c in range(0, SUPER, 64)], 1)  # (N, 128)
    parts = [_fp16_bytes(f["d"][:, None]), _fp16_bytes(f["dmin"][:, None]), scales]
    if name == "q5_k":
        high = (u >> 4) & 1
        qh = sum(
            (high[:, c * 64 : c * 64 + 32] << (2 * c)) | (high[:, c * 64 + 32 : c * 64 + 64] << (2 * c + 1))
            for c in range(4)
        )
        parts.append(qh.to(torch.uint8))
    parts.append(qs)
    return torch.cat(parts, 1).reshape(rows, -1).numpy()


# --- tensors ------------------------------------------------------------------------------------------------


def quantize_tensor(weight: torch.Tensor, name: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """weight (..., in) -> the raw bytes the file holds, uint8 (..., in/block · block bytes).

    `importance` (in,) weights each input column's squared error (e.g. the calibration Hessian's diagonal), or
    (..., in) each weight's (the search's embedding: `search.statistics.embedding_importance`).
    """
    x = weight.detach().float().cpu()
    check_shape(name, x.shape)
    if name in ("f32", "f16"):
        return x.numpy().astype(np.float32 if name == "f32" else np.float16).view(np.uint8)
    if name == "bf16":
        return x.to(torch.bfloat16).view(torch.uint8).numpy()
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    grid = choose_grid(flat, name, importance)
    return pack(grid_codes(flat, grid), grid).reshape(*lead, -1)


quantize_for_type = quantize_tensor  # the name the search calls it by


# GPTQ's dampening for GGUF codes, as a fraction of the Hessian's mean diagonal. GPTQ's own 0.01 fits the calibration
# text's input correlations closely, and they do not carry over to other text: on SmolLM2-135M calibrated on the
# default corpus (Python docs) and measured in llama.cpp on WikiText-2, uniform Q4_0 has KLD 0.211 at 0.01 and 0.145
# at 1.0, Q5_0 0.046 and 0.037 (Q5_1 the same at both); 10 × 512 tokens, script not yet checked in.
GGUF_GPTQ_DAMP = 1.0


def gptq_grid_codes(
    weight: torch.Tensor, hessian: torch.Tensor, grid: BlockGrid, damp: float = GGUF_GPTQ_DAMP
) -> torch.Tensor:
    """GPTQ's error-feedback loop (`quantize.gptq.error_feedback_`) on a fixed GGUF grid: weight (R, C), hessian
    (C, C) -> codes (R, C) on `grid`, exactly the ones the loop committed. Columns are visited by descending H_jj
    (act order with the grid's static groups), dead inputs (H_jj = 0) zeroed."""
    from slimlm.calibration.hessian import dampened_inverse_cholesky, working_copies
    from slimlm.quantize.gptq import DAMPENING_RETRIES, error_feedback_

    W, H = working_copies(weight, hessian)  # float32 (R, C), (C, C)
    order = torch.argsort(H.diagonal(), descending=True, stable=True)
    W, H = W[:, order], H[order][:, order]
    U = dampened_inverse_cholesky(H, damp, "gptq", retries=DAMPENING_RETRIES)
    scale, offset, low, high = (t.t().contiguous() for t in _safe(grid))  # (groups, R)
    Wt = W.t().contiguous()  # (C, R)
    error_feedback_(Wt, U, (order // grid.group).tolist(), grid.group, (scale, low, high, offset))
    return grid_codes(Wt[torch.argsort(order)].t(), grid)


def gptq_for_type(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    type_name: str,
    damp: float = GGUF_GPTQ_DAMP,
    importance: torch.Tensor | None = None,
) -> np.ndarray:
    """GPTQ on GGUF type `type_name`'s own grid: weight (out, in), hessian (in, in) -> the raw bytes the file holds.

    Each block's (or k-quant sub-block's) scale and minimum are chosen as `quantize_tensor` chooses them, from the
    original weights weighted by `importance` (default: the Hessian's diagonal, what llama.cpp's imatrix holds);
    the codes are then GPTQ's, so tr(ΔW H ΔWᵀ) drops below the round-to-nearest file's on the same grid."""
    x = weight.detach().float().cpu()
    check_shape(type_name, x.shape)
    if TYPES[type_name].block == 1:
        return quantize_tensor(x, type_name)  # float types hold the weight itself
    if hessian.shape != (x.shape[1], x.shape[1]):
        raise SlimlmError(
            f"gptq: weight {tuple(x.shape)} and Hessian {tuple(hessian.shape)} do not match",
            "pass an (out, in) weight and its (in, in) Hessian",
        )
    h = hessian.detach().float().cpu()
    grid = choose_grid(x, type_name, h.diagonal().clamp(min=0) if importance is None else importance)
    return pack(gptq_grid_codes(x, h, grid, damp), grid)


def dequantize_tensor(data: np.ndarray, name: str, shape: Sequence[int]) -> torch.Tensor:
    """Raw bytes as the file holds them -> float32 tensor of `shape`: the 32-weight types by `unpack_blocks`, the
    rest with the `gguf` package's dequantizers."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(*shape[:-1], -1)
    if name in SYMMETRIC or name in AFFINE:
        blocks = raw.reshape(-1, TYPES[name].block_bytes)
        blocks = torch.from_numpy(blocks if blocks.flags.writeable else blocks.copy())  # a mapped file's are not
        return unpack_blocks(name, blocks).reshape(tuple(shape))
    from gguf import quants

    values = quants.dequantize(raw, ggml_type(name))
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(tuple(shape)).copy())
