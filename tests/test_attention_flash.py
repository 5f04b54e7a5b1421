"""refimpl.attention.flash: the tiled forward equals PyTorch's attention over random shapes, masks,
block sizes and GQA; the HBM access counts match hand counts and grow as Theorem 2 says; a Hugging
Face model keeps its logits and perplexity with it; validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import evaluate
from refimpl.attention import flash


def _qkv(batch, n_heads, n_kv_heads, n_q, n_k, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n_heads, n_q, d, generator=g).to(dtype),
            torch.randn(batch, n_kv_heads, n_k, d, generator=g).to(dtype),
            torch.randn(batch, n_kv_heads, n_k, d, generator=g).to(dtype))


def _reference(q, k, v, causal, scale=None):
    """PyTorch's attention; causal queries aligned to the last keys (decoding with a cache)."""
    n_q, n_k = q.shape[2], k.shape[2]
    mask = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batch=st.integers(1, 2), n_kv_heads=st.integers(1, 3), group=st.integers(1, 3), n_q=st.integers(1, 70),
       extra_keys=st.integers(0, 30), d=st.sampled_from([4, 8, 16]), causal=st.booleans(),
       block_q=st.integers(1, 40), block_k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_flash_equals_sdpa(batch, n_kv_heads, group, n_q, extra_keys, d, causal, block_q, block_k, seed):
    q, k, v = _qkv(batch, n_kv_heads * group, n_kv_heads, n_q, n_q + extra_keys, d, seed)
    out = flash.flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    torch.testing.assert_close(out, _reference(q, k, v, causal), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n, block_q, block_k", [(1, 64, 64), (63, 16, 16), (65, 16, 16), (100, 7, 13), (37, 37, 1),
                                                 (128, 64, 64), (33, 128, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths_and_block_sizes(n, block_q, block_k, causal):
    q, k, v = _qkv(2, 6, 2, n, n, 32, seed=n)
    out = flash.flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_scale_large_scores_and_half_precision():
    q, k, v = _qkv(1, 4, 4, 50, 50, 16, seed=1)
    torch.testing.assert_close(flash.flash_attention(q, k, v, scale=0.7, block_q=8, block_k=8),
                               _reference(q, k, v, False, scale=0.7), atol=1e-5, rtol=0)
    # scores in the thousands, far beyond exp's float32 range (88): the running maximum keeps every
    # exponent <= 0 (the rounding of scores this large costs both implementations some 1e-5)
    big = flash.flash_attention(q * 40, k * 40, v, causal=True, block_q=8, block_k=8)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, _reference(q * 40, k * 40, v, True), atol=1e-4, rtol=0)
    q16, k16, v16 = (x.to(torch.bfloat16) for x in (q, k, v))
    out = flash.flash_attention(q16, k16, v16, causal=True, block_q=16, block_k=16)
    assert out.dtype == torch.bfloat16
    # float32 tiles, rounded once to bfloat16: within half a bfloat16 step, 2^-8 relative (measured
    # 0.0038); allow one step
    torch.testing.assert_close(out.float(), _reference(q16.float(), k16.float(), v16.float(), True),
                               atol=1e-5, rtol=2**-7)


def test_causal_skips_key_blocks_above_the_diagonal(monkeypatch):
    """Count the key blocks the loop loads: with the causal mask about half are skipped."""
    loaded = []
    original = flash._key_block_starts

    def counting(*args):
        starts = original(*args)
        loaded.extend(starts)
        return starts

    monkeypatch.setattr(flash, "_key_block_starts", counting)
    q, k, v = _qkv(1, 2, 2, 64, 64, 8)
    flash.flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    assert len(loaded) == 1 + 2 + 3 + 4  # query block i visits key blocks 0..i
    loaded.clear()
    flash.flash_attention(q, k, v, causal=False, block_q=16, block_k=16)
    assert len(loaded) == 16


# --- IO complexity (Theorem 2) ---------------------------------------------------------------------


def test_io_counts_by_hand():
    # Algorithm 0 with N = 4, d = 2: reads Q, K (16), S (16), P and V (16 + 8); writes S, P (32), O (8)
    assert flash.standard_attention_io(4, 2) == flash.IOCount(reads=56, writes=40)
    # two query blocks of 2, each reading Q_i (4), and K_j, V_j of both key blocks (2 * 2 * 2 * 2); O written once
    assert flash.flash_attention_io(4, 2, block_q=2, block_k=2) == flash.IOCount(reads=8 + 2 * 16, writes=8)
    # causal: query block 0 only visits key block 0
    assert flash.flash_attention_io(4, 2, block_q=2, block_k=2, causal=True) == flash.IOCount(reads=8 + 8 + 16,
                                                                                               writes=8)
    # a ragged last block: N = 5, B_r = 2 -> 3 query blocks; key reads do not depend on B_c
    assert flash.flash_attention_io(5, 3, block_q=2, block_k=4) == flash.IOCount(reads=15 + 3 * 30, writes=15)
    assert flash.flash_attention_io(5, 3, block_q=2, block_k=1).reads == 15 + 3 * 30
    # Algorithm 1, line 1: B_c = ceil(M / 4d), B_r = min(B_c, d)
    assert flash.sram_block_sizes(1000, 16) == (16, 16)
    assert flash.sram_block_sizes(100 * 1024 // 4, 64) == (64, 100)
    assert flash.sram_block_sizes(512, 64) == (2, 2)


def test_io_grows_as_theorem_2_says():
    d = 64
    for n in (1024, 2048, 4096):
        standard = flash.standard_attention_io(n, d).total
        assert standard == 4 * n * n + 4 * n * d  # Θ(Nd + N²)
        for sram in (2048, 4096, 8192, 16384):  # M between d and 4d², where B_r = ceil(M / 4d) <= d
            block_q, block_k = flash.sram_block_sizes(sram, d)
            io = flash.flash_attention_io(n, d, block_q, block_k).total
            # N d + 2 N d ceil(N / B_r) + N d, with B_r = M / 4d: about 8 N² d² / M
            assert 8 <= io / (n * n * d * d / sram) <= 8 * (1 + 2 * block_q / n)
    # doubling N: x4 for both; doubling M: /2 for flash only
    ratio_n = flash.flash_attention_io(4096, d, 8, 8).total / flash.flash_attention_io(2048, d, 8, 8).total
    assert ratio_n == pytest.approx(4, rel=0.01)
    assert flash.standard_attention_io(4096, d).total / flash.standard_attention_io(2048, d).total == pytest.approx(
        4, rel=0.05)
    assert (flash.flash_attention_io(4096, d, *flash.sram_block_sizes(8192, d)).total
            / flash.flash_attention_io(4096, d, *flash.sram_block_sizes(16384, d)).total) == pytest.approx(2, rel=0.01)
    # an SRAM of 100 KB (25600 float32) caps B_r at d = 64: flash makes 2N² + 2Nd accesses, half of
    # standard attention's 4N² + 4Nd
    n = 4096
    io = flash.flash_attention_io(n, d, *flash.sram_block_sizes(25600, d)).total
    assert io == 2 * n * n + 2 * n * d
    assert flash.standard_attention_io(n, d).total / io == pytest.approx(2, rel=0.01)
    causal = flash.flash_attention_io(n, d, 64, 64, causal=True).total
    assert causal < 0.6 * flash.flash_attention_io(n, d, 64, 64).total  # skipped blocks are never read


# --- memory -----------------------------------------------------------------------------------------


def test_peak_tensor_bytes_by_hand():
    x = torch.ones(100)

    def allocate_and_free():
        a = torch.ones(1000)  # 4,000 bytes
        b = torch.ones(2000)  # 12,000 bytes alive: the peak
        del a, b
        return torch.ones(500)  # 2,000 bytes

    result, peak = flash.peak_tensor_bytes(allocate_and_free)
    assert result.shape == (500,) and peak == 12_000
    assert flash.peak_tensor_bytes(lambda: (x.view(10, 10), x[:50], x.add_(1)))[1] == 0  # views, in place
    assert flash.peak_tensor_bytes(lambda: x * 2)[1] == 400  # the result counts
    with torch.inference_mode():
        # x + 1 (400 bytes) is still alive when .sum() creates its 4-byte result
        assert flash.peak_tensor_bytes(lambda: (x + 1).sum())[1] == 404


@pytest.mark.parametrize("n", [128, 256])
def test_standard_attention_memory_is_quadratic_and_flash_is_linear(n):
    from refimpl.attention import gqa

    def peaks(length):
        q, k, v = _qkv(1, 4, 2, length, length, 16, seed=length)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        standard = flash.peak_tensor_bytes(lambda: gqa.attention(q, k, v, causal))[1]
        tiled = flash.peak_tensor_bytes(lambda: flash.flash_attention(q, k, v, causal=True, block_q=16, block_k=16))[1]
        return standard, tiled

    (standard, tiled), (standard_2n, tiled_2n) = peaks(n), peaks(2 * n)
    scores = 4 * n * n * 4  # [1, heads=4, n, n] in float32
    assert standard >= scores and tiled < scores / 4
    assert standard_2n / standard > 3.5
    assert tiled_2n - tiled == 4 * n * 16 * 4  # n more output rows per head; the tiles' working set is constant
    assert peaks(n) == (standard, tiled)  # the same figures on every run


def test_peak_tensor_bytes_validation():
    with pytest.raises(TypeError, match="fn must be callable"):
        flash.peak_tensor_bytes(42)


# --- a Hugging Face model ---------------------------------------------------------------------------


def test_hugging_face_model_keeps_its_logits(tiny_llama):
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    implementation = tiny_llama.config._attn_implementation
    with torch.no_grad():
        reference = tiny_llama(ids).logits
        cache = tiny_llama(ids[:, :30], use_cache=True).past_key_values
        step = tiny_llama(ids[:, 30:31], past_key_values=cache, use_cache=True).logits
        with flash.use_flash_attention(tiny_llama, block_q=16, block_k=8) as model:
            assert model is tiny_llama and tiny_llama.config._attn_implementation == "refimpl_tiled_q16_k8"
            logits = tiny_llama(ids).logits
            flash_cache = tiny_llama(ids[:, :30], use_cache=True).past_key_values
            flash_step = tiny_llama(ids[:, 30:31], past_key_values=flash_cache, use_cache=True).logits  # 1 query
            chunk = tiny_llama(ids[:, 31:36], past_key_values=flash_cache, use_cache=True).logits  # 5 queries, 36 keys
            with pytest.raises(ValueError, match="attention_mask"):
                tiny_llama(ids, attention_mask=torch.ones(2, 40, dtype=torch.long).index_fill(1, torch.tensor([0]), 0))
        assert tiny_llama.config._attn_implementation == implementation
        after = tiny_llama(ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(flash_step, step, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunk, reference[:, 31:36], atol=1e-5, rtol=0)
    assert torch.equal(after, reference)


def test_hugging_face_model_restored_after_an_exception(tiny_llama):
    implementation = tiny_llama.config._attn_implementation
    with pytest.raises(RuntimeError, match="inside"):
        with flash.use_flash_attention(tiny_llama):
            raise RuntimeError("inside the block")
    assert tiny_llama.config._attn_implementation == implementation


def test_validation(tiny_llama):
    q, k, v = _qkv(1, 4, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        flash.flash_attention(q, k, v, block_q=0)
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        flash.flash_attention(q, k, v, block_k=-2)
    with pytest.raises(ValueError, match="key/value heads must divide the query heads"):
        flash.flash_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match=r"q must have a non-empty shape \[batch, heads, seq, head_dim\]"):
        flash.flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        flash.flash_attention(q, k, v[:, :, :4])
    with pytest.raises(TypeError, match="v must be a floating-point"):
        flash.flash_attention(q, k, v.long())
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash.flash_attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="causal attention needs at least as many keys as queries"):
        flash.flash_attention(q, k[:, :, :4], v[:, :, :4], causal=True)
    with pytest.raises(ValueError, match="n must be a positive int"):
        flash.flash_attention_io(0, 8, 4, 4)
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        flash.flash_attention_io(8, 8, 4, 0)
    with pytest.raises(ValueError, match="d must be a positive int"):
        flash.standard_attention_io(8, 0)
    with pytest.raises(ValueError, match="sram_size"):
        flash.sram_block_sizes(32, 64)
    with pytest.raises(ValueError, match="block_q"):
        with flash.use_flash_attention(tiny_llama, block_q=0):
            pass
    with pytest.raises(TypeError, match="model"):
        with flash.use_flash_attention(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.slow
def test_smollm2_perplexity_unchanged(smollm2):
    """SmolLM2-135M on two 64-token Shakespeare blocks: the same perplexity with every attention layer
    computed by the tiled forward (blocks of 16 queries and 16 keys, so 4 x 4 tiles per head)."""
    from refimpl.data import load_text, token_blocks

    model, tokenizer = smollm2
    blocks = token_blocks(tokenizer, load_text("shakespeare"), 64, 2)
    reference = evaluate.perplexity(model, blocks)
    with flash.use_flash_attention(model, block_q=16, block_k=16):
        tiled = evaluate.perplexity(model, blocks)
    assert math.isfinite(reference) and tiled == pytest.approx(reference, rel=1e-4)
