import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model

from slimlm.models.adapters import adapter_for, decoder_blocks
from slimlm.quantize.smoothing import scale_linear_columns_, scale_linear_rows_, scale_norm_output_


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_folding_scales_into_every_norm_keeps_the_logits(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(0)
    for block in decoder_blocks(model):
        for norm_path, readers in adapter.input_norms:
            norm = block.get_submodule(norm_path)
            scales = torch.rand(norm.weight.shape[0], generator=generator) * 3 + 0.2
            scale_norm_output_(norm, scales)
            for reader in readers:
                scale_linear_columns_(block.get_submodule(reader), scales)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_folding_into_the_up_projection_keeps_the_mlp():
    model = tiny_model("llama")
    mlp = decoder_blocks(model)[0].mlp
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        before = mlp(x)
    scales = torch.rand(model.config.intermediate_size) + 0.5
    original_up = mlp.up_proj.weight.clone()
    scale_linear_rows_(mlp.up_proj, scales)
    scale_linear_columns_(mlp.down_proj, scales)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlp.up_proj.weight, original_up / scales.unsqueeze(1))
