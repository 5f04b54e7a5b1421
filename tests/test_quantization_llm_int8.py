"""refimpl.quantization.llm_int8: parity with bitsandbytes' Linear8bitLt (codes, scales, outputs, on
synthetic and real SmolLM2 activations), the exact int32 accumulator, the two limits of the
decomposition, outlier statistics, the module swap and its byte count, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from refimpl.evaluate import model_bytes
from refimpl.quantization import llm_int8

bnb = pytest.importorskip("bitsandbytes")


def _bnb_linear(linear: torch.nn.Linear, threshold: float):
    """bitsandbytes' inference-mode layer holding ``linear``'s weight: it quantizes on ``.to("cpu")``;
    ``eval()`` matters on CPU, where training mode skips the int8 path (weight-only dequantization)."""
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").eval()


def _grid_aligned_case(seed=0, n_tokens=48, n_in=256, n_out=96, outlier_cols=(5, 100, 200)):
    """A layer and inputs whose values are float16 numbers (what bitsandbytes computes with) and whose
    row absmax values are 127 * 2^-k, so that x / (absmax / 127) and x * (127 / absmax) are the same
    exact number: both implementations must then produce identical codes.

    Regular inputs lie in (-3.5, 3.5) with one +-127/32 per row; the outlier columns hold values of
    magnitude 8..12 in every token (a systematic outlier feature), column 5 holding +-127/8."""
    g = torch.Generator().manual_seed(seed)
    sign = lambda *shape: torch.randint(0, 2, shape, generator=g).float() * 2 - 1  # noqa: E731
    weight = (torch.rand(n_out, n_in, generator=g) * 0.2 - 0.1).half().float()
    weight[torch.arange(n_out), torch.randint(0, n_in, (n_out,), generator=g)] = 127 / 1024 * sign(n_out)
    linear = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(linear.bias.half().float())
    x = (torch.rand(n_tokens, n_in, generator=g) * 7 - 3.5).half().float()
    regular = torch.tensor([c for c in range(n_in) if c not in outlier_cols])
    x[torch.arange(n_tokens), regular[torch.randint(0, len(regular), (n_tokens,), generator=g)]] = 127 / 32
    cols = list(outlier_cols)
    x[:, cols] = (sign(n_tokens, len(cols)) * (8 + 4 * torch.rand(n_tokens, len(cols), generator=g))).half().float()
    x[:, cols[0]] = 127 / 8 * sign(n_tokens)
    return linear, x.view(2, n_tokens // 2, n_in)


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_matches_bitsandbytes_exactly_on_grid_aligned_inputs(threshold):
    """Codes, scales and outlier set equal bitsandbytes'; outputs agree to 3e-5 of their scale.
    The remaining difference is bitsandbytes' dequantization constant 6.200124e-05, which is
    1.8e-5 larger than 1 / 127^2, plus float32 summation order (measured: 1.8e-5 relative)."""
    linear, x = _grid_aligned_case()
    ours, ref = llm_int8.Int8Linear.from_linear(linear, threshold), _bnb_linear(linear, threshold)
    assert torch.equal(ours.weight_codes, ref.weight.data)  # bitsandbytes' CB
    assert torch.equal(ours.weight_scale, ref.weight.SCB / 127)  # SCB is the absmax, float32
    x_codes, row_absmax, bnb_outliers = bnb.functional.int8_vectorwise_quant(x.reshape(-1, 256).half(), threshold)
    outliers = llm_int8.outlier_dims(x, threshold)
    assert outliers.tolist() == ([5, 100, 200] if threshold else [])
    assert bnb_outliers is None if not threshold else torch.equal(outliers, bnb_outliers)
    codes, scale = llm_int8.vectorwise_quantize(x.reshape(-1, 256).index_fill(1, outliers, 0.0), "token")
    assert torch.equal(codes, x_codes) and torch.equal(scale.view(-1) * 127, row_absmax)
    with torch.no_grad():
        y, y_ref = ours(x), ref(x)
    assert y.shape == y_ref.shape == (2, 24, 96)
    assert (y - y_ref).abs().max() <= 3e-5 * y_ref.abs().max()


def test_codes_differ_from_bitsandbytes_only_at_rounding_ties():
    """Off the aligned grid, x / s (the shared quantizer) and x * (1 / s) (bitsandbytes) can round a
    value lying on a half-integer differently; scales still agree exactly for float16 weights."""
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(256, 576, generator=g) * 0.05).half().float()
    codes, scale = llm_int8.vectorwise_quantize(weight, "channel")
    bnb_codes, bnb_absmax, _ = bnb.functional.int8_vectorwise_quant(weight.half())
    assert torch.equal(scale.view(-1), bnb_absmax / 127)
    differ = codes != bnb_codes
    assert 0 < differ.sum() < 1e-3 * weight.numel()
    assert (codes.int() - bnb_codes.int()).abs().max() == 1
    scaled = (weight * 127 / bnb_absmax[:, None].double())[differ]  # exactly the value being rounded
    assert ((scaled - scaled.floor() - 0.5).abs() < 1e-4).all()


@pytest.mark.slow
def test_matches_bitsandbytes_on_a_smollm2_layer(smollm2):
    """Layer 12's q_proj of SmolLM2 on real activations, which carry the systematic outlier
    dimension 247. Weights and inputs are rounded to float16 first, as bitsandbytes does.

    Tokens where both pick the same row scale agree within one code step of one activation times the
    largest weight (a rounding tie may flip one code; measured 0.05 of it). Where the outlier column
    holds a value below the threshold, bitsandbytes still counts it in the row absmax while Eq. 8
    takes the absmax over the non-outlier columns only: there our finer scale is closer to the float
    product (measured RMS error 0.028 against bitsandbytes' 0.066)."""
    model, tokenizer = smollm2
    name = "model.layers.12.self_attn.q_proj"
    source = model.get_submodule(name)
    captured = {}

    class Stop(Exception):
        pass

    def capture(module, args):
        captured["x"] = args[0].detach()[0]
        raise Stop

    handle = source.register_forward_pre_hook(capture)
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. Quantization halves")["input_ids"]])
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    except Stop:
        pass
    finally:
        handle.remove()
    x = captured["x"].half().float()  # [tokens, 576]
    linear = torch.nn.Linear(576, 576, bias=False)
    with torch.no_grad():
        linear.weight.copy_(source.weight.half().float())
    ours, ref = llm_int8.Int8Linear.from_linear(linear), _bnb_linear(linear, 6.0)
    outliers = llm_int8.outlier_dims(x)
    assert 247 in outliers.tolist()
    _, bnb_row_absmax, _ = bnb.functional.int8_vectorwise_quant(x.half(), 6.0)
    _, row_scale = llm_int8.vectorwise_quantize(x.index_fill(1, outliers, 0.0), "token")
    same_scale = row_scale.view(-1) * 127 == bnb_row_absmax
    with torch.no_grad():
        y, y_ref, y_float = ours(x), ref(x), linear(x)
    step = row_scale.max() * ours.weight_scale.max() * 127
    assert same_scale.sum() >= len(x) // 2
    assert (y - y_ref)[same_scale].abs().max() <= step
    if (~same_scale).any():
        rms = lambda e: e[~same_scale].pow(2).mean().sqrt()  # noqa: E731
        assert rms(y - y_float) <= rms(y_ref - y_float)


def test_int8_matmul_is_exact_where_float32_is_not():
    """in = 4096 codes of 127 give sums near 6.6e7 > 2^24: float32 accumulation rounds, the int32
    accumulator (float32 over exact chunks here) does not; the extreme code -128 over a width that is
    not a multiple of the chunk, and random codes, equal an int64 reference."""
    x_codes = torch.full((1, 4096), 127, dtype=torch.int8)
    w_codes = torch.full((2, 4096), 127, dtype=torch.int8)
    w_codes[1, 0] = 126
    exact = torch.tensor([[4096 * 127 * 127, 4096 * 127 * 127 - 127]])
    assert torch.equal(llm_int8.int8_matmul(x_codes, w_codes), exact.int())
    assert (x_codes.float() @ w_codes.float().T).long()[0, 1] != exact[0, 1]  # what the test guards against
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (33, 1000), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (17, 1000), generator=g, dtype=torch.int8)
    assert torch.equal(llm_int8.int8_matmul(a, b).long(), a.long() @ b.long().T)
    extreme = torch.full((2, 3000), -128, dtype=torch.int8)
    extreme[1, 1] = 127
    assert torch.equal(llm_int8.int8_matmul(extreme, extreme).long(), extreme.long() @ extreme.long().T)
    a = torch.randint(-128, 128, (9, 2500), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (5, 2500), generator=g, dtype=torch.int8)
    assert torch.equal(llm_int8.int8_matmul(a, b).long(), a.long() @ b.long().T)


def test_the_two_limits_of_the_decomposition():
    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(64, 32)
    layer = llm_int8.Int8Linear.from_linear(linear)
    # every column an outlier: the output is the float product with the dequantized weight
    x_large = (6 + torch.rand(4, 5, 64, generator=g)) * torch.randn(4, 5, 64, generator=g).sign()
    expected = F.linear(x_large, layer.dequantized_weight(), linear.bias.detach())
    assert torch.allclose(layer(x_large), expected, rtol=1e-6, atol=1e-5)
    # no outliers: threshold 6 and threshold 0 both run the pure int8 path of Eq. 7
    x = torch.randn(4, 5, 64, generator=g).clamp(-5.9, 5.9)
    no_decomposition = llm_int8.Int8Linear.from_linear(linear, threshold=0.0)
    assert torch.equal(layer(x), no_decomposition(x))
    x_codes, x_scale = llm_int8.vectorwise_quantize(x, "token")  # [20, 64], [20, 1]
    w_hat = layer.weight_codes.double() * layer.weight_scale.double()[:, None]  # [32, 64]
    reference = (x_codes.double() * x_scale.double()) @ w_hat.T
    assert torch.allclose(layer(x).reshape(20, 32).double(), reference + linear.bias.detach().double(),
                          rtol=1e-6, atol=1e-6)
    # and the int8 path differs from the float product by about one quantization step
    assert 0 < (layer(x) - linear(x)).abs().max() < 0.05


def test_outlier_dims_uses_greater_or_equal_like_bitsandbytes():
    x = torch.zeros(2, 3, 5)
    x[0, 1, 1] = 6.0  # exactly at the threshold: an outlier
    x[1, 2, 3] = -7.0
    x[1, 0, 4] = 5.99  # (5.999 would round to 6.0 in the float16 bitsandbytes tests)
    assert llm_int8.outlier_dims(x).tolist() == [1, 3]
    assert llm_int8.outlier_dims(x, threshold=7.0).tolist() == [3]
    assert llm_int8.outlier_dims(x, threshold=0.0).tolist() == []
    _, _, bnb_cols = bnb.functional.int8_vectorwise_quant(x.reshape(6, 5).half(), 6.0)
    assert bnb_cols.tolist() == [1, 3]


def test_outlier_statistics_finds_injected_dims(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].post_attention_layernorm.weight[[3, 17]] = 200.0
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    blocks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = {s.name: s for s in llm_int8.outlier_statistics(tiny_llama, blocks)}
    assert len(stats) == 14 and "lm_head" not in stats
    for name in ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"):
        assert stats[name].dims == (3, 17) and stats[name].n_dims == 2
        assert stats[name].token_fraction == 1.0 and stats[name].n_tokens == 32 and stats[name].max_abs > 6
    quiet = [n for n in stats if n.startswith("model.layers.0.") or ".self_attn." in n]
    assert all(stats[n].dims == () and stats[n].token_fraction == 0.0 for n in quiet)
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())


def test_quantize_model_int8_swaps_and_stores_a_quarter(tiny_llama):
    """2 layers x (q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128): 73,728 weights,
    294,912 bytes in float32; int8 codes 73,728 bytes + 1,024 float32 scales 4,096 bytes = 77,824
    (26 %); no biases in Llama. The tied lm_head / embedding stays float32."""
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny_llama(ids).logits
    before = model_bytes(tiny_llama)
    assert llm_int8.quantize_model_int8(tiny_llama) is tiny_llama
    swapped = {n for n, m in tiny_llama.named_modules() if isinstance(m, llm_int8.Int8Linear)}
    assert len(swapped) == 14 and not any(isinstance(m, torch.nn.Linear) and n != "lm_head"
                                          for n, m in tiny_llama.named_modules())
    assert isinstance(tiny_llama.lm_head, torch.nn.Linear)
    assert before - model_bytes(tiny_llama) == 294_912 - 77_824
    with torch.no_grad():
        quantized_logits = tiny_llama(ids).logits
    assert (quantized_logits - logits).abs().max() < 0.02 * logits.abs().max()
    assert "threshold=6.0" in repr(tiny_llama.model.layers[0].mlp.down_proj)


def test_quantize_model_int8_leaves_the_model_untouched_on_error(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*weight"):
        llm_int8.quantize_model_int8(tiny_llama)
    assert not any(isinstance(m, llm_int8.Int8Linear) for m in tiny_llama.modules())


@pytest.mark.parametrize("threshold", [-1.0, float("nan"), float("inf"), True, "6"])
def test_threshold_is_validated(threshold, tiny_llama):
    linear = torch.nn.Linear(8, 4)
    for call in (lambda: llm_int8.Int8Linear.from_linear(linear, threshold),
                 lambda: llm_int8.outlier_dims(torch.ones(2, 8), threshold),
                 lambda: llm_int8.quantize_model_int8(tiny_llama, threshold),
                 lambda: llm_int8.outlier_statistics(tiny_llama, torch.zeros(1, 4, dtype=torch.long), threshold)):
        with pytest.raises(ValueError, match="threshold"):
            call()


def test_other_inputs_are_validated():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        llm_int8.Int8Linear.from_linear(torch.nn.Conv1d(2, 2, 1))
    bad = torch.nn.Linear(8, 4)
    with torch.no_grad():
        bad.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="weight"):
        llm_int8.Int8Linear.from_linear(bad)
    layer = llm_int8.Int8Linear.from_linear(torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"x must be a tensor \[\.\.\., 8\]"):
        layer(torch.ones(3, 7))
    with pytest.raises(ValueError, match="x holds NaN"):
        layer(torch.full((3, 8), float("nan")))
    with pytest.raises(TypeError, match="int8"):
        llm_int8.int8_matmul(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="share in"):
        llm_int8.int8_matmul(torch.ones(2, 3, dtype=torch.int8), torch.ones(2, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        llm_int8.outlier_dims(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no nn.Linear"):
        llm_int8.quantize_model_int8(torch.nn.Sequential(torch.nn.ReLU()))


def test_empty_calibration_blocks_are_rejected(tiny_llama):
    with pytest.raises(ValueError, match="blocks is empty"):
        llm_int8.outlier_statistics(tiny_llama, torch.zeros(0, 8, dtype=torch.long))
