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
    codes, absmax = formats.quantize_blockwise_4bit(x, code, blocksize=64)
    reference_codes, state = _bnb_codes(x, quant_type)
    assert torch.equal(codes, reference_codes.to(torch.uint8))
    assert torch.equal(absmax, state.absmax)
    packed, state = bnb_functional.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    assert torch.equal(formats.dequantize_blockwise_4bit(codes, absmax, code, 64, x.shape),
                       bnb_functional.dequantize_4bit(packed, state).reshape(x.shape))


@pytest.mark.slow
def test_nf4_is_bit_exact_on_smollm2_weights(smollm2):
    model, _ = smollm2
    weights = [model.model.embed_tokens.weight] + [
        m.weight for i in (0, 15, 29) for m in model.model.layers[i].modules() if isinstance(m, torch.nn.Linear)]
    for weight in weights:
        codes, absmax = formats.quantize_blockwise_4bit(weight, formats.NF4_CODE, 64)
        reference_codes, state = _bnb_codes(weight.detach(), "nf4")
        assert torch.equal(codes, reference_codes.to(torch.uint8))
        assert torch.equal(absmax, state.absmax)


def test_zero_blocks_and_exact_zero():
    x = torch.zeros(128)
    x[70] = 0.5
    codes, absmax = formats.quantize_blockwise_4bit(x)
    assert absmax.tolist() == [0.0, 0.5]
    out = formats.dequantize_blockwise_4bit(codes, absmax)
    assert torch.equal(out, x)  # 0 and +absmax are both in the NF4 code book


def test_blockwise_4bit_validates():
    with pytest.raises(ValueError, match="NaN or Inf"):
        formats.quantize_blockwise_4bit(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="floating-point"):
        formats.quantize_blockwise_4bit(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="blocksize"):
        formats.quantize_blockwise_4bit(torch.ones(4), blocksize=0)
    with pytest.raises(ValueError, match="16 values"):
        formats.quantize_blockwise_4bit(torch.ones(4), code=torch.zeros(8))
    codes, absmax = formats.quantize_blockwise_4bit(torch.ones(100))
    with pytest.raises(ValueError, match="absmax holds 3 scales"):
        formats.dequantize_blockwise_4bit(codes[:80], absmax[:1].expand(3).contiguous())


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
