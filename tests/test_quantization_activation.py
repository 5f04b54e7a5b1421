"""refimpl.quantization.activation: the activation quantizer's error bound and static saturation,
per-token vs per-tensor ranges against token and channel outliers, the weight grid, the calibrated
ranges, weight-only mode equal to RTN, the straight-through gradient, an atomic module swap, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refimpl.quantization import activation, uniform
from refimpl.quantization.activation import ActivationQuantizedLinear


def _linear(n_in=32, n_out=16, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def _relative_error(x_hat, x) -> float:
    return ((x_hat - x).norm() / x.norm()).item()


@pytest.mark.parametrize("a_bits", [8, 4])
def test_dynamic_per_token_error_is_at_most_half_a_step(a_bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, generator=g) * torch.logspace(-2, 2, 15).reshape(3, 5, 1)  # tokens of very different size
    layer = ActivationQuantizedLinear(_linear(), weight_grid=None, act_grid=uniform.Grid(a_bits, per="token"))
    x_hat = layer.quantize_input(x)
    step = x.abs().amax(dim=-1, keepdim=True) / (2 ** (a_bits - 1) - 1)  # Delta per token
    assert ((x_hat - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert ((x_hat / step).round() - x_hat / step).abs().max() < 1e-3  # every value is on its token's grid
    assert not torch.equal(x_hat, x)


def test_static_range_saturates_and_dynamic_does_not():
    x = torch.tensor([[-5.0, -2.0, -1.0, 0.3, 1.99, 3.0]])
    per_tensor = uniform.Grid(8, per="tensor")
    static = ActivationQuantizedLinear(_linear(6, 2), weight_grid=None, act_grid=per_tensor, static_absmax=2.0)
    x_hat = static.quantize_input(x)
    step = 2.0 / 127
    inside = x.abs() <= 2.0
    assert ((x_hat - x).abs()[inside] <= step / 2 + 1e-6).all()
    assert torch.allclose(x_hat[~inside], torch.tensor([-2.0, 2.0]))  # -5 and 3 saturate at the calibrated +-2
    dynamic = ActivationQuantizedLinear(_linear(6, 2), weight_grid=None, act_grid=per_tensor)
    assert torch.allclose(dynamic.quantize_input(x)[~inside], torch.tensor([-5.0, 3.0]), atol=5.0 / 127)


def test_a_static_range_on_the_full_symmetric_grid():
    """narrow_range=False: the calibrated absmax is 127.5 steps, codes [-128, 127]; +absmax saturates at
    127 steps, -absmax (a tie) rounds to -128 steps."""
    full = uniform.Grid(8, per="tensor", narrow_range=False)
    static = ActivationQuantizedLinear(_linear(4, 2), weight_grid=None, act_grid=full, static_absmax=2.55)
    assert torch.equal(static.input_scale, torch.tensor([[2.55]]) / 127.5)
    x_hat = static.quantize_input(torch.tensor([[-2.55, 2.55, -9.0, 9.0]]))
    codes = (x_hat / static.input_scale).round().int()
    assert codes.tolist() == [[-128, 127, -128, 127]]


def test_per_token_isolates_token_outliers_but_not_channel_outliers():
    """The reason SmoothQuant exists: an outlier *token* only coarsens its own per-token grid, but an
    outlier *channel* is in every token, so per-token ranges are as coarse as one per-tensor range.
    Measured on the ordinary values (neither in an outlier token nor in an outlier channel)."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    tokens, channels = torch.arange(0, 256, 50), torch.tensor([3, 17])
    errors = {}
    for outlier in ("none", "token", "channel"):
        x_out, ordinary = x.clone(), torch.ones_like(x, dtype=torch.bool)
        if outlier == "token":
            x_out[tokens] *= 100.0
            ordinary[tokens] = False
        elif outlier == "channel":
            x_out[:, channels] *= 100.0
            ordinary[:, channels] = False
        for granularity in ("token", "tensor"):
            q = ActivationQuantizedLinear(_linear(64, 8), weight_grid=None, act_grid=uniform.Grid(8, per=granularity))
            errors[outlier, granularity] = _relative_error(q.quantize_input(x_out)[ordinary], x[ordinary])
    assert errors["none", "token"] < 0.02 and errors["none", "tensor"] < 0.02
    # per-token ranges isolate outlier tokens: the other tokens keep their fine grid ...
    assert errors["token", "token"] < 2 * errors["none", "token"] and errors["token", "tensor"] > 0.2
    # ... but not outlier channels: every token's grid is set by them, and ordinary values are lost
    assert errors["channel", "token"] > 20 * errors["none", "token"] and errors["channel", "tensor"] > 0.2


def test_weight_is_quantized_once_on_the_uniform_grid():
    linear = _linear()
    for grid in [uniform.Grid(4), uniform.Grid(4, group_size=8), uniform.Grid(4, per="tensor")]:
        q = ActivationQuantizedLinear(linear, weight_grid=grid, act_grid=None)
        expected = uniform.fake_quantize(linear.weight, grid, uniform.WEIGHT_SCALE_DTYPE)
        assert torch.equal(q.weight, expected) and not q.weight.requires_grad
        x = torch.randn(7, 32)
        assert torch.equal(q(x), F.linear(x, expected, linear.bias))  # act_grid=None: weight-only
    q = ActivationQuantizedLinear(linear, weight_grid=None, act_grid=uniform.Grid(8, per="token"))
    x = torch.randn(7, 32)
    assert torch.equal(q(x), F.linear(uniform.fake_quantize(x, uniform.Grid(8, per="token")), linear.weight,
                                      linear.bias))


def test_straight_through_gradient():
    q = ActivationQuantizedLinear(_linear(), weight_grid=uniform.Grid(8), act_grid=uniform.Grid(4, per="token"))
    x = torch.randn(5, 32, requires_grad=True)
    x_hat = q.quantize_input(x)
    with torch.no_grad():
        assert torch.equal(x_hat, q.quantize_input(x))  # same forward values with and without autograd
    x_hat.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_model_swap_replaces_every_linear_but_the_output_layer(tiny_llama):
    blocks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tiny_llama(blocks).logits
    activation.quantize_model_w8a8(tiny_llama)
    swapped = [n for n, m in tiny_llama.named_modules() if isinstance(m, ActivationQuantizedLinear)]
    assert len(swapped) == 14 and isinstance(tiny_llama.lm_head, nn.Linear)
    with torch.no_grad():
        logits = tiny_llama(blocks).logits
    assert 0 < _relative_error(logits, reference) < 0.05


def test_weight_only_equals_round_to_nearest(tiny_llama):
    import copy

    blocks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    rtn = uniform.quantize_model_rtn(copy.deepcopy(tiny_llama), uniform.Grid(8, symmetric=True, per="channel"))
    w8a16 = activation.quantize_model_w8a8(tiny_llama, act_grid=None)
    with torch.no_grad():
        torch.testing.assert_close(w8a16(blocks).logits, rtn(blocks).logits, rtol=0, atol=0)


def test_static_ranges_are_the_calibration_absmax(tiny_llama):
    blocks = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    seen = {}  # the same statistic from hooks on one ordinary forward pass
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0].abs().amax(dim=(0, 1))))
             for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    with torch.no_grad():
        tiny_llama(blocks)
    for hook in hooks:
        hook.remove()
    absmax = activation.activation_absmax(tiny_llama, blocks, batch_size=2)
    assert absmax.keys() == seen.keys()
    for name in seen:
        torch.testing.assert_close(absmax[name], seen[name], rtol=1e-5, atol=1e-6)
    activation.quantize_model_w8a8(tiny_llama, blocks, act_grid=uniform.Grid(8, per="tensor"), static=True)
    q_proj = tiny_llama.model.layers[1].self_attn.q_proj
    assert q_proj.input_scale.item() == pytest.approx(absmax["model.layers.1.self_attn.q_proj"].max().item() / 127)


def test_swap_is_atomic(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj"):
        activation.quantize_model_w8a8(tiny_llama)
    assert not any(isinstance(m, ActivationQuantizedLinear) for m in tiny_llama.modules())
    assert all(torch.allclose(p, before[n], rtol=0, atol=0, equal_nan=True) for n, p in tiny_llama.named_parameters())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(act_grid=8), TypeError, "act_grid must be a uniform.Grid"),
    (dict(weight_grid=(8, True)), TypeError, "weight_grid must be a uniform.Grid"),
    (dict(weight_grid=None, act_grid=None), ValueError, "nothing to quantize"),
    (dict(act_grid=uniform.Grid(8)), ValueError, "act_grid must have a granularity in \\['tensor', 'token'\\], "
                                                 "got 'channel'"),
    (dict(act_grid=uniform.Grid(8, group_size=16)), ValueError, "act_grid .* got 'group'"),
    (dict(weight_grid=uniform.Grid(8, per="token")), ValueError, "weight_grid must have a granularity in .* got 'token'"),
    (dict(static=True, act_grid=uniform.Grid(8, per="tensor")), ValueError, "blocks"),
    (dict(static=True), ValueError, "act_grid with per='tensor'"),
    (dict(weight_grid=uniform.Grid(8, group_size=48)), ValueError, "group_size 48"),
    (dict(skip=("proj", "lm_head")), ValueError, "no nn.Linear"),
])
def test_model_validation_names_the_parameter(tiny_llama, kwargs, error, match):
    with pytest.raises(error, match=match):
        activation.quantize_model_w8a8(tiny_llama, **kwargs)
    assert not any(isinstance(m, ActivationQuantizedLinear) for m in tiny_llama.modules())


def test_layer_validation():
    with pytest.raises(TypeError, match="linear"):
        ActivationQuantizedLinear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="static_absmax"):
        ActivationQuantizedLinear(_linear(), act_grid=uniform.Grid(8, per="tensor"), static_absmax=float("nan"))
    with pytest.raises(ValueError, match="static_absmax"):
        ActivationQuantizedLinear(_linear(), act_grid=uniform.Grid(8, per="token"), static_absmax=1.0)
    with pytest.raises(ValueError, match="static_absmax .* symmetric act_grid per tensor"):
        ActivationQuantizedLinear(_linear(), act_grid=uniform.Grid(8, symmetric=False, per="tensor"), static_absmax=1.0)
