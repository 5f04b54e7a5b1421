"""refimpl.quantization.formats: NF4/FP4 bit-exact with bitsandbytes, FP8 equal to PyTorch's casts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.quantization import formats

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _bnb_codes(x, quant_type, blocksize=64):
    packed, state = bnb_functional.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    bytes_ = packed.flatten()
    codes = torch.stack([bytes_ >> 4, bytes_ & 0xF], dim=1).flatten()[: x.numel()]  # high nibble first
    return codes, state


def test_nf4_table_is_the_one_bitsandbytes_uses():
    assert torch.equal(formats.NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))


def test_nf4_is_the_normal_quantile_construction():
    derived = formats.normal_float_code_book()
    assert derived[7] == 0 and derived[0] == -1 and derived[-1] == 1
    torch.testing.assert_close(derived, formats.NF4_CODE, rtol=0, atol=2e-7)  # one float32 step at most


def test_fp4_code_book_is_bitsandbytes_fp4():
    assert torch.equal(formats.fp4_code_book(), bnb_functional.get_4bit_type("fp4", device="cpu"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64,), (128, 64), (576, 1536), (7, 100), (3, 5, 64)])
def test_blockwise_4bit_is_bit_exact_with_bitsandbytes(quant_type, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 0.05
    code = formats.NF4_CODE if quant_type == "nf4" else formats.fp4_code_book()
    codes, absmax = formats.quantize_blockwise(x, code, blocksize=64)
    reference_codes, state = _bnb_codes(x, quant_type)
    assert torch.equal(codes, reference_codes.to(torch.uint8))
    assert torch.equal(absmax, state.absmax)
    packed, state = bnb_functional.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    assert torch.equal(formats.dequantize_blockwise(codes, absmax, code, 64, x.shape),
                       bnb_functional.dequantize_4bit(packed, state).reshape(x.shape))


@pytest.mark.slow
def test_nf4_is_bit_exact_on_smollm2_weights(smollm2):
    model, _ = smollm2
    weights = [model.model.embed_tokens.weight] + [
        m.weight for i in (0, 15, 29) for m in model.model.layers[i].modules() if isinstance(m, torch.nn.Linear)]
    for weight in weights:
        codes, absmax = formats.quantize_blockwise(weight, formats.NF4_CODE, 64)
        reference_codes, state = _bnb_codes(weight.detach(), "nf4")
        assert torch.equal(codes, reference_codes.to(torch.uint8))
        assert torch.equal(absmax, state.absmax)


def test_zero_blocks_and_exact_zero():
    x = torch.zeros(128)
    x[70] = 0.5
    codes, absmax = formats.quantize_blockwise(x)
    assert absmax.tolist() == [0.0, 0.5]
    out = formats.dequantize_blockwise(codes, absmax)
    assert torch.equal(out, x)  # 0 and +absmax are both in the NF4 code book


def test_blockwise_4bit_validates():
    with pytest.raises(ValueError, match="NaN or Inf"):
        formats.quantize_blockwise(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="floating-point"):
        formats.quantize_blockwise(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="blocksize"):
        formats.quantize_blockwise(torch.ones(4), blocksize=0)
    with pytest.raises(ValueError, match="16 or 256 values"):
        formats.quantize_blockwise(torch.ones(4), code=torch.zeros(8))
    codes, absmax = formats.quantize_blockwise(torch.ones(100))
    with pytest.raises(ValueError, match="absmax holds 3 scales"):
        formats.dequantize_blockwise(codes[:80], absmax[:1].expand(3).contiguous())


def test_dynamic_code_book_is_bitsandbytes_dynamic_map():
    assert torch.equal(formats.dynamic_code_book(), bnb_functional.create_dynamic_map(signed=True))


def test_double_quantization_matches_bitsandbytes():
    x = torch.randn(576 * 1536, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = bnb_functional.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    codes, absmax = formats.quantize_blockwise(x, formats.NF4_CODE, 64)
    absmax_codes, scales, offset = formats.double_quantize(absmax)
    assert torch.equal(offset, state.offset) and torch.equal(scales, state.state2.absmax)
    # bitsandbytes' native CPU kernel finds the code by an approximate search: a few go to a neighbour.
    differ = absmax_codes != state.absmax
    assert differ.float().mean() < 0.005
    code = formats.dynamic_code_book()
    scaled = (absmax - offset) / scales.repeat_interleave(256)[: absmax.numel()]
    ours = (scaled - code[absmax_codes.long()]).abs()
    theirs = (scaled - code[state.absmax.long()]).abs()
    assert (ours <= theirs).all()  # ours is the nearest code ...
    assert ((absmax_codes.int() - state.absmax.int())[differ].abs() == 1).all()  # ... theirs its neighbour
    restored = formats.double_dequantize(absmax_codes, scales, offset)
    assert (restored - absmax).abs().max() < 0.02 * absmax.max()  # 8-bit scales: within 2% of the largest


@pytest.mark.parametrize("fmt, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_rounding_equals_pytorch_casts(fmt, dtype):
    generator = torch.Generator().manual_seed(0)
    largest = formats.FP8_FORMATS[fmt][3]
    # magnitudes from deep in the subnormals to near the largest value, both signs
    exponents = torch.empty(20000).uniform_(-22, torch.log2(torch.tensor(largest)).item(), generator=generator)
    x = torch.exp2(exponents) * torch.where(torch.rand(20000, generator=generator) < 0.5, -1.0, 1.0)
    x = x[(x.to(dtype).float().abs() <= largest)]
    assert torch.equal(formats.fp8_round(x, fmt), x.to(dtype).float())


@settings(max_examples=50, deadline=None)
@given(value=st.floats(-400, 400, allow_nan=False, width=32), fmt=st.sampled_from(["e4m3", "e5m2"]))
def test_fp8_rounding_equals_cast_for_any_value(value, fmt):
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    x = torch.tensor([value])
    assert torch.equal(formats.fp8_round(x, fmt), x.to(dtype).float())


def test_fp8_range_is_not_silently_clipped():
    with pytest.raises(ValueError, match="beyond the E4M3 range"):
        formats.fp8_round(torch.tensor([500.0]), "e4m3")
    assert formats.fp8_round(torch.tensor([500.0, -1e6]), "e4m3", saturate=True).tolist() == [448.0, -448.0]
    with pytest.raises(ValueError, match="fmt must be one of"):
        formats.fp8_round(torch.tensor([1.0]), "e3m4")
