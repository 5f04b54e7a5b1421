"""refimpl.calibration: the layer-by-layer capture equals what a full forward pass feeds each linear
layer, including after earlier layers were modified."""

from __future__ import annotations

import pytest
import torch

from refimpl import calibration


def _inputs_of_a_full_forward(model, blocks):
    """Inputs of every linear layer inside the decoder layers, by (layer index, name)."""
    captured, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                handles.append(m.register_forward_pre_hook(
                    lambda module, args, key=(i, name): captured.setdefault(key, []).append(
                        args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for batch in blocks.split(2):
            model(batch)
    for h in handles:
        h.remove()
    return {key: torch.cat(xs) for key, xs in captured.items()}


def test_captured_inputs_equal_a_full_forward(tiny_llama):
    blocks = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    reference = _inputs_of_a_full_forward(tiny_llama, blocks)
    seen = []
    for capture in calibration.layerwise(tiny_llama, blocks, batch_size=2):
        assert set(capture.inputs) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
        for name, x in capture.inputs.items():
            assert x.shape == (5 * 12, capture.linears[name].in_features)
            torch.testing.assert_close(x, reference[(capture.index, name)], rtol=1e-5, atol=1e-6)
        seen.append(capture.index)
    assert seen == [0, 1]


def test_later_layers_see_the_modified_earlier_layers(tiny_llama):
    blocks = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(1))
    captured = {}
    for capture in calibration.layerwise(tiny_llama, blocks, batch_size=3):
        captured.update({(capture.index, n): x for n, x in capture.inputs.items()})
        with torch.no_grad():  # "compress" the layer: halve its MLP output projection
            capture.layer.mlp.down_proj.weight.mul_(0.5)
    reference = _inputs_of_a_full_forward(tiny_llama, blocks)  # the modified model, end to end
    for key, x in captured.items():
        torch.testing.assert_close(x, reference[key], rtol=1e-5, atol=1e-6)


def test_skip_leaves_out_named_linears(tiny_llama):
    capture = next(calibration.layerwise(tiny_llama, torch.zeros(1, 4, dtype=torch.long), skip=("self_attn",)))
    assert set(capture.inputs) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("blocks, error, match", [
    (torch.zeros(0, 8, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(2, 8), TypeError, "LongTensor"),
])
def test_bad_blocks_are_rejected(tiny_llama, blocks, error, match):
    with pytest.raises(error, match=match):
        next(calibration.layerwise(tiny_llama, blocks))


def test_first_layer_inputs_are_the_embeddings_batch_by_batch(tiny_llama):
    blocks = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    before = {name: p.clone() for name, p in tiny_llama.state_dict().items()}
    states = calibration.first_layer_inputs(tiny_llama, blocks, batch_size=2)
    assert len(states) == 3  # batches of 2, 2 and 1 blocks
    for (hidden, kwargs), batch in zip(states, blocks.split(2)):
        assert torch.equal(hidden, tiny_llama.model.embed_tokens(batch))  # [batch, seq_len, hidden]
        assert not {"past_key_values", "past_key_value", "use_cache", "hidden_states"} & set(kwargs)
    assert all(torch.equal(p, before[name]) for name, p in tiny_llama.state_dict().items())


@pytest.mark.parametrize("model, blocks, batch_size, error, match", [
    (None, torch.zeros(2, 8), 8, TypeError, "blocks must be a LongTensor"),
    (None, torch.full((1, 4), 128), 8, ValueError, "vocabulary"),
    (None, torch.zeros(1, 4, dtype=torch.long), 0, ValueError, "batch_size must be a positive int"),
    (torch.nn.Linear(4, 4), torch.zeros(1, 4, dtype=torch.long), 8, TypeError, "model.model.layers"),
])
def test_first_layer_inputs_validate(tiny_llama, model, blocks, batch_size, error, match):
    with pytest.raises(error, match=match):
        calibration.first_layer_inputs(tiny_llama if model is None else model, blocks, batch_size)


def test_models_without_decoder_layers_are_rejected():
    with pytest.raises(TypeError, match="model.model.layers"):
        next(calibration.layerwise(torch.nn.Linear(4, 4), torch.zeros(1, 4, dtype=torch.long)))


@pytest.mark.slow
def test_a_capture_that_does_not_modify_runs_each_layer_once_with_the_same_inputs(tiny_llama):
    blocks = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    calls = []
    handles = [layer.register_forward_pre_hook(lambda module, args, i=i: calls.append(i))
               for i, layer in enumerate(tiny_llama.model.layers)]
    try:
        recomputed = [c.inputs for c in calibration.layerwise(tiny_llama, blocks, batch_size=2)]
        first = calls.count(0) - 4  # the pass that collects the first layer's inputs
        assert calls.count(1) == 4  # two batches, captured then recomputed
        calls.clear()
        reused = [c.inputs for c in calibration.layerwise(tiny_llama, blocks, batch_size=2, modifies=False)]
        assert calls.count(1) == 2 and calls.count(0) == first + 2  # captured once
    finally:
        for handle in handles:
            handle.remove()
    for before, after in zip(recomputed, reused):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_layerwise_on_smollm2_matches_the_full_model(smollm2):
    model, tokenizer = smollm2
    blocks = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. " * 3)["input_ids"][:24]])
    reference = _inputs_of_a_full_forward(model, blocks)
    last = None
    for capture in calibration.layerwise(model, blocks):
        if capture.index in (0, 29):
            for name, x in capture.inputs.items():
                torch.testing.assert_close(x, reference[(capture.index, name)], rtol=1e-4, atol=1e-4)
        last = capture.index
    assert last == 29


def test_input_statistics_hold_what_methods_need():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    stats = calibration.InputStatistics.from_inputs(x)
    torch.testing.assert_close(stats.hessian().double(), 2 * x.double().T @ x.double() / 50, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.mean_abs, x.abs().mean(dim=0))
    assert torch.equal(stats.absmax, x.abs().amax(dim=0))
    delta = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    assert stats.output_error(delta) == pytest.approx((x @ delta.T).pow(2).sum().item(), rel=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        calibration.InputStatistics.from_inputs(torch.empty(0, 8))


def test_input_statistics_of_a_model_share_objects_for_shared_inputs(tiny_llama):
    blocks = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    stats = calibration.input_statistics(tiny_llama, blocks)
    assert len(stats) == 2 * 7 and all(s.n_tokens == 24 for s in stats.values())
    layer = "model.layers.1."
    assert stats[layer + "self_attn.q_proj"] is stats[layer + "self_attn.v_proj"]
    assert stats[layer + "mlp.gate_proj"] is stats[layer + "mlp.up_proj"]
    assert stats[layer + "mlp.gate_proj"] is not stats[layer + "self_attn.q_proj"]
    captured = list(calibration.statistics_by_layer(tiny_llama, statistics=stats))
    assert [c[0] for c in captured] == [0, 1] and captured[1][3]["mlp.down_proj"] is stats[layer + "mlp.down_proj"]


def test_statistics_by_layer_needs_exactly_one_source(tiny_llama):
    blocks = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        next(calibration.statistics_by_layer(tiny_llama))
    stats = calibration.input_statistics(tiny_llama, blocks)
    with pytest.raises(ValueError, match="exactly one"):
        next(calibration.statistics_by_layer(tiny_llama, blocks, stats))
    del stats["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="no entry for model.layers.1.mlp.down_proj"):
        next(calibration.statistics_by_layer(tiny_llama, statistics=stats))


def test_first_tokens_can_be_weighted_in_the_hessian():
    x = torch.randn(4 * 16, 8, generator=torch.Generator().manual_seed(0))  # 4 blocks of 16 tokens
    stats = calibration.InputStatistics.from_inputs(x, seq_len=16)
    weights = torch.ones(64)
    weights[::16] = 10.0
    expected = 2 * (x.T * weights) @ x / 64
    torch.testing.assert_close(stats.hessian(10.0), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.hessian(1.0), stats.hessian())
    with pytest.raises(ValueError, match="seq_len 5 must divide"):
        calibration.InputStatistics.from_inputs(x, seq_len=5)
    with pytest.raises(ValueError, match="first_token_weight"):
        stats.hessian(-1.0)


def test_shared_input_sets_group_layers_reading_one_input(tiny_llama):
    capture = next(calibration.layerwise(tiny_llama, torch.zeros(1, 8, dtype=torch.long)))
    sets = calibration.shared_input_sets(calibration.layer_statistics(capture))
    assert sets == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                    ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_statistics_of_two_captures_combine_to_those_of_both(tiny_llama):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (2, 12), generator=g), torch.randint(0, 128, (3, 12), generator=g)
    combined = calibration.combine_statistics(calibration.input_statistics(tiny_llama, a),
                                              calibration.input_statistics(tiny_llama, b))
    both = calibration.input_statistics(tiny_llama, torch.cat([a, b]))
    for name, stats in both.items():
        torch.testing.assert_close(combined[name].gram, stats.gram, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(combined[name].first_gram, stats.first_gram, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(combined[name].mean_abs, stats.mean_abs)
        assert torch.equal(combined[name].absmax, stats.absmax) and combined[name].n_tokens == 60
    assert combined["model.layers.0.self_attn.q_proj"] is combined["model.layers.0.self_attn.v_proj"]
    with pytest.raises(ValueError, match="same model"):
        calibration.combine_statistics()
