"""RTN against a naive reference, the packed compressed-tensors layout, and what is saved equals what is evaluated."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.quantize.grid import QuantGrid, dequantize
from slimlm.quantize.rtn import RTNConfig, rtn_quantize


def naive_rtn(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Fake-quantized weight, one group at a time, written from the definition."""
    out = torch.empty_like(weight)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = weight.shape[1] if group_size is None else group_size
    for r in range(weight.shape[0]):
        for start in range(0, weight.shape[1], g):
            w = weight[r, start : start + g]
            if symmetric:
                scale = torch.tensor(2 * w.abs().max().item() / (2**bits - 1)).half().float()
                q = torch.clamp(torch.round(w / scale), qmin, qmax)
                out[r, start : start + g] = q * scale
            else:
                lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
                scale = torch.tensor((hi - lo) / (2**bits - 1)).half().float()
                zero = min(max(qmin - round(lo / scale.item()), qmin), qmax)
                q = torch.clamp(torch.round(w / scale) + zero, qmin, qmax)
                out[r, start : start + g] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_naive(bits, group_size, symmetric):
    torch.manual_seed(bits)
    weight = torch.randn(6, 48) * 0.05
    grid = QuantGrid(bits, group_size, symmetric)
    codes, scale, zero_point = rtn_quantize(weight, grid)
    assert codes.dtype == torch.int8 and int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax
    assert scale.dtype == torch.float16 and scale.shape == (6, grid.group_count(48))
    assert (zero_point is None) == symmetric
    torch.testing.assert_close(
        dequantize(codes, scale, zero_point), naive_rtn(weight, bits, group_size, symmetric), rtol=0, atol=1e-6
    )


def test_rtn_error_shrinks_with_bits_and_groups():
    torch.manual_seed(0)
    weight = torch.randn(64, 256)

    def error(bits, group):
        codes, scale, zp = rtn_quantize(weight, QuantGrid(bits, group, False))
        return (dequantize(codes, scale, zp) - weight).pow(2).mean().item()

    assert error(8, None) < error(4, None) < error(2, None)
    assert error(4, 32) < error(4, None)


def test_zeros_survive_quantization():
    """Pruned weights must stay exactly zero after RTN, whatever the grid (pruning composes with quantization)."""
    torch.manual_seed(0)
    weight = torch.randn(8, 64)
    weight[:, ::2] = 0
    weight[0] = 0  # an all-zero row must not divide by zero
    for symmetric in (True, False):
        codes, scale, zp = rtn_quantize(weight, QuantGrid(4, 16, symmetric))
        dequant = dequantize(codes, scale, zp)
        assert torch.all(dequant[weight == 0] == 0)
        assert torch.isfinite(dequant).all()


def test_packed_layout_round_trips_through_compressed_tensors():
    """Our packed tensors decompress with compressed-tensors' own compressor to exactly our dequantized weight."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from slimlm.checkpoint.layout import pack_quantized_linear
    from slimlm.quantize.linear import QuantizedLinear

    torch.manual_seed(0)
    weight = torch.randn(32, 128) * 0.02
    for grid in (QuantGrid(4, 64, False), QuantGrid(4, 32, True), QuantGrid(8, None, True), QuantGrid(3, 64, False)):
        codes, scale, zp = rtn_quantize(weight, grid)
        module = QuantizedLinear(codes, scale, zp, grid, None, torch.float32)
        packed = {k.rpartition(".")[2]: v for k, v in pack_quantized_linear("m", module).items()}
        assert packed["weight_packed"].dtype == torch.int32
        assert packed["weight_packed"].numel() * 32 == weight.numel() * grid.bits  # dense packing, no padding here
        args = QuantizationArgs(
            num_bits=grid.bits,
            symmetric=grid.symmetric,
            strategy="channel" if grid.group_size is None else "group",
            group_size=grid.group_size,
        )
        decompressed = PackedQuantizationCompressor.decompress(
            packed, QuantizationScheme(targets=["Linear"], weights=args)
        )
        torch.testing.assert_close(
            decompressed["weight"].float(), module.dequantized_weight(), rtol=0, atol=2e-3 * weight.abs().max().item()
        )


def test_config_validation():
    with pytest.raises(SlimlmError, match="'bits' is 0"):
        RTNConfig(bits=0)
    with pytest.raises(SlimlmError, match="'bits' is 9"):
        RTNConfig(bits=9)
    with pytest.raises(SlimlmError, match="group_size"):
        RTNConfig(group_size=0)
