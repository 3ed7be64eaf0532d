"""slimlm's own GGUF block packers, checked bit-exact against the `gguf` package's dequantizers."""

import numpy as np
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.export.gguf_types import (
    TYPES,
    WRITABLE,
    choose_grid,
    dequantize_tensor,
    grid_codes,
    grid_values,
    pack,
    quantize_tensor,
    tensor_bytes,
    types_for_shape,
)

BLOCK_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5}
K_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def _naive_dequant(raw: np.ndarray, name: str) -> np.ndarray:
    """A per-block reference written from ggml's dequantize_row_* loops."""
    rows = []
    for block in raw.reshape(
        -1, raw.shape[-1] // (raw.shape[-1] // {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}[name])
    ):
        d = float(block[:2].view(np.float16)[0])
        if name == "q8_0":
            rows.append(d * block[2:].view(np.int8).astype(np.float32))
            continue
        m = float(block[2:4].view(np.float16)[0]) if name in ("q4_1", "q5_1") else 0.0
        off = 4 if name in ("q4_1", "q5_1") else 2
        qh = 0
        if name in ("q5_0", "q5_1"):
            qh = int(block[off : off + 4].view(np.uint32)[0])
            off += 4
        qs = block[off : off + 16]
        u = np.concatenate([qs & 0xF, qs >> 4]).astype(np.int64)
        if name in ("q5_0", "q5_1"):
            u = u | (((qh >> np.arange(32)) & 1) << 4)
        centre = {"q4_0": 8, "q5_0": 16}.get(name, 0)
        rows.append(d * (u - centre) + m)
    return np.concatenate(rows).astype(np.float32)


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_packing_is_bit_exact_with_gguf_dequantizer(name):
    torch.manual_seed(0)
    weight = torch.randn(6, 96) * torch.logspace(-2, 1, 96)
    raw = quantize_tensor(weight, name)
    assert raw.nbytes == tensor_bytes(name, weight.shape)
    ours = dequantize_tensor(raw, name, weight.shape).numpy()
    np.testing.assert_array_equal(ours.reshape(-1), _naive_dequant(raw, name))
    # error is within half a level of each block's range
    assert np.abs(ours - weight.numpy()).max() < weight.abs().max().item() / 2 ** (BITS[name] - 1)


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_error_not_worse_than_llama_cpp_reference(name):
    from gguf import quants

    from slimlm.export.gguf_types import ggml_type

    torch.manual_seed(1)
    weight = torch.randn(64, 256)
    ours = dequantize_tensor(quantize_tensor(weight, name), name, weight.shape)
    ref = quants.dequantize(quants.quantize(weight.numpy(), ggml_type(name)), ggml_type(name))
    assert ((ours - weight) ** 2).sum() <= ((torch.from_numpy(ref) - weight) ** 2).sum()


@pytest.mark.parametrize("name", ("q4_0", "q4_1", "q5_0", *K_TYPES))
def test_importance_lowers_the_weighted_error(name):
    torch.manual_seed(2)
    weight = torch.randn(32, 512)
    importance = torch.rand(512) ** 4 * 100
    plain = dequantize_tensor(quantize_tensor(weight, name), name, weight.shape)
    weighted = dequantize_tensor(quantize_tensor(weight, name, importance), name, weight.shape)

    def err(approx):
        return (((approx - weight) ** 2) * importance).sum()

    assert err(weighted) < err(plain)


def test_float_types_round_trip():
    weight = torch.randn(4, 40)
    for name in ("f32", "f16", "bf16"):
        back = dequantize_tensor(quantize_tensor(weight, name), name, weight.shape)
        torch.testing.assert_close(back, weight, atol=0.02 * weight.abs().max().item(), rtol=0)
        assert quantize_tensor(weight, name).nbytes == tensor_bytes(name, weight.shape)


def test_shape_rules_and_errors():
    assert "q4_k" not in types_for_shape((8, 576), writable_only=False)
    assert "q4_k" in types_for_shape((8, 1536), writable_only=False)
    assert set(types_for_shape((8, 64))) == set(WRITABLE) - set(K_TYPES)
    assert set(K_TYPES) <= set(types_for_shape((8, 512)))
    assert tensor_bytes("q4_k", (576, 1536)) == 576 * 6 * 144
    with pytest.raises(SlimlmError, match="unknown GGUF type 'q9'"):
        quantize_tensor(torch.zeros(2, 32), "q9")
    with pytest.raises(SlimlmError, match="shape \\(2, 40\\) cannot be q4_0"):
        quantize_tensor(torch.zeros(2, 40), "q4_0")


def _rtn_kquant(weight: torch.Tensor, name: str) -> torch.Tensor:
    """Plain round-to-nearest on a k-quant grid, written from ggml's block layout: each sub-block's scale (and
    minimum) from its min/max, quantized to 4/6/8-bit integers by the largest one, codes rounded to the result."""
    # sub-block size, code range, integer scale range (the symmetric ones: signed, the extreme at its low end)
    g, qmin, qmax, slo, shi = {
        "q2_k": (16, 0, 3, 0, 15),
        "q3_k": (16, -4, 3, -32, 31),
        "q4_k": (32, 0, 15, 0, 63),
        "q5_k": (32, 0, 31, 0, 63),
        "q6_k": (16, -32, 31, -128, 127),
    }[name]
    x = weight.reshape(-1, 256 // g, g)
    if qmin < 0:
        extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
        s = extreme / qmin
        top = s.gather(-1, s.abs().argmax(-1, keepdim=True))
        d = (top / slo).half().float()
        sc = torch.round(s / d).clamp(slo, shi)
        step = (d * sc)[..., None]
        q = torch.round(x / step).clamp(qmin, qmax)
        return (q * step).reshape(weight.shape)
    low = x.amin(-1).clamp(max=0)
    s, mn = (x.amax(-1) - low) / qmax, -low
    d = (s.amax(-1, keepdim=True) / shi).half().float()
    dmin = (mn.amax(-1, keepdim=True) / shi).half().float()
    step = (d * torch.round(s / d).clamp(0, shi))[..., None]
    offset = (dmin * torch.round(mn / dmin).clamp(0, shi))[..., None]
    q = torch.round((x + offset) / step).clamp(0, qmax)
    return (q * step - offset).reshape(weight.shape)


@pytest.mark.parametrize("name", (*BLOCK_TYPES, *K_TYPES))
def test_packed_bytes_dequantize_to_the_grid_values(name):
    """What slimlm thinks the file holds (S·q + O) is what gguf's dequantizer reads back, bit for bit."""
    torch.manual_seed(3)
    weight = torch.randn(8, 512) * torch.logspace(-3, 1, 512)[torch.randperm(512)]
    weight[0, :256] = 0  # an all-zero super-block
    grid = choose_grid(weight, name)
    codes = grid_codes(weight, grid)
    raw = pack(codes, grid)
    assert raw.nbytes == tensor_bytes(name, weight.shape)
    torch.testing.assert_close(dequantize_tensor(raw, name, weight.shape), grid_values(codes, grid), rtol=0, atol=0)
    assert np.array_equal(quantize_tensor(weight, name), raw)


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quant_error_below_plain_round_to_nearest(name):
    torch.manual_seed(4)
    weight = torch.randn(64, 512) * torch.logspace(-1, 0.5, 512)[torch.randperm(512)]
    ours = dequantize_tensor(quantize_tensor(weight, name), name, weight.shape)
    assert ((ours - weight) ** 2).sum() < ((_rtn_kquant(weight, name) - weight) ** 2).sum()


def _llama_cpp_quantizer():
    """ggml's own quantize_chunk from llama-cpp-python's bundled libggml-base, or None when not installed."""
    import ctypes
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llama_cpp")
    libs = sorted(Path(spec.origin).parent.glob("lib/libggml-base.*")) if spec and spec.origin else []
    if not libs:
        return None
    lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


@pytest.mark.parametrize("name", (*BLOCK_TYPES, *K_TYPES))
def test_error_not_worse_than_llama_cpp_with_and_without_imatrix(name):
    """Against ggml's quantize_row_*_ref (no imatrix) and its imatrix quantizers, on the metric each minimises."""
    from slimlm.export.gguf_types import ggml_type

    lib = _llama_cpp_quantizer()
    if lib is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'slimlm[engines]')")
    torch.manual_seed(5)
    weight = torch.randn(32, 512) * torch.logspace(-1, 0.5, 512)[torch.randperm(512)]
    importance = torch.rand(512) ** 4 * 100

    def llama(imp):
        x = np.ascontiguousarray(weight.numpy())
        out = np.zeros(tensor_bytes(name, x.shape), np.uint8)
        imp_array = None if imp is None else np.ascontiguousarray(imp.numpy())
        lib.ggml_quantize_chunk(
            int(ggml_type(name)),
            x.ctypes.data,
            out.ctypes.data,
            0,
            x.shape[0],
            x.shape[1],
            None if imp_array is None else imp_array.ctypes.data,
        )
        return dequantize_tensor(out, name, x.shape)

    def ours(imp):
        return dequantize_tensor(quantize_tensor(weight, name, imp), name, weight.shape)

    assert ((ours(None) - weight) ** 2).sum() <= ((llama(None) - weight) ** 2).sum()
    weighted = ((ours(importance) - weight) ** 2 * importance).sum()
    assert weighted <= ((llama(importance) - weight) ** 2 * importance).sum()


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_unpacked_blocks_are_the_gguf_dequantizers_bit_for_bit(name):
    """slimlm's own unpacking (the search decodes thousands of variants) against the `gguf` package's, on random
    bytes: every code, every fp16 scale (subnormals, ±0, ±inf and NaN included) and every 5th-bit pattern."""
    from gguf import quants

    from slimlm.export.gguf_types import ggml_type

    rows = np.random.default_rng(5).integers(0, 256, (64, 4 * TYPES[name].block_bytes), dtype=np.uint8)
    ours = dequantize_tensor(rows, name, (64, 128)).numpy()
    with np.errstate(invalid="ignore", over="ignore"):  # inf·0 and NaN scales, on purpose
        ref = quants.dequantize(rows, ggml_type(name))
    np.testing.assert_array_equal(ours, ref)
