"""slimlm's own GGUF block packers, checked bit-exact against the `gguf` package's dequantizers."""

import numpy as np
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.export.gguf_types import (
    WRITABLE,
    dequantize_tensor,
    quantize_tensor,
    tensor_bytes,
    types_for_shape,
)

BLOCK_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5}


def _naive_dequant(raw: np.ndarray, name: str) -> np.ndarray:
    """A per-block reference written from ggml's dequantize_row_* loops."""
    rows = []
    for block in raw.reshape(-1, raw.shape[-1] // (raw.shape[-1] // {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}[name])):
        d = float(block[:2].view(np.float16)[0])
        if name == "q8_0":
            rows.append(d * block[2:].view(np.int8).astype(np.float32))
            continue
        m = float(block[2:4].view(np.float16)[0]) if name in ("q4_1", "q5_1") else 0.0
        off = 4 if name in ("q4_1", "q5_1") else 2
        qh = 0
        if name in ("q5_0", "q5_1"):
            qh = int(block[off:off + 4].view(np.uint32)[0])
            off += 4
        qs = block[off:off + 16]
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


@pytest.mark.parametrize("name", ("q4_0", "q4_1", "q5_0"))
def test_importance_lowers_the_weighted_error(name):
    torch.manual_seed(2)
    weight = torch.randn(32, 64)
    importance = torch.rand(64) ** 4 * 100
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
    assert set(types_for_shape((8, 64))) == set(WRITABLE)
    assert tensor_bytes("q4_k", (576, 1536)) == 576 * 6 * 144
    with pytest.raises(SlimlmError, match="unknown GGUF type 'q9'"):
        quantize_tensor(torch.zeros(2, 32), "q9")
    with pytest.raises(SlimlmError, match="shape \\(2, 40\\) cannot be q4_0"):
        quantize_tensor(torch.zeros(2, 40), "q4_0")
