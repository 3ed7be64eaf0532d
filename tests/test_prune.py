"""Magnitude pruning kernels against naive references written here, and exact n:m patterns."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.prune.magnitude import MagnitudeConfig, magnitude_prune
from slimlm.prune.masks import n_m_mask, parse_pattern
from slimlm.prune.wanda import wanda_prune


def naive_row_prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    out = weight.clone()
    n_drop = round(weight.shape[1] * sparsity)
    for r in range(weight.shape[0]):
        order = sorted(range(weight.shape[1]), key=lambda c: abs(weight[r, c].item()))
        for c in order[:n_drop]:
            out[r, c] = 0
    return out


def naive_n_m_prune(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out = torch.zeros_like(weight)
    for r in range(weight.shape[0]):
        for start in range(0, weight.shape[1], m):
            group = list(range(start, start + m))
            keep = sorted(group, key=lambda c: -abs(weight[r, c].item()))[:n]
            for c in keep:
                out[r, c] = weight[r, c]
    return out


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_matches_naive(sparsity):
    torch.manual_seed(0)
    weight = torch.randn(12, 40)
    assert torch.equal(magnitude_prune(weight, sparsity), naive_row_prune(weight, sparsity))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_n_m_matches_naive_and_pattern_is_exact(pattern):
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    n, m = parse_pattern(pattern)
    pruned = magnitude_prune(weight, 1 - n / m, pattern)
    assert torch.equal(pruned, naive_n_m_prune(weight, n, m))
    nonzero_per_group = (pruned != 0).reshape(16, 64 // m, m).sum(dim=2)
    assert torch.all(nonzero_per_group == n)


def test_n_m_needs_divisible_input():
    with pytest.raises(SlimlmError, match="multiple of m=4"):
        n_m_mask(torch.randn(4, 10), 2, 4)


@pytest.mark.parametrize("bad", ["3:2", "2-4", "half", "0:4"])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(SlimlmError, match="not understood"):
        MagnitudeConfig(pattern=bad)


def test_sparsity_and_pattern_must_agree():
    assert MagnitudeConfig(pattern="2:4").target_sparsity == 0.5
    assert MagnitudeConfig(pattern="1:4").target_sparsity == 0.75
    assert MagnitudeConfig().target_sparsity == 0.5
    with pytest.raises(SlimlmError, match="contradicts"):
        MagnitudeConfig(sparsity=0.7, pattern="2:4")
    with pytest.raises(SlimlmError, match="outside"):
        MagnitudeConfig(sparsity=1.5)


def test_wanda_matches_naive_and_differs_from_magnitude():
    """Wanda = magnitude pruning of |W|·‖X‖: check against that definition, per row and per 2:4 group."""
    torch.manual_seed(2)
    weight = torch.randn(8, 32)
    activations = torch.randn(500, 32) * torch.linspace(0.1, 5, 32)  # channels of very different scale
    norm = activations.norm(dim=0)
    for pattern, reference in (
        ("unstructured", lambda s: naive_row_prune(s, 0.5)),
        ("2:4", lambda s: naive_n_m_prune(s, 2, 4)),
    ):
        pruned = wanda_prune(weight, norm, 0.5, pattern)
        expected_kept = reference(weight.abs() * norm) != 0
        assert torch.equal(pruned != 0, expected_kept)
        assert torch.equal(pruned[expected_kept], weight[expected_kept])  # kept weights are untouched
        assert not torch.equal(pruned, magnitude_prune(weight, 0.5, pattern))
    # Wanda protects weights reading large activations: the output error on the calibration data is smaller
    wanda_error = (activations @ (weight - wanda_prune(weight, norm, 0.5)).t()).pow(2).mean()
    magnitude_error = (activations @ (weight - magnitude_prune(weight, 0.5)).t()).pow(2).mean()
    assert wanda_error < magnitude_error
