"""SparseGPT against a naive OBS loop written here, its invariants (identity Hessian = magnitude pruning, exact
patterns, dead inputs), and end to end: closer to the dense model than magnitude pruning."""

import copy

import pytest
import torch
from conftest import tiny_model

from slimlm.calibration.stats import InputStats
from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.models.adapters import block_linears, decoder_blocks, linear_weight
from slimlm.pipeline import compress_
from slimlm.prune.magnitude import magnitude_prune
from slimlm.prune.masks import parse_pattern
from slimlm.prune.sparsegpt import SparseGPTConfig, sparsegpt_prune
from slimlm.prune.wanda import wanda_prune
from slimlm.recipes import parse_recipe


def naive_sparsegpt(weight, hessian, sparsity, pattern, block_size, dampening=0.01):
    """Column-by-column OBS in float64, no Cholesky trick and no lazy updates.

    When column j is pruned, the columns still free are j.. with Hessian H[j:, j:]; OBS moves them by
    −(w_j − q_j) · [H[j:, j:]⁻¹]_{0,:} / [H[j:, j:]⁻¹]_{0,0}, and the saliency of column j is w² / [H[j:, j:]⁻¹]_{0,0}.
    Masks are chosen when SparseGPT chooses them: per row at the start of each block (unstructured), or at
    the first column of each group of m (n:m), on the weights as updated so far.
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    H += dampening * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out_features, in_features = W.shape
    free_inverse = [torch.linalg.inv(H[j:, j:]) for j in range(in_features)]
    saliency_denominator = [free_inverse[j][0, 0].item() for j in range(in_features)]
    keep = [[True] * in_features for _ in range(out_features)]
    n_m = parse_pattern(pattern)
    for j in range(in_features):
        if n_m is None and j % block_size == 0:
            end = min(j + block_size, in_features)
            n_drop = round(end * sparsity) - round(j * sparsity)
            for r in range(out_features):
                order = sorted(range(j, end), key=lambda c: W[r, c].item() ** 2 / saliency_denominator[c])
                for c in order[:n_drop]:
                    keep[r][c] = False
        if n_m is not None and j % n_m[1] == 0:
            n, m = n_m
            for r in range(out_features):
                order = sorted(range(j, j + m), key=lambda c: W[r, c].item() ** 2 / saliency_denominator[c])
                for c in order[: m - n]:
                    keep[r][c] = False
        q = W[:, j] * torch.tensor([keep[r][j] for r in range(out_features)], dtype=W.dtype)
        inverse = free_inverse[j]
        W[:, j:] -= torch.outer((W[:, j] - q) / inverse[0, 0], inverse[0, :])
        W[:, j] = q
    return W.float()


def random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) @ torch.randn(n, n, generator=g)  # correlated inputs
    return 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize(
    "pattern, sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", 0.5), ("4:8", 0.5)]
)
@pytest.mark.parametrize("block_size", [32, 8])
def test_matches_naive_obs_loop(pattern, sparsity, block_size):
    """Blocking and lazy updates reorder the arithmetic only: same result as the eager loop, 8×32 weight."""
    torch.manual_seed(0)
    weight = torch.randn(8, 32)
    hessian = random_spd(32, seed=1)
    got = sparsegpt_prune(weight, hessian, sparsity, pattern, block_size=block_size)
    expected = naive_sparsegpt(weight, hessian, sparsity, pattern, block_size)
    assert torch.equal(got == 0, expected == 0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "pattern, sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", 0.5), ("1:4", 0.75)]
)
@pytest.mark.parametrize("block_size", [16, 128])
def test_identity_hessian_is_magnitude_pruning(pattern, sparsity, block_size):
    """With H ∝ I no weight informs another: the OBS update vanishes and the saliency is |w| (one block ≥ in)."""
    torch.manual_seed(2)
    weight = torch.randn(12, 16)
    pruned = sparsegpt_prune(weight, 3.0 * torch.eye(16), sparsity, pattern, block_size=block_size)
    assert torch.equal(pruned, magnitude_prune(weight, sparsity, pattern))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_rows_are_exact_with_uneven_blocks(sparsity):
    """Blocks of 16 over 40 columns (16, 16, 8): each row still loses exactly round(40·s) weights."""
    torch.manual_seed(3)
    weight = torch.randn(10, 40)
    pruned = sparsegpt_prune(weight, random_spd(40, seed=4), sparsity, block_size=16)
    assert torch.all((pruned == 0).sum(dim=1) == round(40 * sparsity))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_n_m_pattern_is_exact(pattern):
    torch.manual_seed(5)
    weight = torch.randn(10, 64)
    n, m = parse_pattern(pattern)
    pruned = sparsegpt_prune(weight, random_spd(64, seed=6), 0.0, pattern, block_size=16)
    assert torch.all((pruned != 0).reshape(10, 64 // m, m).sum(dim=2) == n)


def test_lower_output_error_than_wanda_and_magnitude():
    """On correlated inputs the OBS update buys a much smaller ‖(W − Ŵ)X‖ than a mask alone."""
    torch.manual_seed(7)
    x = torch.randn(512, 16) @ torch.randn(16, 64) + 0.3 * torch.randn(512, 64)  # (N, in): near a 16-dim subspace
    weight = torch.randn(32, 64)
    stats = InputStats(64, ("hessian", "input_norm"), torch.device("cpu"))
    stats.update(x)
    for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)):
        masked_only = [
            wanda_prune(weight, stats.input_norm, sparsity, pattern),
            magnitude_prune(weight, sparsity, pattern),
        ]
        best_mask_error = min((x @ (weight - pruned).t()).norm().item() for pruned in masked_only)
        for block_size in (16, 128):
            pruned = sparsegpt_prune(weight, stats.hessian, sparsity, pattern, block_size=block_size)
            assert (x @ (weight - pruned).t()).norm().item() < 0.9 * best_mask_error, (pattern, sparsity, block_size)


def test_dead_inputs_are_zeroed_without_nan():
    """Input channels that never fire (H_jj = 0) are pruned first and receive no update."""
    torch.manual_seed(8)
    x = torch.randn(256, 32)
    x[:, [3, 17]] = 0
    hessian = 2 * x.t() @ x / 256
    weight = torch.randn(8, 32, dtype=torch.bfloat16)
    for pattern in ("unstructured", "2:4"):
        pruned = sparsegpt_prune(weight, hessian, 0.5, pattern)
        assert pruned.dtype == torch.bfloat16 and torch.isfinite(pruned.float()).all()
        assert torch.all(pruned[:, [3, 17]] == 0)
    assert torch.all((sparsegpt_prune(weight, hessian, 0.5) == 0).sum(dim=1) == 16)
    assert hessian[3, 3] == 0  # the caller's Hessian (shared by q/k/v) is left alone


def test_config_and_kernel_refuse_bad_settings():
    assert SparseGPTConfig(pattern="2:4", block_size=64).target_sparsity == 0.5
    with pytest.raises(SlimlmError, match="'dampening' is 0.0, outside \\(0, 1\\]"):
        SparseGPTConfig(dampening=0.0)
    with pytest.raises(SlimlmError, match="'block_size' is 0, outside"):
        SparseGPTConfig(block_size=0)
    with pytest.raises(SlimlmError, match="not a multiple of m=8"):
        SparseGPTConfig(pattern="4:8", block_size=12)
    with pytest.raises(SlimlmError, match="multiples of 4"):
        sparsegpt_prune(torch.randn(4, 16), torch.eye(16), 0.5, "2:4", block_size=6)
    with pytest.raises(SlimlmError, match="not positive definite.*raise 'dampening'"):
        sparsegpt_prune(torch.randn(4, 16), -torch.eye(16), 0.5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compress_is_exact_and_closer_to_dense_than_magnitude(arch):
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    calibration = CalibrationSet(ids, "x", "random", 0)
    dense = tiny_model(arch)
    with torch.no_grad():
        dense_logits = dense(ids).logits
    for pattern in ("unstructured", "2:4"):
        errors = {}
        for method in ("sparsegpt", "magnitude"):
            model = copy.deepcopy(dense)
            compress_(
                model, parse_recipe([{"method": method, "sparsity": 0.5, "pattern": pattern}], method), calibration
            )
            with torch.no_grad():
                errors[method] = (model(ids).logits - dense_logits).pow(2).mean().item()
            for index in range(len(decoder_blocks(model))):
                for name, module in block_linears(model, index).items():
                    weight = linear_weight(module)  # (out, in)
                    if pattern == "unstructured":
                        assert torch.all((weight == 0).sum(dim=1) == weight.shape[1] // 2), name
                    else:
                        assert torch.all((weight != 0).reshape(weight.shape[0], -1, 4).sum(dim=2) == 2), name
        assert errors["sparsegpt"] < errors["magnitude"], (pattern, errors)
