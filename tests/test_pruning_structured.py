"""Structured pruning: importance scores, a genuinely smaller dense model, LoRA recovery."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from refimpl import evaluate, lora
from refimpl.pruning import structured
from refimpl.training import TrainConfig

from tiny import make_tiny_llama


@pytest.fixture
def gqa_llama():
    """A tiny Llama with 6 query heads in 2 key-value groups and 3 layers."""
    return make_tiny_llama(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3)


BLOCKS = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, blocks=BLOCKS):
    with torch.no_grad():
        return model(blocks).logits


def _random_importance(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    n = c.num_hidden_layers
    return structured.Importance(torch.rand(n, c.num_attention_heads, generator=g),
                                 torch.rand(n, c.num_key_value_heads, generator=g),
                                 torch.rand(n, c.intermediate_size, generator=g), torch.rand(n, generator=g))


def test_removing_channels_equals_zeroing_them(gqa_llama):
    importance = _random_importance(gqa_llama)
    masked = copy.deepcopy(gqa_llama)
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            dropped = torch.ones(128, dtype=torch.bool)
            dropped[importance.channels[i].argsort(descending=True)[:80]] = False
            layer.mlp.down_proj.weight[:, dropped] = 0
    structured.prune_structured(gqa_llama, importance, intermediate_size=80)
    assert gqa_llama.config.intermediate_size == 80
    assert all(layer.mlp.up_proj.weight.shape == (80, 48) for layer in gqa_llama.model.layers)
    assert torch.allclose(_logits(gqa_llama), _logits(masked), atol=1e-6)


@pytest.mark.parametrize("heads_per_group, n_kv_heads", [(2, None), (None, 1), (1, 1)])
def test_removing_heads_equals_zeroing_their_outputs(gqa_llama, heads_per_group, n_kv_heads):
    importance = _random_importance(gqa_llama, seed=1)
    masked = copy.deepcopy(gqa_llama)
    keep_groups = n_kv_heads or 2
    per_group = heads_per_group or 3
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            groups = importance.group_scores()[i].argsort(descending=True)[:keep_groups]
            kept = [g * 3 + h for g in groups.tolist()
                    for h in importance.heads[i].reshape(2, 3)[g].argsort(descending=True)[:per_group].tolist()]
            for head in set(range(6)) - set(kept):
                layer.self_attn.o_proj.weight[:, head * 8 : (head + 1) * 8] = 0
    structured.prune_structured(gqa_llama, importance, heads_per_group=heads_per_group, n_kv_heads=n_kv_heads)
    config = gqa_llama.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (keep_groups * per_group,
                                                                                          keep_groups, 8)
    attention = gqa_llama.model.layers[0].self_attn
    assert attention.q_proj.out_features == keep_groups * per_group * 8 and attention.k_proj.out_features == keep_groups * 8
    assert torch.allclose(_logits(gqa_llama), _logits(masked), atol=1e-5)


def test_removing_layers_equals_skipping_them_and_the_cache_still_works(gqa_llama):
    importance = _random_importance(gqa_llama, seed=2)
    importance.layers = torch.tensor([0.5, 0.1, 0.9])
    skipped = copy.deepcopy(gqa_llama)
    skipped.model.layers = torch.nn.ModuleList([skipped.model.layers[0], skipped.model.layers[2]])
    structured.prune_structured(gqa_llama, importance, n_layers=2)
    assert gqa_llama.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in gqa_llama.model.layers] == [0, 1]
    assert torch.allclose(_logits(gqa_llama), _logits(skipped), atol=1e-6)
    prompt = BLOCKS[:1, :6]
    generated = gqa_llama.generate(prompt, max_new_tokens=5, do_sample=False)
    step_by_step = prompt
    for _ in range(5):  # recomputation without a cache gives the same greedy tokens
        step_by_step = torch.cat([step_by_step, _logits(gqa_llama, step_by_step)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, step_by_step)


def test_pruned_model_is_smaller_and_saves_and_loads(gqa_llama, tmp_path):
    dense_bytes = evaluate.model_bytes(gqa_llama)
    structured.prune_structured(gqa_llama, _random_importance(gqa_llama), intermediate_size=64, heads_per_group=2,
                                n_layers=2)
    assert evaluate.model_bytes(gqa_llama) < dense_bytes
    gqa_llama.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(loaded), _logits(gqa_llama), atol=1e-6)


def test_taylor_importance_sums_first_order_terms_and_leaves_the_model_alone(gqa_llama):
    gqa_llama.model.embed_tokens.weight.requires_grad_(False)
    before = copy.deepcopy(gqa_llama.state_dict())
    importance = structured.taylor_importance(gqa_llama, BLOCKS, batch_size=3)
    assert all(p.grad is None for p in gqa_llama.parameters())
    assert not gqa_llama.model.embed_tokens.weight.requires_grad and gqa_llama.model.norm.weight.requires_grad
    assert all(torch.equal(t, before[name]) for name, t in gqa_llama.state_dict().items())

    gqa_llama.zero_grad()
    gqa_llama(BLOCKS, labels=BLOCKS).loss.backward()  # one batch: the same mean loss
    mlp, attention = gqa_llama.model.layers[1].mlp, gqa_llama.model.layers[1].self_attn
    def term(w):
        return (w.grad * w).abs()
    channel_5 = term(mlp.gate_proj.weight)[5].sum() + term(mlp.up_proj.weight)[5].sum() + term(mlp.down_proj.weight)[:, 5].sum()
    head_4 = term(attention.q_proj.weight)[32:40].sum() + term(attention.o_proj.weight)[:, 32:40].sum()
    group_1 = term(attention.k_proj.weight)[8:16].sum() + term(attention.v_proj.weight)[8:16].sum()
    layer_1 = sum(term(m.weight).sum() for m in gqa_llama.model.layers[1].modules() if isinstance(m, torch.nn.Linear))
    for ours, expected in ((importance.channels[1, 5], channel_5), (importance.heads[1, 4], head_4),
                           (importance.kv_heads[1, 1], group_1), (importance.layers[1], layer_1)):
        assert torch.allclose(ours, expected, rtol=1e-4)


def test_activation_importance_block_influence_and_wanda_sums(gqa_llama):
    importance = structured.activation_importance(gqa_llama, BLOCKS)
    with torch.no_grad():
        hidden = gqa_llama(BLOCKS, output_hidden_states=True).hidden_states  # input of every layer (last is normed)
    cosine = torch.cosine_similarity(hidden[0], hidden[1], dim=-1).mean()
    assert torch.allclose(importance.layers[0], 1 - cosine, atol=1e-5)
    assert (importance.kv_heads == 0).all() and importance.heads.shape == (3, 6)

    inputs = {}
    layer = gqa_llama.model.layers[1]
    def record(module, args, key):  # returns None: the layer's input is left as it is
        inputs[key] = args[0].reshape(-1, args[0].shape[-1])

    hooks = [getattr(layer, part).get_submodule(name).register_forward_pre_hook(
        lambda module, args, key=name: record(module, args, key))
        for part, name in (("self_attn", "o_proj"), ("mlp", "down_proj"))]
    with torch.no_grad():
        gqa_llama(BLOCKS)
    for hook in hooks:
        hook.remove()
    def wanda_sums(weight, x):  # |W_ij| ||X_j||_2 summed over the rows: one score per input column
        return (weight.abs() * x.norm(dim=0)).sum(dim=0)
    head_scores = wanda_sums(layer.self_attn.o_proj.weight, inputs["o_proj"]).reshape(6, 8).sum(dim=1)
    assert torch.allclose(importance.heads[1], head_scores, rtol=1e-4)
    assert torch.allclose(importance.channels[1], wanda_sums(layer.mlp.down_proj.weight, inputs["down_proj"]), rtol=1e-4)


@pytest.mark.parametrize("keep, match", [([], "non-empty"), ([0, 0], "strictly increasing"), ([2, 1], "strictly"),
                                         ([0, 3], "below the model's 3 layers"), ([0.5], "ints"), ("01", "sequence")])
def test_keep_layers_rejects_bad_indices(gqa_llama, keep, match):
    with pytest.raises(ValueError, match=match):
        structured.keep_layers(gqa_llama, keep)
    assert len(gqa_llama.model.layers) == 3 and gqa_llama.config.num_hidden_layers == 3


@pytest.mark.parametrize("blocks, batch_size, error", [(torch.zeros(0, 8, dtype=torch.long), 2, ValueError),
                                                       (torch.rand(2, 8), 2, TypeError),
                                                       (BLOCKS, 0, ValueError)])
def test_importance_and_recovery_reject_bad_blocks(gqa_llama, blocks, batch_size, error):
    for call in (lambda: structured.taylor_importance(gqa_llama, blocks, batch_size),
                 lambda: structured.activation_importance(gqa_llama, blocks, batch_size),
                 lambda: structured.recover(gqa_llama, blocks, TrainConfig(steps=1), batch_size=batch_size)):
        with pytest.raises(error):
            call()
    assert not any(isinstance(m, lora.LoRALinear) for m in gqa_llama.modules())


@pytest.mark.parametrize("kwargs, match", [
    (dict(intermediate_size=129), "intermediate_size"), (dict(heads_per_group=0), "heads_per_group"),
    (dict(n_kv_heads=3), "n_kv_heads"), (dict(n_layers=4), "n_layers"), (dict(n_layers=1.5), "n_layers"),
])
def test_bad_sizes_are_rejected_before_anything_changes(gqa_llama, kwargs, match):
    before = copy.deepcopy(gqa_llama.state_dict())
    with pytest.raises(ValueError, match=match):
        structured.prune_structured(gqa_llama, _random_importance(gqa_llama), **({"intermediate_size": 64} | kwargs))
    assert all(torch.equal(t, before[name]) for name, t in gqa_llama.state_dict().items())
    assert gqa_llama.config.intermediate_size == 128


def test_importance_of_another_model_is_rejected(gqa_llama, tiny_llama):
    with pytest.raises(ValueError, match="importance.heads"):
        structured.prune_structured(gqa_llama, _random_importance(tiny_llama), n_layers=1)
    with pytest.raises(TypeError, match="importance"):
        structured.prune_structured(gqa_llama, {"heads": None}, n_layers=1)


def test_recovery_trains_adapters_merges_them_and_restores_flags(gqa_llama):
    structured.prune_structured(gqa_llama, _random_importance(gqa_llama), intermediate_size=64)
    gqa_llama.model.embed_tokens.weight.requires_grad_(False)
    log = structured.recover(gqa_llama, BLOCKS, TrainConfig(steps=6, lr=3e-3), r=4, batch_size=2)
    assert len(log.losses) == 6 and log.losses[-1] < log.losses[0]
    assert not any(isinstance(m, lora.LoRALinear) for m in gqa_llama.modules())
    assert gqa_llama.model.layers[0].mlp.up_proj.weight.shape == (64, 48)
    flags = {name: p.requires_grad for name, p in gqa_llama.named_parameters()}
    assert flags.pop("model.embed_tokens.weight") is False and all(flags.values())


def test_failed_recovery_leaves_the_model_unchanged(gqa_llama):
    before = copy.deepcopy(gqa_llama.state_dict())
    with pytest.raises(FloatingPointError):
        structured.recover(gqa_llama, BLOCKS, TrainConfig(steps=3, lr=1e30), r=4, batch_size=2)
    assert not any(isinstance(m, lora.LoRALinear) for m in gqa_llama.modules())
    assert all(torch.equal(t, before[name]) for name, t in gqa_llama.state_dict().items())
    assert all(p.requires_grad for p in gqa_llama.parameters())
