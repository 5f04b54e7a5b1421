"""refimpl.quantization.kv_cache: per-channel keys within half a step and better than per-token keys
with an outlier channel; the residual stays exact; packed storage unpacks to the fake-quantized values
and has the bytes of the formula; the attention context manager quantizes and restores; validation."""

from __future__ import annotations

import pytest
import torch

from refimpl import evaluate
from refimpl.quantization import kv_cache


def _keys_with_outlier_channel(seq=64, seed=0):
    """Keys [1, 2, seq, 16] where channel 3 of every head is large for every token (KIVI's observation)."""
    k = torch.randn(1, 2, seq, 16, generator=torch.Generator().manual_seed(seed))
    k[..., 3] = 20 + 5 * k[..., 3]
    return k


def _key_steps(k, bits, group_size):
    """The step of the asymmetric grid (range widened to 0) of each channel and token group, per key."""
    b, h, seq, d = k.shape
    groups = k.reshape(b, h, seq // group_size, group_size, d)  # [b, h, groups, G, d]
    low = groups.amin(dim=3, keepdim=True).clamp_max(0)
    high = groups.amax(dim=3, keepdim=True).clamp_min(0)
    return ((high - low) / (2**bits - 1)).expand_as(groups).reshape(k.shape)


@pytest.mark.parametrize("bits", [2, 4])
def test_keys_per_channel_error_within_half_a_step(bits):
    k = _keys_with_outlier_channel(seq=70)
    k_hat = kv_cache.quantize_keys(k, bits, group_size=16)
    # 70 = 4 groups of 16 + 6 tokens that wait in full precision for their group to fill
    assert torch.equal(k_hat[:, :, 64:], k[:, :, 64:])
    step = _key_steps(k[:, :, :64], bits, 16)
    # half a step, plus the float16 rounding of the scale (at most 2^-11 relative, times 2^bits codes)
    assert ((k_hat[:, :, :64] - k[:, :, :64]).abs() <= step * (0.5 + 2**bits * 2**-11) + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_keys_beat_per_token_keys_with_an_outlier_channel(bits):
    k = _keys_with_outlier_channel()
    per_channel = kv_cache.quantize_keys(k, bits, group_size=32) - k
    per_token = kv_cache.quantize_values(k, bits) - k  # the value scheme applied to keys
    # Per token, the outlier channel sets every token's range and the ordinary channels lose their
    # resolution; per channel, each keeps its own range (measured at 2/4/8 bits: 5.6x/26x/25x).
    ordinary = [c for c in range(16) if c != 3]
    assert per_channel[..., ordinary].pow(2).mean() < per_token[..., ordinary].pow(2).mean() / 4
    assert per_channel.pow(2).mean() < per_token.pow(2).mean()  # also overall (1.7x/6.0x/6.7x)


def test_values_per_token_and_residual_exact():
    v = torch.randn(2, 3, 50, 8, generator=torch.Generator().manual_seed(1))
    v_hat = kv_cache.quantize_values(v, 4, residual=16)
    assert torch.equal(v_hat[:, :, 34:], v[:, :, 34:])  # the 16 most recent tokens
    low, high = v[:, :, :34].amin(-1, keepdim=True).clamp_max(0), v[:, :, :34].amax(-1, keepdim=True).clamp_min(0)
    step = (high - low) / 15
    assert ((v_hat[:, :, :34] - v[:, :, :34]).abs() <= step * (0.5 + 16 * 2**-11) + 1e-6).all()
    assert not torch.equal(v_hat[:, :, :34], v[:, :, :34])


@pytest.mark.parametrize("seq, group_size, residual, expected", [
    (70, 32, 0, (64, 70)), (70, 32, 32, (64, 38)), (70, 32, 64, (64, 6)), (20, 32, 0, (0, 20)), (64, 16, 32, (64, 32)),
])
def test_split_points_follow_kivi(seq, group_size, residual, expected):
    assert kv_cache.split_points(seq, group_size, residual) == expected
    k = torch.randn(1, 1, seq, 4, generator=torch.Generator().manual_seed(2))
    n_k, n_v = expected
    assert torch.equal(kv_cache.quantize_keys(k, 2, group_size, residual)[:, :, n_k:], k[:, :, n_k:])
    assert torch.equal(kv_cache.quantize_values(k, 2, residual)[:, :, n_v:], k[:, :, n_v:])
    assert n_k == 0 or (kv_cache.quantize_keys(k, 2, group_size, residual)[:, :, :n_k] != k[:, :, :n_k]).any()
    assert n_v == 0 or (kv_cache.quantize_values(k, 2, residual)[:, :, :n_v] != k[:, :, :n_v]).any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("residual", [0, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_unpack_equals_fake_quantization(bits, residual, dtype):
    k = _keys_with_outlier_channel(seq=77).to(dtype)
    v = torch.randn(1, 2, 77, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    kv = kv_cache.pack_kv(k, v, bits, key_group_size=16, residual=residual)
    k_hat, v_hat = kv.unpack()
    assert k_hat.dtype == v_hat.dtype == dtype
    assert torch.equal(k_hat, kv_cache.quantize_keys(k, bits, 16, residual))
    assert torch.equal(v_hat, kv_cache.quantize_values(v, bits, residual))
    assert kv.key_codes.dtype == kv.value_codes.dtype == torch.uint8
    assert kv.key_scale.dtype == kv.value_scale.dtype == torch.float16


def test_nbytes_follow_the_formula():
    b, h, seq, d, group = 1, 2, 64, 16, 32
    k, v = torch.randn(2, b, h, seq, d, generator=torch.Generator().manual_seed(4))
    kv = kv_cache.pack_kv(k, v, bits=4, key_group_size=group)
    codes = 2 * b * h * seq * d // 2  # keys and values: half a byte per element
    key_groups, value_tokens = b * h * d * seq // group, b * h * seq
    expected = codes + (key_groups + value_tokens) * (2 + 0.5)  # float16 scale + 4-bit zero-point
    assert kv.nbytes == expected == 2528
    # with a residual of 32 tokens: half the values and the 0 keys (64 mod 32) stay in float32
    kv = kv_cache.pack_kv(k, v, bits=4, key_group_size=group, residual=32)
    assert kv.nbytes == seq * b * h * d // 2 + key_groups * 2.5 + (seq // 2 * b * h * d) * (0.5 + 4) + 32 * b * h * 2.5


def test_pack_empty_quantized_part_keeps_everything():
    k, v = torch.randn(2, 1, 1, 10, 8, generator=torch.Generator().manual_seed(5))
    kv = kv_cache.pack_kv(k, v, bits=4, key_group_size=32, residual=32)
    assert kv.nbytes == 2 * k.numel() * 4
    assert all(torch.equal(a, b) for a, b in zip(kv.unpack(), (k, v)))


def test_context_manager_quantizes_and_restores(tiny_llama):
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(6))
    implementation = tiny_llama.config._attn_implementation
    with torch.no_grad():
        reference = tiny_llama(ids).logits
        with kv_cache.kv_quantization(tiny_llama, bits=8) as model:
            assert model is tiny_llama and tiny_llama.config._attn_implementation != implementation
            int8 = tiny_llama(ids).logits
        with kv_cache.kv_quantization(tiny_llama, bits=2, key_group_size=16):
            int2 = tiny_llama(ids).logits
        # a block shorter than the residual window stays exact (at 64 tokens, R = 64 would flush the keys)
        with kv_cache.kv_quantization(tiny_llama, bits=2, residual=96):
            exact = tiny_llama(ids).logits
        after = tiny_llama(ids).logits
    assert 0 < (int8 - reference).abs().max() < 1e-2
    assert (int2 - reference).abs().max() > 0.1
    assert torch.equal(exact, reference)
    assert torch.equal(after, reference) and tiny_llama.config._attn_implementation == implementation


def test_context_manager_restores_after_an_exception(tiny_llama):
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = tiny_llama(ids).logits
        with pytest.raises(RuntimeError, match="inside"):
            with kv_cache.kv_quantization(tiny_llama, bits=2):
                tiny_llama(ids)
                raise RuntimeError("inside the block")
        assert torch.equal(tiny_llama(ids).logits, reference)


def test_context_manager_perplexity_close_at_8_bits(tiny_llama):
    blocks = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(8))
    reference = evaluate.perplexity(tiny_llama, blocks)
    with kv_cache.kv_quantization(tiny_llama, bits=8):
        assert evaluate.perplexity(tiny_llama, blocks) == pytest.approx(reference, rel=1e-3)


def test_validation(tiny_llama):
    k = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="bits"):
        kv_cache.quantize_keys(k, 1, 4)
    with pytest.raises(ValueError, match="bits"):
        kv_cache.pack_kv(k, k, 9, 4)
    with pytest.raises(ValueError, match="key_group_size"):
        kv_cache.pack_kv(k, k, 4, 0)
    with pytest.raises(ValueError, match="residual"):
        kv_cache.quantize_values(k, 4, residual=-1)
    with pytest.raises(ValueError, match="residual must be 0 or a multiple"):
        kv_cache.quantize_keys(k, 4, 4, residual=6)
    with pytest.raises(ValueError, match=r"k must have shape \[batch, kv_heads, seq, head_dim\]"):
        kv_cache.quantize_keys(k[0], 4, 4)
    with pytest.raises(ValueError, match="v must have shape"):
        kv_cache.pack_kv(k, k[0], 4, 4)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        kv_cache.quantize_values(k.tolist(), 4)
    with pytest.raises(TypeError, match="k must be a floating-point"):
        kv_cache.quantize_keys(k.long(), 4, 4)
    with pytest.raises(ValueError, match="k holds NaN"):
        kv_cache.quantize_keys(k.index_fill(2, torch.tensor([3]), float("nan")), 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        kv_cache.pack_kv(k, k[:, :, :4], 4, 4)
    with pytest.raises(TypeError, match="past_key_values"):
        kv_cache.pack_cache((k, k), 4)
    with pytest.raises(TypeError, match="model"):
        with kv_cache.kv_quantization(torch.nn.Linear(2, 2), 4):
            pass
    with pytest.raises(ValueError, match="residual"):
        with kv_cache.kv_quantization(tiny_llama, 4, key_group_size=32, residual=16):
            pass
    assert tiny_llama.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_smollm2_int8_kv_cache_logits_and_packed_bytes(smollm2):
    """A 64-token prompt: int8 KV keeps the logits close and the same next tokens; its cache (30
    layers, 3 KV heads of 64) packs to the bytes of the formula, 3.7x smaller than float32."""
    model, tokenizer = smollm2
    text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n" * 8
    ids = torch.tensor([tokenizer(text)["input_ids"][:64]])
    implementation = model.config._attn_implementation
    with torch.no_grad():
        out = model(ids, use_cache=True)
        with kv_cache.kv_quantization(model, bits=8):
            int8 = model(ids).logits
    assert model.config._attn_implementation == implementation
    assert (int8 - out.logits).abs().max() < 1.0  # logits reach |35|; measured 0.2
    assert (int8.argmax(-1) == out.logits.argmax(-1)).float().mean() > 0.95

    layers, n_bytes = kv_cache.pack_cache(out.past_key_values, bits=8, key_group_size=32)
    h, d, seq = 3, 64, 64
    per_layer = 2 * h * seq * d + h * d * (seq // 32) * 3 + h * seq * 3  # codes, key and value scale + zero-point
    assert len(layers) == 30 and n_bytes == 30 * per_layer == 789_120
    full = evaluate.cache_bytes(out.past_key_values)
    assert full == evaluate.kv_cache_bytes(model.config, seq) == 2_949_120
    assert full / n_bytes == pytest.approx(3.74, abs=0.01)
