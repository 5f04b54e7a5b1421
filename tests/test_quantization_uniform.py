"""refimpl.quantization.uniform: rounding error bounds, exact zero, parity with PyTorch's fake
quantization, static ranges, RTN on a model, and input validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.quantization import uniform

SETTINGS = [dict(per="tensor"), dict(per="channel"), dict(group_size=8), dict(per="token")]


def _scales_per_element(x, qparams):
    g = uniform.grouped(x, qparams.grid)
    return qparams.scale.expand_as(g).reshape(x.shape)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), narrow=st.booleans(), setting=st.sampled_from(SETTINGS),
       seed=st.integers(0, 2**16), rows=st.integers(1, 5), spread=st.floats(1e-3, 1e3))
def test_rounding_error_is_at_most_half_a_step(bits, symmetric, narrow, setting, seed, rows, spread):
    """Both symmetric ranges too: on the full range +absmax lies half a step beyond q_max."""
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed)) * spread
    grid = uniform.Grid(bits, symmetric, narrow_range=narrow if symmetric else None, **setting)
    qparams = uniform.compute_qparams(x, grid)
    codes = uniform.quantize(x, qparams)
    assert qparams.grid.qmin <= codes.min() and codes.max() <= qparams.grid.qmax
    error = (uniform.dequantize(codes, qparams, x.shape) - x).abs()
    assert (error <= _scales_per_element(x, qparams) * (0.5 + 1e-5)).all()


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), setting=st.sampled_from(SETTINGS), seed=st.integers(0, 2**16),
       shift=st.floats(-5, 5))
def test_asymmetric_represents_zero_exactly(bits, setting, seed, shift):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(seed)) + shift
    x[:, ::4] = 0.0  # zeros in every row and group
    out = uniform.fake_quantize(x, uniform.Grid(bits, symmetric=False, **setting))
    assert (out[:, ::4] == 0).all()


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_symmetric_codes_are_odd_functions(bits, seed):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
    qparams = uniform.compute_qparams(x, uniform.Grid(bits, symmetric=True))
    assert torch.equal(uniform.quantize(-x, qparams), -uniform.quantize(x, qparams))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_pytorch_fake_quantization_per_channel(bits, symmetric):
    """Not the full symmetric range: PyTorch multiplies by 1/s, which moves -absmax (there a tie at
    -(2^(b-1) - 1/2) steps) to either side; GPTQ's reference divides, as we do (test below)."""
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(bits))
    grid = uniform.Grid(bits, symmetric, per="channel")
    qparams = uniform.compute_qparams(x, grid)
    reference = torch.fake_quantize_per_channel_affine(
        x, qparams.scale.view(-1), qparams.zero_point.view(-1).int(), 0, grid.qmin, grid.qmax)
    torch.testing.assert_close(uniform.fake_quantize(x, grid), reference, rtol=0, atol=0)


def test_matches_pytorch_fake_quantization_per_tensor():
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)).view(4, 16)
    grid = uniform.Grid(8, symmetric=False, per="tensor")
    qparams = uniform.compute_qparams(x, grid)
    reference = torch.fake_quantize_per_tensor_affine(x, qparams.scale.item(), int(qparams.zero_point.item()), 0, 255)
    torch.testing.assert_close(uniform.fake_quantize(x, grid), reference, rtol=0, atol=0)


def test_static_range_saturates_outside_calibration():
    calibration = torch.linspace(-1, 1, 16).view(1, 16)
    qparams = uniform.compute_qparams(calibration, uniform.Grid(8, symmetric=True, per="tensor"))
    codes = uniform.quantize(torch.tensor([[-5.0, 0.5, 5.0]]), qparams)
    assert codes.tolist() == [[-127, 64, 127]]


def test_finer_granularity_is_never_worse_on_outlier_rows():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    x[0] *= 50  # one outlier row
    error = {grid.granularity: (uniform.fake_quantize(x, grid) - x).pow(2).mean().item()
             for grid in [uniform.Grid(4, per="tensor"), uniform.Grid(4), uniform.Grid(4, group_size=16)]}
    assert error["group"] <= error["channel"] < error["tensor"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bits=1), ValueError, "bits must be an int in \\[2, 8\\], got 1"),
    (dict(bits=9), ValueError, "bits"),
    (dict(bits=True), ValueError, "bits"),
    (dict(bits=4.0), ValueError, "bits"),
    (dict(bits=4, symmetric=1), TypeError, "symmetric must be a bool"),
    (dict(bits=4, symmetric=None), TypeError, "symmetric must be a bool"),
    (dict(bits=4, per="row"), ValueError, "per must be one of \\['tensor', 'channel', 'token'\\]"),
    (dict(bits=4, per="group"), ValueError, "per must be one of"),
    (dict(bits=4, group_size=0), ValueError, "group_size must be a positive int, got 0"),
    (dict(bits=4, group_size=8.0), ValueError, "group_size must be a positive int"),
    (dict(bits=4, group_size=True), ValueError, "group_size must be a positive int"),
    (dict(bits=4, group_size=8, per="token"), ValueError, "group_size .* needs per='channel', got per='token'"),
    (dict(bits=4, group_size=8, per="tensor"), ValueError, "group_size .* needs per='channel'"),
    (dict(bits=4, narrow_range=1), TypeError, "narrow_range must be a bool or None, got int"),
    (dict(bits=4, narrow_range="full"), TypeError, "narrow_range must be a bool or None"),
    (dict(bits=4, symmetric=False, narrow_range=True), ValueError, "narrow_range=True needs symmetric=True"),
])
def test_bad_grids_name_the_parameter(kwargs, error, match):
    with pytest.raises(error, match=match):
        uniform.Grid(**kwargs)


def test_grid_granularity_and_code_range():
    assert uniform.Grid(4).granularity == "channel"
    assert uniform.Grid(4, per="token").granularity == "token"
    assert uniform.Grid(4, group_size=64).granularity == "group"
    assert (uniform.Grid(4).qmin, uniform.Grid(4).qmax) == (-7, 7)
    assert (uniform.Grid(4, symmetric=False).qmin, uniform.Grid(4, symmetric=False).qmax) == (0, 15)
    assert (uniform.Grid(8).qmin, uniform.Grid(8, symmetric=False).qmax) == (-127, 255)


@pytest.mark.parametrize("bits, codes", [(2, (-2, 1)), (3, (-4, 3)), (4, (-8, 7)), (8, (-128, 127))])
def test_the_full_symmetric_range_uses_all_codes(bits, codes):
    full = uniform.Grid(bits, narrow_range=False)
    assert (full.qmin, full.qmax) == codes and full.qmax - full.qmin + 1 == 2**bits
    narrow = uniform.Grid(bits)
    assert narrow.narrow_range is True and (narrow.qmin, narrow.qmax) == (-codes[1], codes[1])
    # an asymmetric grid is always on the full range; None takes the grid's own range
    assert uniform.Grid(bits, symmetric=False).narrow_range is False
    assert uniform.Grid(bits, symmetric=False, narrow_range=False) == uniform.Grid(bits, symmetric=False)
    assert uniform.Grid(bits, narrow_range=True) == narrow != full


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_the_full_symmetric_range_scale_and_its_ends(scale_dtype):
    """s = absmax / 7.5 at 4 bits (GPTQ's 2 absmax / 15): +absmax lies at 7.5 steps and saturates at
    code 7, -absmax at -7.5 steps rounds to even, code -8; the narrow range puts them on -7 and 7."""
    x = torch.tensor([[-7.5, 7.5, 0.25, -3.4, 7.2, -7.2], [3.75, -3.75, 1.0, 0.0, -0.2, 2.0]])  # absmax 7.5, 3.75
    full = uniform.compute_qparams(x, uniform.Grid(4, narrow_range=False), scale_dtype)
    assert full.scale.view(-1).tolist() == [1.0, 0.5]  # exact: absmax / 7.5
    assert uniform.quantize(x, full).tolist() == [[-8, 7, 0, -3, 7, -7], [7, -8, 2, 0, 0, 4]]
    narrow = uniform.compute_qparams(x, uniform.Grid(4), scale_dtype)
    torch.testing.assert_close(narrow.scale.view(-1), torch.tensor([7.5, 3.75]) / 7,
                               rtol=0 if scale_dtype == torch.float32 else 1e-3, atol=0)
    assert uniform.quantize(x, narrow)[:, :2].tolist() == [[-7, 7], [7, -7]]


def _gptq_reference_symmetric(x, bits):
    """GPTQ's reference quantizer (quant.py, find_params with sym=True, per channel, and quantize) for
    rows that hold a negative value: xmax = max(|xmin|, xmax), xmin = -xmax, scale = (xmax - xmin) / maxq
    with maxq = 2^bits - 1, zero = (maxq + 1) / 2, codes clamp(round(x / scale) + zero, 0, maxq)."""
    maxq = 2**bits - 1
    xmax = torch.maximum(x.amin(1).clamp_max(0).abs(), x.amax(1).clamp_min(0))
    scale = ((xmax - (-xmax)) / maxq)[:, None]
    zero = torch.full_like(scale, (maxq + 1) / 2)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_full_symmetric_range_equals_gptqs_reference_quantizer(bits):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    x[:8, 0] = -x[:8].abs().amax(1) * 1.0  # rows whose absmax is negative
    x[8:16, 0] = x[8:16].abs().amax(1) * 1.0  # and positive
    grid = uniform.Grid(bits, narrow_range=False)
    assert torch.equal(uniform.fake_quantize(x, grid), _gptq_reference_symmetric(x, bits))
    grouped = uniform.Grid(bits, narrow_range=False, group_size=32)  # a group is a row of the grouped view
    reference = _gptq_reference_symmetric(x.reshape(-1, 32), bits).reshape(x.shape)
    assert torch.equal(uniform.fake_quantize(x, grouped), reference)


def test_absmax_scale_follows_the_range():
    absmax = torch.tensor([15.0, 7.0])
    assert torch.equal(uniform.absmax_scale(absmax, uniform.Grid(4, narrow_range=False)), absmax * 2 / 15)
    assert torch.equal(uniform.absmax_scale(absmax, uniform.Grid(4)), absmax / 7)
    assert torch.equal(uniform.absmax_scale(absmax, uniform.Grid(8, narrow_range=False)), absmax / 127.5)
    with pytest.raises(ValueError, match="absmax_scale needs a symmetric grid"):
        uniform.absmax_scale(absmax, uniform.Grid(4, symmetric=False))


@pytest.mark.parametrize("grid, error, match", [
    (uniform.Grid(4, group_size=5), ValueError, "group_size 5 must divide the last dimension \\(16\\)"),
    (4, TypeError, "grid must be a uniform.Grid, got int"),
])
def test_bad_arguments_name_the_parameter(grid, error, match):
    with pytest.raises(error, match=match):
        uniform.compute_qparams(torch.randn(4, 16), grid)


@pytest.mark.parametrize("x, error, match", [
    (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or Inf"),
    (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN or Inf"),
    (torch.ones(2, 2, dtype=torch.int32), TypeError, "floating-point"),
    (torch.empty(0, 4), ValueError, "non-empty"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
])
def test_bad_inputs_are_rejected(x, error, match):
    with pytest.raises(error, match=match):
        uniform.fake_quantize(x, uniform.Grid(4))


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
    qparams = uniform.compute_qparams(torch.randn(4, 16), uniform.Grid(4))
    with pytest.raises(ValueError, match="qparams do not fit"):
        uniform.quantize(torch.randn(3, 16), qparams)


def test_rtn_quantizes_every_linear_but_the_output_layer(tiny_llama):
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    uniform.quantize_model_rtn(tiny_llama, uniform.Grid(3, symmetric=False, group_size=16))
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
        uniform.quantize_model_rtn(model, uniform.Grid(4, symmetric=False, group_size=64))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_rtn_needs_linear_layers():
    with pytest.raises(ValueError, match="no nn.Linear"):
        uniform.quantize_model_rtn(torch.nn.Sequential(torch.nn.ReLU()), uniform.Grid(4, symmetric=False, group_size=64))


@pytest.mark.parametrize("grid, error, match", [
    (uniform.Grid(4, per="token"), ValueError, "grid must have a granularity in \\['tensor', 'channel', 'group'\\], "
                                               "got 'token'"),
    ((4, False, "group", 64), TypeError, "grid must be a uniform.Grid"),
])
def test_rtn_takes_a_weight_grid(tiny_llama, grid, error, match):
    with pytest.raises(error, match=match):
        uniform.quantize_model_rtn(tiny_llama, grid)


def test_small_groups_keep_their_own_step_in_float16_scales():
    """A scale below float16's smallest normal value (6.1e-5) is stored as a subnormal, not floored:
    8-bit codes of a group with absmax 1e-3 keep a step of about 1e-3 / 127."""
    w = torch.linspace(-1e-3, 1e-3, 64).reshape(1, 64)
    w_hat = uniform.fake_quantize(w, uniform.Grid(8, symmetric=True, group_size=64), torch.float16)
    assert (w_hat - w).abs().max() < 1e-5
    assert torch.equal(uniform.fake_quantize(torch.zeros(1, 64), uniform.Grid(4, symmetric=False, group_size=64),
                                             torch.float16), torch.zeros(1, 64))
