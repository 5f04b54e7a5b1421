"""refimpl.quantization.uniform: rounding error bounds, exact zero, parity with PyTorch's fake
quantization, static ranges, RTN on a model, and input validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.quantization import uniform

SETTINGS = [("tensor", None), ("channel", None), ("group", 8), ("token", None)]


def _scales_per_element(x, qparams):
    g = uniform.grouped(x, qparams.granularity, qparams.group_size)
    return qparams.scale.expand_as(g).reshape(x.shape)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), setting=st.sampled_from(SETTINGS),
       seed=st.integers(0, 2**16), rows=st.integers(1, 5), spread=st.floats(1e-3, 1e3))
def test_rounding_error_is_at_most_half_a_step(bits, symmetric, setting, seed, rows, spread):
    granularity, group_size = setting
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed)) * spread
    qparams = uniform.compute_qparams(x, bits, symmetric, granularity, group_size)
    codes = uniform.quantize(x, qparams)
    assert qparams.qmin <= codes.min() and codes.max() <= qparams.qmax
    error = (uniform.dequantize(codes, qparams, x.shape) - x).abs()
    assert (error <= _scales_per_element(x, qparams) * (0.5 + 1e-5)).all()


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), setting=st.sampled_from(SETTINGS), seed=st.integers(0, 2**16),
       shift=st.floats(-5, 5))
def test_asymmetric_represents_zero_exactly(bits, setting, seed, shift):
    granularity, group_size = setting
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(seed)) + shift
    x[:, ::4] = 0.0  # zeros in every row and group
    out = uniform.fake_quantize(x, bits, symmetric=False, granularity=granularity, group_size=group_size)
    assert (out[:, ::4] == 0).all()


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_symmetric_codes_are_odd_functions(bits, seed):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
    qparams = uniform.compute_qparams(x, bits, symmetric=True)
    assert torch.equal(uniform.quantize(-x, qparams), -uniform.quantize(x, qparams))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_pytorch_fake_quantization_per_channel(bits, symmetric):
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(bits))
    qparams = uniform.compute_qparams(x, bits, symmetric, "channel")
    reference = torch.fake_quantize_per_channel_affine(
        x, qparams.scale.view(-1), qparams.zero_point.view(-1).int(), 0, qparams.qmin, qparams.qmax)
    torch.testing.assert_close(uniform.fake_quantize(x, bits, symmetric, "channel"), reference, rtol=0, atol=0)


def test_matches_pytorch_fake_quantization_per_tensor():
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)).view(4, 16)
    qparams = uniform.compute_qparams(x, 8, symmetric=False, granularity="tensor")
    reference = torch.fake_quantize_per_tensor_affine(x, qparams.scale.item(), int(qparams.zero_point.item()), 0, 255)
    torch.testing.assert_close(uniform.fake_quantize(x, 8, False, "tensor"), reference, rtol=0, atol=0)


def test_static_range_saturates_outside_calibration():
    calibration = torch.linspace(-1, 1, 16).view(1, 16)
    qparams = uniform.compute_qparams(calibration, 8, symmetric=True, granularity="tensor")
    codes = uniform.quantize(torch.tensor([[-5.0, 0.5, 5.0]]), qparams)
    assert codes.tolist() == [[-127, 64, 127]]


def test_finer_granularity_is_never_worse_on_outlier_rows():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    x[0] *= 50  # one outlier row
    error = {g: (uniform.fake_quantize(x, 4, True, g, s) - x).pow(2).mean().item()
             for g, s in [("tensor", None), ("channel", None), ("group", 16)]}
    assert error["group"] <= error["channel"] < error["tensor"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bits=1), ValueError, "bits must be an int in \\[2, 8\\]"),
    (dict(bits=9), ValueError, "bits"),
    (dict(bits=True), ValueError, "bits"),
    (dict(bits=4, granularity="row"), ValueError, "granularity must be one of"),
    (dict(bits=4, granularity="group", group_size=5), ValueError, "group_size 5 must divide"),
    (dict(bits=4, granularity="group", group_size=0), ValueError, "group_size"),
    (dict(bits=4, granularity="channel", group_size=8), ValueError, "group_size is only used"),
])
def test_bad_arguments_name_the_parameter(kwargs, error, match):
    with pytest.raises(error, match=match):
        uniform.compute_qparams(torch.randn(4, 16), **kwargs)


@pytest.mark.parametrize("x, error, match", [
    (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or Inf"),
    (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN or Inf"),
    (torch.ones(2, 2, dtype=torch.int32), TypeError, "floating-point"),
    (torch.empty(0, 4), ValueError, "non-empty"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
])
def test_bad_inputs_are_rejected(x, error, match):
    with pytest.raises(error, match=match):
        uniform.fake_quantize(x, 4)


@pytest.mark.parametrize("x, error, match", [
    (torch.tensor([[1.0, float("nan")]]), ValueError, "keys holds NaN or Inf"),
    (torch.ones(2, 2, dtype=torch.int32), TypeError, "keys must be a floating-point tensor"),
    (torch.tensor(1.0), ValueError, "keys must be a non-empty tensor with at least one dimension"),
    ("1.0", TypeError, "keys must be a torch.Tensor"),
])
def test_check_input_names_the_parameter(x, error, match):
    uniform.check_input(torch.randn(2, 3), "keys")  # a finite floating-point tensor passes
    with pytest.raises(error, match=match):
        uniform.check_input(x, "keys")


def test_qparams_must_fit_the_input():
    qparams = uniform.compute_qparams(torch.randn(4, 16), 4)
    with pytest.raises(ValueError, match="qparams do not fit"):
        uniform.quantize(torch.randn(3, 16), qparams)


def test_rtn_quantizes_every_linear_but_the_output_layer(tiny_llama):
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    uniform.quantize_model_rtn(tiny_llama, bits=3, group_size=16)
    for name, param in tiny_llama.named_parameters():
        changed = not torch.equal(param, before[name])
        is_linear = name.endswith("proj.weight")
        assert changed == is_linear, name
        if is_linear:  # 3 bits, groups of 16: at most 8 distinct values per group
            groups = param.view(-1, 16)
            assert max(len(torch.unique(g)) for g in groups) <= 8


def test_rtn_leaves_the_model_untouched_on_error():
    from tiny import make_tiny_llama

    model = make_tiny_llama(intermediate_size=96)  # down_proj has 96 inputs, every other layer 64
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="group_size 64 must divide the last dimension \\(96\\)"):
        uniform.quantize_model_rtn(model, bits=4, group_size=64)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_rtn_needs_linear_layers():
    with pytest.raises(ValueError, match="no nn.Linear"):
        uniform.quantize_model_rtn(torch.nn.Sequential(torch.nn.ReLU()), bits=4)


def test_small_groups_keep_their_own_step_in_float16_scales():
    """A scale below float16's smallest normal value (6.1e-5) is stored as a subnormal, not floored:
    8-bit codes of a group with absmax 1e-3 keep a step of about 1e-3 / 127."""
    w = torch.linspace(-1e-3, 1e-3, 64).reshape(1, 64)
    w_hat = uniform.fake_quantize(w, 8, True, "group", 64, torch.float16)
    assert (w_hat - w).abs().max() < 1e-5
    assert torch.equal(uniform.fake_quantize(torch.zeros(1, 64), 4, False, "group", 64, torch.float16),
                       torch.zeros(1, 64))
