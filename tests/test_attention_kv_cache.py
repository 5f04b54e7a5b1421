"""refimpl.attention.kv_cache and .decoder: cached decoding reproduces full recomputation and the
Hugging Face logits; the forward pass is its steps (embed, blocks, head) composed; RoPE matches
Hugging Face's; the cache's bytes are the formula's; rollback; sliding windows and StreamingLLM sinks
against attention computed directly from their definitions; validation."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_llama

from refimpl import evaluate
from refimpl.attention.decoder import Decoder, rope_theta
from refimpl.attention.kv_cache import KVCache, ModelKVCache, apply_rope, cached_attention, rope_frequencies


def _ids(batch, length, seed=0, vocab=128):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode_in_chunks(decoder, ids, cache, chunks):
    """Logits of ``ids`` fed through ``cache`` in chunks of the given sizes (they sum to the length)."""
    out, start = [], 0
    for size in chunks:
        out.append(decoder(ids[:, start:start + size], cache))
        start += size
    assert start == ids.shape[1]
    return torch.cat(out, dim=1)


# --- cached decoding equals recomputation ---------------------------------------------------------


@pytest.mark.parametrize("n_heads, n_kv_heads, hidden, seed", [
    (4, 4, 64, 0),  # MHA
    (4, 2, 64, 1),  # GQA
    (4, 1, 64, 2),  # MQA
    (8, 2, 64, 3),  # head_dim 8
    (6, 3, 96, 4),  # three KV heads like SmolLM2
])
def test_cached_decoding_equals_full_recomputation(n_heads, n_kv_heads, hidden, seed):
    model = make_tiny_llama(seed, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, hidden_size=hidden,
                            rope_theta=[10000.0, 500.0, 1e6][seed % 3])
    decoder = Decoder.from_hf(model)
    ids = _ids(2, 24, seed)
    with torch.no_grad():
        hf = model(ids).logits
        full = decoder(ids)
        cache = decoder.new_cache(batch_size=2, max_len=32)
        cached = _decode_in_chunks(decoder, ids, cache, [9] + [1] * 15)  # prefill, then one token at a time
    assert cache.length == 24
    torch.testing.assert_close(full, hf, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_any_chunking_gives_the_same_logits():
    decoder = Decoder.from_hf(make_tiny_llama(5))
    ids = _ids(1, 30, 5)
    with torch.no_grad():
        reference = decoder(ids)
        rng = random.Random(0)
        for _ in range(3):
            chunks, left = [], 30
            while left:
                chunks.append(rng.randint(1, min(7, left)))
                left -= chunks[-1]
            cached = _decode_in_chunks(decoder, ids, decoder.new_cache(1, 30), chunks)
            torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0)


def test_logits_to_keep_gives_the_last_positions_only(tiny_llama):
    decoder = Decoder.from_hf(tiny_llama)
    ids = _ids(2, 12, 7)
    with torch.no_grad():
        full = decoder(ids)
        assert torch.equal(decoder(ids, logits_to_keep=0), full)
        torch.testing.assert_close(decoder(ids, logits_to_keep=1), full[:, -1:], atol=1e-6, rtol=0)
        torch.testing.assert_close(decoder(ids, logits_to_keep=5), full[:, -5:], atol=1e-6, rtol=0)
        assert decoder(ids, logits_to_keep=50).shape == full.shape  # more than t: all of them
        cache = decoder.new_cache(2, 12)
        prefill = decoder(ids[:, :8], cache, logits_to_keep=1)  # the cache still gets every position
        step = decoder(ids[:, 8:9], cache, logits_to_keep=1)
    assert cache.length == 9
    torch.testing.assert_close(prefill, full[:, 7:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, full[:, 8:9], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [None, (1, 3)])
def test_forward_is_embed_then_each_block_then_head(layers):
    """Decoder.forward composed by hand from its steps, bit for bit: without a cache, and through one
    (a prefill, then a step), which ends up holding the same keys and values."""
    decoder = Decoder.from_hf(make_tiny_llama(9, num_hidden_layers=4), layers)
    ids = _ids(2, 10, 9)

    def by_hand(new, cache, start):
        positions = torch.arange(start, start + new.shape[1])
        h = decoder.embed(new)  # [2, t, hidden]
        for i in range(len(decoder.layers)):
            h = decoder.block(i, h, positions, cache[i] if cache is not None else None)
        return decoder.head(h)  # [2, t, vocab]

    with torch.no_grad():
        assert torch.equal(decoder(ids), by_hand(ids, None, 0))
        forward_cache, hand_cache = decoder.new_cache(2, 10), decoder.new_cache(2, 10)
        for start, stop in ((0, 7), (7, 8)):
            assert torch.equal(decoder(ids[:, start:stop], forward_cache),
                               by_hand(ids[:, start:stop], hand_cache, start))
    assert forward_cache.length == hand_cache.length == 8
    assert all(torch.equal(a.k_cache, b.k_cache) and torch.equal(a.v_cache, b.v_cache)
               for a, b in zip(forward_cache.layers, hand_cache.layers))


def test_decoder_shares_the_models_weights(tiny_llama):
    decoder = Decoder.from_hf(tiny_llama)
    model_params = {p.data_ptr() for p in tiny_llama.parameters()}
    assert {p.data_ptr() for p in decoder.parameters()} == model_params
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight.mul_(2)  # a change to the model shows in the decoder
        torch.testing.assert_close(decoder(_ids(1, 8)), tiny_llama(_ids(1, 8)).logits, atol=1e-4, rtol=0)


def test_rope_matches_hugging_face():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = make_tiny_llama(0, rope_theta=5000.0).config
    x = torch.randn(2, 3, 11, 16, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(5, 16)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    inv_freq = rope_frequencies(16, rope_theta(config))
    assert torch.equal(apply_rope(x, positions, inv_freq), expected)
    # the rotation preserves norms and makes scores depend on the distance only
    q, k = x[0, 0, 0], x[0, 1, 0]
    rotated = [(apply_rope(q[None], torch.tensor([p]), inv_freq) @ apply_rope(k[None], torch.tensor([s]),
                                                                               inv_freq).T).item()
               for p, s in ((7, 3), (104, 100))]
    assert rotated[0] == pytest.approx(rotated[1], abs=1e-5)


def test_one_layers_attention_matches_hugging_face(tiny_llama):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    decoder, attn = Decoder.from_hf(tiny_llama), tiny_llama.model.layers[1].self_attn
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(9)
    with torch.no_grad():
        expected = attn(x, LlamaRotaryEmbedding(tiny_llama.config)(x, positions[None]), None)[0]  # causal
        torch.testing.assert_close(decoder.attention(attn, x, positions, None), expected, atol=1e-5, rtol=0)
        cache = KVCache(2, 2, 16, 16)
        chunked = [decoder.attention(attn, x[:, a:b], positions[a:b], cache) for a, b in ((0, 5), (5, 9))]
        torch.testing.assert_close(torch.cat(chunked, dim=1), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"x must be a tensor \[batch, t, hidden=64\]"):
        decoder.attention(attn, x[0], positions, None)
    with pytest.raises(TypeError, match="cache must be a KVCache or None"):
        decoder.attention(attn, x, positions, decoder.new_cache(2, 16))


# --- memory -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cache_bytes_equal_the_formula(dtype):
    model = make_tiny_llama(0, num_hidden_layers=3)
    cache = Decoder.from_hf(model).new_cache(batch_size=2, max_len=40, dtype=dtype)
    tensors = [t for layer in cache for t in (layer.k_cache, layer.v_cache)]
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    assert cache.nbytes == evaluate.kv_cache_bytes(model.config, 40, 2, dtype)
    assert all(t.dtype == dtype and t.shape == (2, 2, 40, 16) for t in tensors)
    windowed = ModelKVCache.from_config(model.config, 2, 4096, dtype, window=12, sinks=4)
    assert windowed.nbytes == evaluate.kv_cache_bytes(model.config, 16, 2, dtype)  # S + W slots, any length


# --- rollback -----------------------------------------------------------------------------------------


def test_truncate_rolls_back_rejected_tokens():
    decoder = Decoder.from_hf(make_tiny_llama(6))
    prompt, draft, accepted = _ids(1, 10, 1), _ids(1, 5, 2), _ids(1, 3, 3)
    with torch.no_grad():
        cache = decoder.new_cache(1, 32)
        decoder(prompt, cache)
        decoder(draft, cache)  # five draft tokens; keep the first two, then continue differently
        cache.truncate(12)
        assert cache.length == 12 and all(layer.length == 12 for layer in cache)
        continued = decoder(accepted, cache)
        sequence = torch.cat([prompt, draft[:, :2], accepted], dim=1)
        torch.testing.assert_close(continued, decoder(sequence)[:, 12:], atol=1e-5, rtol=0)
        cache.truncate(0)
        torch.testing.assert_close(decoder(sequence, cache), decoder(sequence), atol=1e-5, rtol=0)


def test_window_cache_rolls_back_what_it_still_holds():
    decoder = Decoder.from_hf(make_tiny_llama(7))
    ids = _ids(1, 20, 4)
    with torch.no_grad():
        reference = decoder(ids, decoder.new_cache(1, 32, window=6))
        cache = decoder.new_cache(1, 32, window=6)
        decoder(ids[:, :15], cache)
        decoder(ids[:, 15:16], cache)
        cache.truncate(15)  # one position back: the ring still holds what position 15 attends to
        torch.testing.assert_close(decoder(ids[:, 15:], cache), reference[:, 15:], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="overwritten"):
            cache.truncate(17)  # needs position 12, overwritten by 18
        assert cache.length == 20
        chunked = decoder.new_cache(1, 32, window=6)
        decoder(ids[:, :16], chunked)  # a chunk keeps its last `window` positions too
        chunked.truncate(15)
        torch.testing.assert_close(decoder(ids[:, 15:], chunked), reference[:, 15:], atol=1e-5, rtol=0)
        short = decoder.new_cache(1, 32, window=6)
        decoder(ids[:, :4], short)
        short.truncate(1)  # before the window is full nothing was overwritten


# --- sliding window and sinks -----------------------------------------------------------------------


def _qkv(n, n_heads=4, n_kv_heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, n_heads, n, d, generator=g), torch.randn(2, n_kv_heads, n, d, generator=g),
            torch.randn(2, n_kv_heads, n, d, generator=g))


def _through_cache(q, k, v, inv_freq, chunks, window, sinks):
    n = q.shape[2]
    cache = KVCache(2, k.shape[1], n, k.shape[3], window=window, sinks=sinks)
    out, start = [], 0
    for size in chunks:
        positions = torch.arange(start, start + size)
        out.append(cached_attention(q[:, :, positions], k[:, :, positions], v[:, :, positions], positions, inv_freq,
                                    cache=cache))
        start += size
    return torch.cat(out, dim=2)


def _streaming_reference(q, k, v, inv_freq, window, sinks):
    """StreamingLLM as the paper states it, one query at a time: keep the first `sinks` and the last
    `window` positions, number them 0, 1, ... within the cache, rotate the pre-RoPE keys there, and
    put the query at the last cache position."""
    out = []
    for p in range(q.shape[2]):
        kept = [j for j in range(p + 1) if j < sinks or j > p - window]
        cache_positions = torch.arange(len(kept))
        keys = apply_rope(k[:, :, kept], cache_positions, inv_freq)
        query = apply_rope(q[:, :, p:p + 1], cache_positions[-1:], inv_freq)
        out.append(F.scaled_dot_product_attention(query, keys, v[:, :, kept], enable_gqa=True))
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("chunks", [[1] * 40, [13, 1, 1, 20, 5], [40]])
def test_sliding_window_sees_the_last_w_positions(chunks):
    q, k, v = _qkv(40)
    inv_freq = rope_frequencies(8)
    window = 7
    positions = torch.arange(40)
    mask = (positions[None] <= positions[:, None]) & (positions[None] > positions[:, None] - window)
    expected = F.scaled_dot_product_attention(apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq),
                                              v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(_through_cache(q, k, v, inv_freq, chunks, window, 0), expected, atol=1e-5, rtol=0)
    # StreamingLLM with zero sinks numbers positions within the cache; scores only see distances, so it agrees
    torch.testing.assert_close(_streaming_reference(q, k, v, inv_freq, window, 0), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window, sinks", [(6, 4), (3, 1), (10, 2), (60, 4)])
@pytest.mark.parametrize("chunks", [[1] * 40, [17, 1, 2, 20], [40]])
def test_attention_sinks_follow_streaming_llm(window, sinks, chunks):
    q, k, v = _qkv(40, seed=window)
    inv_freq = rope_frequencies(8)
    expected = _streaming_reference(q, k, v, inv_freq, window, sinks)
    torch.testing.assert_close(_through_cache(q, k, v, inv_freq, chunks, window, sinks), expected, atol=1e-5, rtol=0)


def test_window_at_least_the_length_equals_the_full_cache():
    decoder = Decoder.from_hf(make_tiny_llama(8))
    ids = _ids(2, 20, 6)
    with torch.no_grad():
        full = _decode_in_chunks(decoder, ids, decoder.new_cache(2, 20), [8] + [1] * 12)
        for window, sinks in ((20, 0), (25, 0), (16, 4)):
            cache = decoder.new_cache(2, 20, window=window, sinks=sinks)
            torch.testing.assert_close(_decode_in_chunks(decoder, ids, cache, [8] + [1] * 12), full, atol=1e-5, rtol=0)
        small = _decode_in_chunks(decoder, ids, decoder.new_cache(2, 20, window=5, sinks=2), [8] + [1] * 12)
        assert (small[:, 7:] - full[:, 7:]).abs().max() > 1e-3  # a small window changes the later logits
        torch.testing.assert_close(small, decoder(ids, decoder.new_cache(2, 20, window=5, sinks=2)), atol=1e-5, rtol=0)


# --- validation -------------------------------------------------------------------------------------


def test_validation(tiny_llama):
    with pytest.raises(ValueError, match="max_len"):
        KVCache(1, 2, max_len=0, head_dim=8)
    with pytest.raises(ValueError, match="window"):
        KVCache(1, 2, 8, 8, window=0)
    with pytest.raises(ValueError, match="sinks"):
        KVCache(1, 2, 8, 8, window=4, sinks=-1)
    with pytest.raises(ValueError, match="sinks .* need a window"):
        KVCache(1, 2, 8, 8, sinks=2)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_frequencies(7)
    with pytest.raises(ValueError, match="theta"):
        rope_frequencies(8, theta=0.5)
    cache = KVCache(1, 2, max_len=8, head_dim=8)
    k = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"k must have shape \[batch=1, kv_heads=2, t, head_dim=8\]"):
        cache.update(torch.arange(3), torch.randn(1, 3, 3, 8), k)
    with pytest.raises(ValueError, match="same shape"):
        cache.update(torch.arange(3), k, k[:, :, :2])
    with pytest.raises(TypeError, match="positions must be a 1-D LongTensor"):
        cache.update(torch.arange(3.0), k, k)
    with pytest.raises(ValueError, match="positions must continue the cache"):
        cache.update(torch.arange(1, 4), k, k)
    cache.update(torch.arange(3), k, k)
    with pytest.raises(ValueError, match="past max_len 8"):
        cache.update(torch.arange(3, 9), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match="n must be at most the cache length 3"):
        cache.truncate(4)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        cache.truncate(-1)
    with pytest.raises(ValueError, match=r"positions must be a LongTensor of shape \[t=3\]"):
        cached_attention(torch.randn(1, 2, 3, 8), k, k, torch.arange(2), rope_frequencies(8))
    with pytest.raises(TypeError, match="layers"):
        ModelKVCache([])
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        Decoder.from_hf(torch.nn.Linear(2, 2))
    decoder = Decoder.from_hf(tiny_llama)
    with pytest.raises(TypeError, match="input_ids"):
        decoder(_ids(1, 4).float())
    with pytest.raises(ValueError, match=r"positions must be a LongTensor of shape \[t=4\]"):
        decoder(_ids(1, 4), positions=torch.arange(3))
    with pytest.raises(TypeError, match="cache must be a ModelKVCache with 2 layers"):
        decoder(_ids(1, 4), cache=ModelKVCache([KVCache(1, 2, 8, 16)]))
    with pytest.raises(ValueError, match="past max_len"):
        decoder(_ids(1, 9), decoder.new_cache(1, 8))
    cache = decoder.new_cache(1, 8)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="logits_to_keep must be a non-negative int"):
            decoder(_ids(1, 4), cache, logits_to_keep=bad)
    assert cache.length == 0  # a rejected call leaves the cache as it was
    scaled = make_tiny_llama(0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling"):
        Decoder.from_hf(scaled)


# --- the real model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_decoder_and_cached_decoding_match_hugging_face(smollm2):
    """SmolLM2-135M: the written-out forward gives Hugging Face's logits, and so does decoding one
    token at a time through the explicit cache (GQA with 3 KV heads, RoPE base 100000)."""
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog because it")["input_ids"]])
    decoder = Decoder.from_hf(model)
    n = ids.shape[1]
    with torch.no_grad():
        hf = model(ids).logits
        full = decoder(ids)
        cache = decoder.new_cache(1, n)
        cached = _decode_in_chunks(decoder, ids, cache, [4] + [1] * (n - 4))
    assert cache.nbytes == evaluate.kv_cache_bytes(model.config, n) == 30 * 2 * 3 * 64 * n * 4
    # float32 through 30 layers, the two forwards (and one-token steps) summing in other orders: errors
    # scale with the largest logit (31), not with each one (measured up to 4.3e-6 of it, 1.1e-4); a
    # wrong position or a stale cache entry moves logits by O(1)
    tolerance = 2e-5 * hf.abs().max().item()
    torch.testing.assert_close(full, hf, atol=tolerance, rtol=0)
    torch.testing.assert_close(cached, hf, atol=tolerance, rtol=0)
    assert torch.equal(cached.argmax(-1), hf.argmax(-1))
