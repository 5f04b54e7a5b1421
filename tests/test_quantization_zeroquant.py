"""refimpl.quantization.zeroquant: the scheme is group-wise weights + dynamic per-token activations
(a configuration of quantize_model_w8a8), groups beat per-row scales at 4 bits; validation. (Its
layer-by-layer distillation: tests/test_quantization_lkd.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from refimpl import anatomy
from refimpl.quantization import activation, uniform, zeroquant
from refimpl.quantization.activation import ActivationQuantizedLinear

BLOCKS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _relative_error(model, reference) -> float:
    with torch.no_grad():
        logits = model(BLOCKS).logits
    return ((logits - reference).norm() / reference.norm()).item()


def test_zeroquant_is_group_weights_and_dynamic_token_activations(tiny_llama):
    original = {n: m.weight.clone() for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    weight_grid, act_grid = uniform.Grid(4, group_size=32), uniform.Grid(8, per="token")
    same_config = activation.quantize_model_w8a8(copy.deepcopy(tiny_llama), weight_grid=weight_grid, act_grid=act_grid)
    zeroquant.quantize_model_zeroquant(tiny_llama, weight_grid, act_grid)
    layers = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, ActivationQuantizedLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        assert (layer.weight_grid.granularity, layer.weight_grid.group_size, layer.act_grid.granularity) == (
            "group", 32, "token")
        assert layer.weight_grid.symmetric and layer.act_grid.symmetric
        assert layer.input_scale is None  # dynamic: no calibrated range
        expected = uniform.fake_quantize(original[name], uniform.Grid(4, True, 32), uniform.WEIGHT_SCALE_DTYPE)
        assert torch.equal(layer.weight, expected)
    with torch.no_grad():
        assert torch.equal(tiny_llama(BLOCKS).logits, same_config(BLOCKS).logits)


def test_group_wise_beats_per_row_at_4_bits(tiny_llama):
    """One large weight per row coarsens the grid of its whole row, but only of its own group."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, linear in anatomy.compressed_linears(tiny_llama).items():
            rows = torch.arange(linear.out_features)
            linear.weight[rows, torch.randint(0, linear.in_features, (linear.out_features,), generator=g)] *= 10
        reference = tiny_llama(BLOCKS).logits
    per_row = zeroquant.quantize_model_zeroquant(copy.deepcopy(tiny_llama), uniform.Grid(4), act_grid=None)
    groups = zeroquant.quantize_model_zeroquant(copy.deepcopy(tiny_llama), uniform.Grid(4, group_size=16), act_grid=None)
    assert _relative_error(groups, reference) < 0.7 * _relative_error(per_row, reference)


def test_zeroquant_validation(tiny_llama):
    with pytest.raises(ValueError, match="group_size 48"):
        zeroquant.quantize_model_zeroquant(tiny_llama, uniform.Grid(8, group_size=48))
    with pytest.raises(TypeError, match="weight_grid must be a uniform.Grid"):
        zeroquant.quantize_model_zeroquant(tiny_llama, 16)
    with pytest.raises(ValueError, match="weight_grid must have a granularity in \\['channel', 'group'\\]"):
        zeroquant.quantize_model_zeroquant(tiny_llama, uniform.Grid(8, per="tensor"))
    with pytest.raises(ValueError, match="act_grid must have a granularity in \\['token'\\], got 'tensor'"):
        zeroquant.quantize_model_zeroquant(tiny_llama, act_grid=uniform.Grid(8, per="tensor"))
    assert not any(isinstance(m, ActivationQuantizedLinear) for m in tiny_llama.modules())
