"""OWL: the outlier ratio against a naive count, the layer-wise allocation's invariants, and end to end on a tiny
model (blocks with more outliers keep more weights, every block exact at its own sparsity)."""

import copy

import pytest
import torch
from conftest import tiny_model

from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.models.adapters import block_linears, decoder_blocks, linear_weight
from slimlm.pipeline import compress_
from slimlm.prune.owl import OWLConfig, outlier_ratio, owl_block_configs, owl_sparsities
from slimlm.prune.wanda import WandaConfig
from slimlm.recipes import parse_recipe


def naive_outlier_ratio(scores, threshold):
    values = [v for s in scores for v in s.flatten().tolist()]
    mean = sum(values) / len(values)
    return sum(v > threshold * mean for v in values) / len(values)


def test_outlier_ratio_pools_all_linears_of_the_block():
    torch.manual_seed(0)
    scores = [torch.randn(8, 16).abs() ** 3, torch.randn(4, 32).abs()]
    assert outlier_ratio(scores, 5.0) == pytest.approx(naive_outlier_ratio(scores, 5.0))
    # one mean over the block: 12 is not above 2 × 6.05 (pooled), though it is above 2 × its own tensor's mean 2.1
    assert outlier_ratio([torch.full((10,), 10.0), torch.tensor([1.0] * 9 + [12.0])], 2.0) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_sparsities_average_to_target_within_bounds_and_inverse_to_ratios(seed):
    ratios = torch.rand(7, generator=torch.Generator().manual_seed(seed)).mul(0.05).tolist()
    sparsities = owl_sparsities(ratios, 0.7, 0.08)
    assert abs(sum(sparsities) / 7 - 0.7) < 1e-9
    assert all(0.7 - 0.08 - 1e-12 <= s <= 0.7 + 0.08 + 1e-12 for s in sparsities)
    assert max(abs(s - 0.7) for s in sparsities) == pytest.approx(0.08)  # the block farthest from the mean sits at ±λ
    assert sorted(range(7), key=lambda i: ratios[i]) == sorted(range(7), key=lambda i: -sparsities[i])
    assert owl_sparsities([0.01] * 4, 0.7, 0.08) == [0.7] * 4


def reference_code_sparsities(ratios, target, lam):
    """The OWL repository's formula: min-max scale onto [0, 2λ], re-centre on the target density."""
    scaled = [(r - min(ratios)) / (max(ratios) - min(ratios)) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [1 - (x - mean + (1 - target)) for x in scaled]


def test_agrees_with_reference_code_when_ratios_are_symmetric_and_keeps_the_bounds_when_skewed():
    for symmetric in ([0.02, 0.05], [0.01, 0.02, 0.03], [0.3, 0.1, 0.2, 0.0]):
        assert owl_sparsities(symmetric, 0.6, 0.1) == pytest.approx(reference_code_sparsities(symmetric, 0.6, 0.1))
    skewed = [0.0, 0.0, 0.0, 0.1]
    assert min(reference_code_sparsities(skewed, 0.6, 0.1)) == pytest.approx(0.6 - 0.15)  # 1.5 λ below the target
    assert owl_sparsities(skewed, 0.6, 0.1) == pytest.approx([0.6 + 0.1 / 3] * 3 + [0.5])


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(pattern="2:4"), "n:m pattern fixes.*use pattern: unstructured"),
        (dict(base="sparsegpt"), "'base' is 'sparsegpt'; OWL prunes with wanda or magnitude"),
        (dict(sparsity=0.95), "reach \\[0.87, 1.03\\], outside \\[0, 1\\)"),
        (dict(sparsity=0.05), "reach \\[-0.03, 0.13\\]"),
        (dict(outlier_threshold=0.5), "'outlier_threshold' is 0.5, outside"),
    ],
)
def test_config_refuses_what_owl_cannot_do(fields, message):
    with pytest.raises(SlimlmError, match=message):
        OWLConfig(**fields)


def calibration() -> CalibrationSet:
    return CalibrationSet(torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0)), "x", "random", 0)


@pytest.mark.parametrize("planted_block", [0, 1])
def test_the_block_with_outliers_gets_lower_sparsity_and_each_block_is_exact(planted_block):
    model = tiny_model("llama")
    with torch.no_grad():  # plant outlier weights (10% of entries, ×50) in every linear of one block
        for module in block_linears(model, planted_block).values():
            planted = torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.1
            module.weight[planted] *= 50
    block_configs = owl_block_configs(model, OWLConfig(sparsity=0.7), calibration(), None)
    assert all(isinstance(c, WandaConfig) for c in block_configs)
    sparsities = [c.sparsity for c in block_configs]
    assert sparsities[planted_block] == pytest.approx(0.62) and sparsities[1 - planted_block] == pytest.approx(
        0.78
    )  # two blocks: target ∓ λ
    compress_(model, parse_recipe([{"method": "owl", "sparsity": 0.7}], "owl"), calibration())
    for index in range(len(decoder_blocks(model))):
        for name, module in block_linears(model, index).items():
            weight = linear_weight(module)  # (out, in)
            assert torch.all((weight == 0).sum(dim=1) == round(weight.shape[1] * sparsities[index])), name


def test_no_deviation_is_plain_wanda_and_untargeted_blocks_keep_the_target():
    dense = tiny_model("gpt2")
    owl, wanda = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_(owl, parse_recipe([{"method": "owl", "sparsity": 0.6, "max_deviation": 0.0}], "owl"), calibration())
    compress_(wanda, parse_recipe([{"method": "wanda", "sparsity": 0.6}], "wanda"), calibration())
    assert all(torch.equal(a, b) for a, b in zip(owl.state_dict().values(), wanda.state_dict().values(), strict=True))
    only_block_0 = OWLConfig(sparsity=0.6, base="magnitude", targets=r"\.0\.mlp\.")
    assert [c.sparsity for c in owl_block_configs(dense, only_block_0, calibration(), None)] == [0.6, 0.6]
