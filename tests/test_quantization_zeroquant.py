"""refimpl.quantization.zeroquant: the scheme is group-wise weights + dynamic per-token activations
(a configuration of quantize_model_w8a8), groups beat per-row scales at 4 bits, and layer-by-layer
distillation lowers each layer's error while keeping the weights on the grid; validation."""

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


def test_layerwise_distillation_lowers_each_layers_error(tiny_llama):
    with torch.no_grad():
        reference = tiny_llama(BLOCKS).logits
    teacher = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    student = zeroquant.quantize_model_zeroquant(copy.deepcopy(tiny_llama), uniform.Grid(4, group_size=32))
    rtn_weights = {n: m.weight.clone() for n, m in student.named_modules() if isinstance(m, ActivationQuantizedLinear)}
    error_before = _relative_error(student, reference)
    losses = zeroquant.layerwise_distill(tiny_llama, student, BLOCKS, steps=30, lr=1e-4, batch_size=2)
    assert len(losses) == 2 and all(after < 0.7 * before for before, after in losses)
    assert _relative_error(student, reference) < 0.8 * error_before
    for name, layer in student.named_modules():
        if isinstance(layer, ActivationQuantizedLinear):
            assert type(layer.weight) is nn.Parameter and not layer.weight.requires_grad  # parametrization removed
            assert not torch.equal(layer.weight, rtn_weights[name])  # trained ...
            torch.testing.assert_close(layer.quantize_weight(layer.weight), layer.weight, rtol=1e-6, atol=1e-8)  # ... on the grid
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(p, teacher[n]) for n, p in tiny_llama.named_parameters())  # the teacher is untouched


def test_layerwise_distill_validates(tiny_llama):
    student = zeroquant.quantize_model_zeroquant(copy.deepcopy(tiny_llama))
    with pytest.raises(ValueError, match="steps"):
        zeroquant.layerwise_distill(tiny_llama, student, BLOCKS, steps=0)
    with pytest.raises(ValueError, match="lr"):
        zeroquant.layerwise_distill(tiny_llama, student, BLOCKS, lr=0.0)
    from tiny import make_tiny_llama

    other = make_tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(TypeError, match="quantized copy"):
        zeroquant.layerwise_distill(other, student, BLOCKS)
