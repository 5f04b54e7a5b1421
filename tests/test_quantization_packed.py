"""refimpl.quantization.packed: bit packing round trips, QuantizedLinear equals simulated
quantization, its measured bytes, and the module swap."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.evaluate import model_bytes
from refimpl.quantization import formats, packed, uniform


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_packing_round_trips_and_is_dense(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    stream = packed.pack_codes(codes, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == math.ceil(n * bits / 8)
    assert torch.equal(packed.unpack_codes(stream, bits, n), codes.int())


def test_four_bit_codes_pack_two_per_byte_low_nibble_first():
    assert packed.pack_codes(torch.tensor([0x3, 0xA, 0xF, 0x1]), 4).tolist() == [0xA3, 0x1F]


@pytest.mark.parametrize("codes, bits, match", [
    (torch.tensor([0, 16]), 4, r"codes must lie in \[0, 15\]"),
    (torch.tensor([-1, 2]), 4, "codes must lie"),
    (torch.tensor([1.0, 2.0]), 4, "integer tensor"),
    (torch.tensor([1, 2]), 1, "bits"),
])
def test_packing_validates(codes, bits, match):
    with pytest.raises((ValueError, TypeError), match=match):
        packed.pack_codes(codes, bits)


def test_unpacking_validates():
    stream = packed.pack_codes(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="n must be"):
        packed.unpack_codes(stream, 4, 5)
    with pytest.raises(TypeError, match="uint8"):
        packed.unpack_codes(stream.int(), 4, 3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric, narrow_range", [(True, None), (True, False), (False, None)])
@pytest.mark.parametrize("setting", [dict(per="tensor"), dict(per="channel"), dict(group_size=32)])
def test_quantized_linear_computes_with_the_simulated_weight(bits, symmetric, narrow_range, setting):
    torch.manual_seed(bits)
    linear = torch.nn.Linear(64, 24)
    grid = uniform.Grid(bits, symmetric, narrow_range=narrow_range, **setting)
    module = packed.QuantizedLinear.from_linear(linear, grid)
    qparams = uniform.compute_qparams(linear.weight, grid, scale_dtype=torch.float16)
    simulated = uniform.dequantize(uniform.quantize(linear.weight, qparams), qparams, linear.weight.shape)
    assert torch.equal(module.dequantized_weight(), simulated)
    x = torch.randn(5, 64)
    torch.testing.assert_close(module(x), torch.nn.functional.linear(x, simulated, linear.bias))


@pytest.mark.parametrize("bits, symmetric, narrow_range, expected", [
    # codes + float16 scales (+ uint8 zero-points) for a 64x24 weight with groups of 32, plus the bias
    (4, False, None, 64 * 24 // 2 + 48 * 2 + 48 + 24 * 4),
    (4, True, None, 64 * 24 // 2 + 48 * 2 + 24 * 4),
    (4, True, False, 64 * 24 // 2 + 48 * 2 + 24 * 4),  # the full range: the same bits, no zero-point
    (3, False, None, 64 * 24 * 3 // 8 + 48 * 2 + 48 + 24 * 4),
    (8, True, None, 64 * 24 + 48 * 2 + 24 * 4),
])
def test_quantized_linear_bytes_are_what_it_stores(bits, symmetric, narrow_range, expected):
    grid = uniform.Grid(bits, symmetric, group_size=32, narrow_range=narrow_range)
    module = packed.QuantizedLinear.from_linear(torch.nn.Linear(64, 24), grid)
    assert model_bytes(module) == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_full_symmetric_range_stores_all_codes(bits):
    """A row whose absmax is negative uses code -2^(b-1), stored as 0; one whose absmax is positive
    saturates at 2^(b-1) - 1, stored as 2^b - 1: every stored code in [0, 2^b - 1]. The narrow range
    never stores 2^b - 1."""
    linear = torch.nn.Linear(32, 4)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4, 32, generator=torch.Generator().manual_seed(bits)) * 0.1)
        linear.weight[0, 3], linear.weight[1, 5] = -1.0, 1.0  # absmax negative in row 0, positive in row 1
    full = packed.QuantizedLinear.from_linear(linear, uniform.Grid(bits, narrow_range=False))
    stored = packed.unpack_codes(full.packed, bits, 4 * 32).view(4, 32)
    assert stored[0, 3] == 0 and stored[1, 5] == 2**bits - 1
    assert full.dequantized_weight()[0, 3] == -2 ** (bits - 1) * full.scale[0].float()
    assert full.dequantized_weight()[1, 5] == (2 ** (bits - 1) - 1) * full.scale[1].float()
    assert "symmetric full range" in repr(full)
    narrow = packed.QuantizedLinear.from_linear(linear, uniform.Grid(bits))
    assert packed.unpack_codes(narrow.packed, bits, 4 * 32).max() == 2**bits - 2


@pytest.mark.parametrize("grid", [uniform.Grid(4, narrow_range=False, group_size=32),
                                  uniform.Grid(3, narrow_range=False)])
def test_pack_model_on_the_full_range_computes_what_rtn_simulates(tiny_llama, grid):
    x = torch.randint(0, 128, (1, 16))
    simulated = uniform.quantize_model_rtn(_copy(tiny_llama), grid)
    packed.pack_model(tiny_llama, grid)
    with torch.no_grad():
        assert torch.equal(tiny_llama(x).logits, simulated(x).logits)


def test_pack_model_swaps_linears_and_shrinks_the_model(tiny_llama):
    x = torch.randint(0, 128, (1, 16))
    grid = uniform.Grid(4, symmetric=False, group_size=32)
    simulated = uniform.quantize_model_rtn(_copy(tiny_llama), grid)
    fp32_bytes = model_bytes(tiny_llama)
    packed.pack_model(tiny_llama, grid)
    swapped = [m for m in tiny_llama.modules() if isinstance(m, packed.QuantizedLinear)]
    assert len(swapped) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert isinstance(tiny_llama.lm_head, torch.nn.Linear)  # tied to the embedding: skipped
    assert model_bytes(tiny_llama) < fp32_bytes
    with torch.no_grad():  # both round their scales to float16: the same weights
        assert torch.equal(tiny_llama(x).logits, simulated(x).logits)


@pytest.mark.parametrize("grid, skip", [
    (uniform.Grid(4, False, group_size=32), ("lm_head",)), (uniform.Grid(3, False), ("lm_head",)),
    (uniform.Grid(8, False, per="tensor"), ("lm_head",)),
    (uniform.Grid(4, False, group_size=32), ()),  # the tied output layer too: its storage stays with the embedding
])
def test_packed_size_is_what_pack_model_leaves(tiny_llama, grid, skip):
    expected = packed.packed_size(tiny_llama, grid, skip)
    assert model_bytes(packed.pack_model(tiny_llama, grid, skip)) == expected


def test_pack_model_leaves_the_model_untouched_on_error():
    from tiny import make_tiny_llama

    model = make_tiny_llama(intermediate_size=96)
    with pytest.raises(ValueError, match="group_size 64 must divide"):
        packed.pack_model(model, uniform.Grid(4, symmetric=False, group_size=64))
    assert not any(isinstance(m, packed.QuantizedLinear) for m in model.modules())


def test_from_linear_validates():
    with pytest.raises(TypeError, match="nn.Linear"):
        packed.QuantizedLinear.from_linear(torch.nn.Conv1d(4, 4, 1), uniform.Grid(4))
    with pytest.raises(ValueError, match="grid must have a granularity in .*, got 'token'"):
        packed.QuantizedLinear.from_linear(torch.nn.Linear(8, 8), uniform.Grid(4, per="token"))
    with pytest.raises(TypeError, match="grid must be a uniform.Grid"):
        packed.QuantizedLinear.from_linear(torch.nn.Linear(8, 8), 4)


def _grid_weight(bits=3, group_size=16, seed=0):
    """A weight that lies on a given grid, as GPTQ leaves it: codes chosen freely, not by rounding."""
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(64, 8)
    qparams = uniform.compute_qparams(linear.weight, uniform.Grid(bits, False, group_size), scale_dtype=torch.float16)
    codes = torch.randint(0, 2**bits, (8, 64 // group_size, group_size), generator=g, dtype=torch.int32)
    with torch.no_grad():
        linear.weight.copy_(uniform.dequantize(codes, qparams, (8, 64)))
    return linear, qparams


def test_from_linear_reads_codes_off_a_given_grid():
    linear, qparams = _grid_weight()
    module = packed.QuantizedLinear.from_linear(linear, uniform.Grid(3, False, group_size=16), qparams=qparams)
    assert torch.equal(module.dequantized_weight(), linear.weight)
    with torch.no_grad():
        linear.weight[0, 0] += 0.3 * qparams.scale[0, 0, 0]  # a third of a step off the grid
    with pytest.raises(ValueError, match="not on the grid"):
        packed.QuantizedLinear.from_linear(linear, uniform.Grid(3, False, group_size=16), qparams=qparams)
    with pytest.raises(ValueError, match="another grid"):
        packed.QuantizedLinear.from_linear(linear, uniform.Grid(4, False, group_size=16), qparams=qparams)


def test_from_linear_tells_the_symmetric_ranges_apart():
    """Scales of one range are not the other's: from_linear refuses qparams made for the other range."""
    linear = torch.nn.Linear(64, 8)
    full, narrow = uniform.Grid(4, group_size=16, narrow_range=False), uniform.Grid(4, group_size=16)
    qparams = uniform.compute_qparams(linear.weight, full, scale_dtype=torch.float16)
    with torch.no_grad():
        linear.weight.copy_(uniform.dequantize(uniform.quantize(linear.weight, qparams), qparams, (8, 64)))
    assert torch.equal(packed.QuantizedLinear.from_linear(linear, full, qparams=qparams).dequantized_weight(),
                       linear.weight)
    with pytest.raises(ValueError, match="qparams were made for another grid"):
        packed.QuantizedLinear.from_linear(linear, narrow, qparams=qparams)


def test_input_scale_packs_awq_form():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8)
    s = torch.rand(64) + 0.5
    s16 = s.half().float()
    grid = uniform.Grid(4, symmetric=False, group_size=16)
    simulated = uniform.fake_quantize(linear.weight * s16, grid, torch.float16) / s16
    with torch.no_grad():
        linear.weight.copy_(simulated)
    qparams = uniform.compute_qparams(linear.weight * s16, grid, scale_dtype=torch.float16)
    module = packed.QuantizedLinear.from_linear(linear, grid, qparams=qparams, input_scale=s)
    torch.testing.assert_close(module.dequantized_weight(), simulated, rtol=1e-6, atol=1e-7)
    plain = packed.QuantizedLinear.from_linear(torch.nn.Linear(64, 8), grid)
    assert model_bytes(module) - model_bytes(plain) == 64 * 2  # one float16 scale per input feature
    with pytest.raises(ValueError, match="input_scale"):
        packed.QuantizedLinear.from_linear(linear, grid, input_scale=torch.ones(63))


@pytest.mark.parametrize("double_quant", [False, True])
def test_code_book_linear_equals_block_wise_quantization(double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 64)
    module = packed.CodeBookLinear.from_linear(linear, formats.NF4_CODE, 64, double_quant)
    codes, absmax = formats.quantize_blockwise(linear.weight, formats.NF4_CODE, 64)
    if double_quant:
        absmax = formats.double_dequantize(*formats.double_quantize(absmax))
    expected = formats.dequantize_blockwise(codes, absmax, formats.NF4_CODE, 64, linear.weight.shape)
    assert torch.equal(module.dequantized_weight(), expected)
    x = torch.randn(3, 576)
    torch.testing.assert_close(module(x), torch.nn.functional.linear(x, expected, linear.bias))
    n, n_blocks = 576 * 64, 576 * 64 // 64
    scales = n_blocks + 4 * math.ceil(n_blocks / 256) + 4 if double_quant else 4 * n_blocks
    assert model_bytes(module) == n // 2 + scales + 16 * 4 + 64 * 4  # codes, scales, code book, bias


def test_pack_model_code_book_swaps_and_is_atomic(tiny_llama):
    packed.pack_model_code_book(tiny_llama)
    assert sum(isinstance(m, packed.CodeBookLinear) for m in tiny_llama.modules()) == 14
    from tiny import make_tiny_llama

    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        packed.pack_model_code_book(model)
    assert not any(isinstance(m, packed.CodeBookLinear) for m in model.modules())


def _copy(model):
    import copy

    return copy.deepcopy(model)
