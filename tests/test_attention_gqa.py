"""refimpl.attention.gqa: grouped-query attention equals MHA with repeated key/value heads and
PyTorch's attention; expanding a model's KV heads changes nothing but the cache; mean pooling gives
the right shapes, config and weights and Hugging Face's forward still runs; validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_llama

from refimpl import evaluate
from refimpl.attention import gqa
from refimpl.attention.decoder import Decoder


def _qkv(n_heads, n_kv_heads, t=6, length=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, n_heads, t, d, generator=g), torch.randn(2, n_kv_heads, length, d, generator=g),
            torch.randn(2, n_kv_heads, length, d, generator=g))


@pytest.mark.parametrize("n_heads, n_kv_heads", [(6, 6), (6, 3), (6, 2), (6, 1), (9, 3)])
def test_gqa_equals_mha_with_repeated_heads(n_heads, n_kv_heads):
    q, k, v = _qkv(n_heads, n_kv_heads)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(1)) < 0.7
    mask[:, 0] = True  # every query sees at least one key
    group = n_heads // n_kv_heads
    out = gqa.attention(q, k, v, mask)
    mha = gqa.attention(q, gqa.repeat_kv_heads(k, group), gqa.repeat_kv_heads(v, group), mask)
    # the same sums, batched differently by the matmul: float32 sums of 9 weighted values (|v| < 4) in
    # another order, at most 9 * eps * 4 = 2e-6 (measured 4.8e-7, two float32 steps at 2)
    torch.testing.assert_close(out, mha, atol=2e-6, rtol=0)
    for h in range(n_heads):  # query head h uses key/value head h // group
        single = gqa.attention(q[:, h:h + 1], k[:, h // group:h // group + 1], v[:, h // group:h // group + 1], mask)
        torch.testing.assert_close(out[:, h:h + 1], single, atol=2e-6, rtol=0)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_attention_scale_and_no_mask():
    q, k, v = _qkv(4, 2)
    torch.testing.assert_close(gqa.attention(q, k, v, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True), atol=1e-5, rtol=0)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_expand_to_mha_changes_nothing_but_the_cache():
    model = make_tiny_llama(0, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    reference = _logits(model, ids)
    gqa_bytes = evaluate.kv_cache_bytes(model.config, 20, 2)
    assert gqa.expand_kv_heads(model, 4) is model
    assert model.config.num_key_value_heads == 4
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.num_key_value_groups == 1
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (4 * 16, 64)
    torch.testing.assert_close(_logits(model, ids), reference, atol=1e-6, rtol=0)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert evaluate.cache_bytes(cache) == evaluate.kv_cache_bytes(model.config, 20, 2) == 2 * gqa_bytes
    # pooling the copies gives the GQA model back
    weights = [layer.self_attn.k_proj.weight.clone() for layer in model.model.layers]
    gqa.convert_kv_heads(model, 2)
    torch.testing.assert_close(_logits(model, ids), reference, atol=1e-6, rtol=0)
    for layer, expanded in zip(model.model.layers, weights):
        torch.testing.assert_close(layer.self_attn.k_proj.weight, expanded.view(2, 2, 16, 64)[:, 0].reshape(32, 64))


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_mean_pooling_from_mha(n_kv_heads):
    model = make_tiny_llama(3, num_attention_heads=4, num_key_value_heads=4, attention_bias=True)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    original = [(layer.self_attn.k_proj.weight.clone(), layer.self_attn.v_proj.bias.clone())
                for layer in model.model.layers]
    q_weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    reference = _logits(model, ids)
    gqa.convert_kv_heads(model, n_kv_heads)
    group = 4 // n_kv_heads
    assert model.config.num_key_value_heads == n_kv_heads
    for layer, (k_weight, v_bias) in zip(model.model.layers, original):
        attn = layer.self_attn
        assert attn.num_key_value_groups == group
        assert attn.k_proj.weight.shape == (n_kv_heads * 16, 64) and attn.v_proj.bias.shape == (n_kv_heads * 16,)
        for g in range(n_kv_heads):  # head g is the mean of heads g*group .. (g+1)*group - 1
            members = slice(g * group, (g + 1) * group)
            torch.testing.assert_close(attn.k_proj.weight.view(n_kv_heads, 16, 64)[g],
                                       k_weight.view(4, 16, 64)[members].mean(0))
            torch.testing.assert_close(attn.v_proj.bias.view(n_kv_heads, 16)[g], v_bias.view(4, 16)[members].mean(0))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_weight)
    pooled = _logits(model, ids)  # Hugging Face's forward runs on the pooled heads ...
    assert pooled.shape == reference.shape and torch.isfinite(pooled).all()
    assert (pooled - reference).abs().max() > 1e-3  # ... and, without uptraining, differs
    torch.testing.assert_close(Decoder.from_hf(model)(ids), pooled, atol=1e-4, rtol=0)  # as does the decoder
    with torch.no_grad():  # and decoding with the model's own cache
        cache = model(ids[:, :10], use_cache=True).past_key_values
        step = model(ids[:, 10:11], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step[:, 0], pooled[:, 10], atol=1e-5, rtol=0)
    assert evaluate.cache_bytes(cache) == evaluate.kv_cache_bytes(model.config, 11)


def test_converting_to_the_same_number_of_heads_is_the_identity(tiny_llama):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    reference = _logits(tiny_llama, ids)
    weights = {name: p.clone() for name, p in tiny_llama.named_parameters()}
    gqa.convert_kv_heads(tiny_llama, 2)
    gqa.expand_kv_heads(tiny_llama, 2)
    assert all(torch.equal(p, weights[name]) for name, p in tiny_llama.named_parameters())
    assert torch.equal(_logits(tiny_llama, ids), reference)


def test_validation(tiny_llama):
    q, k, v = _qkv(6, 4)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of the number of key/value heads"):
        gqa.attention(q, k, v)
    q, k, v = _qkv(4, 2)
    with pytest.raises(ValueError, match=r"q must have shape \[batch, heads, seq, head_dim\]"):
        gqa.attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same"):
        gqa.attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="head_dim"):
        gqa.attention(q, k[..., :4], v[..., :4])
    with pytest.raises(TypeError, match="k must be a floating-point"):
        gqa.attention(q, k.long(), v)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        gqa.attention(q, k, v, mask=torch.ones(6, 9))
    with pytest.raises(ValueError, match=r"v must have shape \[batch, kv_heads, l=9, d\]"):
        gqa.attend(gqa.attention_scores(q, k), v[:, :, :5])
    with pytest.raises(ValueError, match="n_rep"):
        gqa.repeat_kv_heads(k, 0)
    with pytest.raises(ValueError, match="n_groups"):
        gqa.mean_pool_heads(torch.randn(4, 3), 3)
    with pytest.raises(ValueError, match=r"n_kv_heads must divide the current number of key/value heads \(2\)"):
        gqa.convert_kv_heads(tiny_llama, 4)
    with pytest.raises(ValueError, match="n_kv_heads must be a positive int"):
        gqa.convert_kv_heads(tiny_llama, 0)
    with pytest.raises(ValueError, match="n_kv_heads must be a multiple of the current number"):
        gqa.expand_kv_heads(tiny_llama, 3)
    with pytest.raises(ValueError, match=r"divide the number of query heads \(4\)"):
        gqa.expand_kv_heads(tiny_llama, 8)
    with pytest.raises(TypeError, match="Llama-style"):
        gqa.convert_kv_heads(torch.nn.Linear(2, 2), 1)
    assert tiny_llama.config.num_key_value_heads == 2  # failed calls changed nothing


@pytest.mark.slow
def test_smollm2_mha_gqa_mqa(smollm2):
    """SmolLM2-135M (9 query heads, 3 KV heads): as MHA (9 KV heads) it computes the same logits with a
    3x larger cache; pooled to MQA (1 KV head) the cache is 3x smaller and, without uptraining, the
    perplexity rises."""
    from refimpl.data import load_text, token_blocks

    model, tokenizer = smollm2
    blocks = token_blocks(tokenizer, load_text("shakespeare"), 64, 2)
    reference = _logits(model, blocks)
    gqa_bytes = evaluate.kv_cache_bytes(model.config, 64)
    mha = gqa.expand_kv_heads(copy.deepcopy(model), 9)
    torch.testing.assert_close(_logits(mha, blocks), reference, atol=1e-4, rtol=1e-4)
    assert evaluate.kv_cache_bytes(mha.config, 64) == 3 * gqa_bytes
    mqa = gqa.convert_kv_heads(mha, 1)  # from 9 heads: the mean of all nine, as from SmolLM2's three
    del mha
    assert evaluate.kv_cache_bytes(mqa.config, 64) * 3 == gqa_bytes
    assert evaluate.perplexity(mqa, blocks) > evaluate.perplexity(model, blocks)
    assert model.config.num_key_value_heads == 3  # the shared model is untouched


def test_uptraining_trains_only_the_key_and_value_projections(tiny_llama, char_tokenizer):
    from refimpl.training import TrainConfig

    model = gqa.convert_kv_heads(tiny_llama, 1)
    model.model.norm.weight.requires_grad_(False)  # a caller's flag, kept as it was
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))]  # learnt by heart
    log = gqa.uptrain(model, batches, TrainConfig(steps=8, lr=1e-2))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.endswith(gqa.UPTRAINED)} and len(changed) == 4
    assert log.losses[-1] < log.losses[0]
    assert not model.model.norm.weight.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "model.norm.weight")


def test_the_books_uptraining_recipe(char_tokenizer, monkeypatch):
    from refimpl import data

    monkeypatch.setattr(data, "load_text", lambda name, split: " ".join(f"{name}{i}" for i in range(5000)))
    config, batches = gqa.uptraining_recipe(char_tokenizer)
    assert config.steps == len(batches) and all(b.shape == (2, 128) for b in batches)
    assert config is gqa.UPTRAINING and config.warmup_steps >= 1
    assert len({tuple(b.flatten().tolist()) for b in batches}) == len(batches)  # every step on new text
