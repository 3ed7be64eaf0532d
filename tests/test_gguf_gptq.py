"""GPTQ on a GGUF type's own grid (`gptq_for_type`): lower output error than round-to-nearest on the same grid,
the invariant "diagonal Hessian = round to nearest", and the file holding exactly the codes the loop committed."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.export.gguf_types import (
    choose_grid,
    dequantize_tensor,
    gptq_for_type,
    gptq_grid_codes,
    grid_values,
    pack,
    quantize_tensor,
)

TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def _layer(seed: int, out: int = 24, cols: int = 256):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, cols, generator=g) * torch.logspace(-1, 0.3, cols)
    x = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return weight, 2 * x.t() @ x / x.shape[0]  # a random SPD Hessian from correlated inputs


def _output_error(approx: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = approx - weight
    return float(torch.trace(delta @ hessian @ delta.t()))


@pytest.mark.parametrize("name", ("q4_0", "q4_1", "q5_0", "q2_k", "q3_k", "q4_k", "q6_k"))
def test_gptq_output_error_below_round_to_nearest(name):
    weight, hessian = _layer(0)
    gptq = dequantize_tensor(
        gptq_for_type(weight, hessian, name, damp=0.01), name, weight.shape
    )  # in-sample: GPTQ's own dampening
    rtn = dequantize_tensor(quantize_tensor(weight, name, hessian.diagonal()), name, weight.shape)
    assert _output_error(gptq, weight, hessian) < 0.9 * _output_error(rtn, weight, hessian)


@pytest.mark.parametrize("name", TYPES)
def test_file_holds_the_codes_the_loop_committed(name):
    weight, hessian = _layer(1)
    grid = choose_grid(weight, name, hessian.diagonal())
    codes = gptq_grid_codes(weight, hessian, grid)
    assert int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax
    raw = gptq_for_type(weight, hessian, name)
    assert (raw == pack(codes, grid)).all()
    torch.testing.assert_close(dequantize_tensor(raw, name, weight.shape), grid_values(codes, grid), rtol=0, atol=0)


@pytest.mark.parametrize("name", ("q4_0", "q4_1", "q3_k", "q5_k"))
def test_diagonal_hessian_is_round_to_nearest(name):
    """With a diagonal H no column informs another: GPTQ's codes are the nearest ones, bytes equal quantize_tensor's."""
    weight, _ = _layer(2)
    diagonal = torch.diag(torch.rand(256) + 0.1)
    assert (gptq_for_type(weight, diagonal, name) == quantize_tensor(weight, name, diagonal.diagonal())).all()


def test_bad_shapes_are_refused():
    weight, hessian = _layer(3, cols=64)
    with pytest.raises(SlimlmError, match=r"shape \(24, 64\) cannot be q4_k: rows of 64"):
        gptq_for_type(weight, hessian, "q4_k")
    with pytest.raises(SlimlmError, match="do not match"):
        gptq_for_type(weight, hessian[:32, :32], "q4_0")
