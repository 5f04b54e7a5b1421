"""refimpl.decoding.early_exit (CALM): with the exit disabled, greedy decoding equal to generate() and
Hugging Face ``generate``; every exit decision, token and state propagation equal to an independent
reference written here on Hugging Face's own decoder layers without a KV cache (threshold 0 being the
truncated model: first k layers, norm, head); the propagated keys and values equal the skipped
layers' projections of the exit state; the exit layer monotone in the threshold where the cache is
the same; the confidence measures, the decaying threshold and the consistency loss by hand; the
Hoeffding and Hoeffding-Bentkus p-values against their formulas; Learn-then-Test on a synthetic
loss table; calibrate_threshold end to end; validation, with the model never modified; SmolLM2."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import make_decoding_llama, random_prompt
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from refimpl.attention.decoder import Decoder
from refimpl.decoding.early_exit import (EarlyExitResult, ThresholdCalibration, calibrate_threshold,
                                         decaying_threshold, early_exit_generate, hidden_state_saturation,
                                         hoeffding_bentkus_p_value, hoeffding_p_value, learn_then_test,
                                         softmax_response, token_inconsistency)
from refimpl.decoding.generate import generate

N_LAYERS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=None)
def _tiny(seed=0):
    """Shared, never modified."""
    return make_decoding_llama(seed, N_LAYERS)


_ids = random_prompt


# --- an independent reference: Hugging Face layers over stored layer inputs, no KV cache -----------


def _hf_layer(model, j, x):
    """Hugging Face decoder layer ``j`` on the full sequence ``x [1, T, hidden]`` (causal): the last
    position's output is what a cached decode step computes, with keys and values from every row."""
    positions = torch.arange(x.shape[1])[None]
    out = model.model.layers[j](x, position_ids=positions, position_embeddings=model.model.rotary_emb(x, positions))
    return out[0] if isinstance(out, tuple) else out


def _hf_confidence(model, confidence, previous, h):
    if confidence == "softmax_response":
        top2 = model.lm_head(model.model.norm(h)).float().softmax(-1).topk(2).values
        return (top2[..., 0] - top2[..., 1]).item()
    return torch.nn.functional.cosine_similarity(previous.float(), h.float(), dim=-1).item()


@torch.no_grad()
def _reference(model, ids, n_new, lam, confidence="softmax_response", min_layer=1, interval=1, decay=None):
    """CALM written out directly: ``inputs[j]`` holds the input of layer j at every position so far
    (a skipped layer's input is the copied exit state). Returns the sequence, the exit layers, inputs."""
    n_layers = len(model.model.layers)
    t = ids.shape[1]
    if t > 1:
        hidden = model(ids[:, :-1], output_hidden_states=True).hidden_states  # [L + 1] x [1, t - 1, hidden]
        inputs = [hidden[j] for j in range(n_layers)]
    else:
        inputs = [torch.zeros(1, 0, model.config.hidden_size) for _ in range(n_layers)]
    sequence, exits, token = ids, [], ids[:, -1:]
    for step in range(n_new):
        h = model.model.embed_tokens(token)  # [1, 1, hidden]
        inputs[0] = torch.cat([inputs[0], h], dim=1)
        for j in range(n_layers):
            previous, h = h, _hf_layer(model, j, inputs[j])[:, -1:]
            layer = j + 1
            if layer < n_layers:
                inputs[layer] = torch.cat([inputs[layer], h], dim=1)
            if lam is not None and layer < n_layers and layer >= min_layer and (layer - min_layer) % interval == 0:
                threshold = lam[j] if isinstance(lam, (list, tuple)) else lam
                if decay is not None:
                    threshold = threshold * (0.9 + 0.1 * math.exp(-decay * step / n_new))
                if _hf_confidence(model, confidence, previous, h) >= threshold:
                    break
        for j in range(layer + 1, n_layers):  # the copied state is the input of every skipped layer
            inputs[j] = torch.cat([inputs[j], h], dim=1)
        token = model.lm_head(model.model.norm(h))[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        exits.append(layer)
    return sequence, exits, inputs


def _hf_generate(model, ids, max_new_tokens):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                              eos_token_id=None, pad_token_id=0)


# --- exits disabled: the full model ----------------------------------------------------------------


@pytest.mark.parametrize("seed,prompt_len", [(0, 1), (1, 5), (2, 9)])
@pytest.mark.parametrize("disabled", [dict(threshold=None), dict(threshold=0.0, min_layer=N_LAYERS)])
def test_without_exits_equals_generate_and_hugging_face(seed, prompt_len, disabled):
    model, ids = _tiny(seed), _ids(prompt_len, seed)
    result = early_exit_generate(model, ids, 12, **disabled)
    assert isinstance(result, EarlyExitResult)
    assert torch.equal(result.sequences, generate(model, ids, 12))
    assert torch.equal(result.sequences, _hf_generate(model, ids, 12))
    assert result.exit_layers == [N_LAYERS] * 12 and result.mean_layers == N_LAYERS


# --- exits against the reference -------------------------------------------------------------------


@pytest.mark.parametrize("min_layer", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 3])
def test_threshold_zero_is_the_truncated_model_with_state_propagation(seed, min_layer):
    model, ids = _tiny(seed), _ids(6, seed)
    result = early_exit_generate(model, ids, 10, threshold=0.0, min_layer=min_layer)
    sequence, exits, _ = _reference(model, ids, 10, 0.0, min_layer=min_layer)
    assert result.exit_layers == exits == [min_layer] * 10  # softmax response >= 0 always
    assert torch.equal(result.sequences, sequence)


@pytest.mark.parametrize("kwargs", [
    dict(threshold=0.3),
    dict(threshold=0.25, min_layer=2),
    dict(threshold=0.3, layer_interval=2),
    dict(threshold=[0.6, 0.2, 0.05]),
    dict(threshold=0.5, threshold_decay=4.0),
    dict(threshold=[0.7, 0.4, 0.3], threshold_decay=30.0, layer_interval=2),
    dict(threshold=0.8, confidence="hidden_state_saturation"),
    dict(threshold=0.6, confidence="hidden_state_saturation", min_layer=2),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exit_decisions_and_tokens_equal_the_reference(kwargs, seed):
    model, ids = _tiny(seed), _ids(5, seed)
    result = early_exit_generate(model, ids, 12, **kwargs)
    sequence, exits, _ = _reference(model, ids, 12, kwargs["threshold"], kwargs.get("confidence", "softmax_response"),
                                    kwargs.get("min_layer", 1), kwargs.get("layer_interval", 1),
                                    kwargs.get("threshold_decay"))
    assert result.exit_layers == exits
    assert torch.equal(result.sequences, sequence)


def test_the_reference_cases_exit_at_several_depths():
    """The cases above must exercise exits at different layers, or they could not catch a wrong one."""
    seen = set()
    for seed in range(3):
        seen |= set(early_exit_generate(_tiny(seed), _ids(5, seed), 12, threshold=0.3).exit_layers)
    assert len(seen) >= 3


def test_propagated_keys_and_values_are_the_skipped_layers_projections_of_the_exit_state():
    model, ids, k = _tiny(1), _ids(4, 1), 2
    result = early_exit_generate(model, ids, 8, threshold=0.0, min_layer=k)
    _, _, inputs = _reference(model, ids, 8, 0.0, min_layer=k)
    n_written = ids.shape[1] + 8 - 1  # the last generated token is never fed
    assert result.cache.length == n_written
    positions = torch.arange(n_written)[None]
    for j in range(N_LAYERS):
        x = inputs[j]  # [1, T, hidden]: for j > k, the exit state d^k at every generated position
        attn, layer = model.model.layers[j].self_attn, model.model.layers[j]
        with torch.no_grad():
            u = layer.input_layernorm(x)
            keys = attn.k_proj(u).view(1, n_written, -1, attn.head_dim).transpose(1, 2)  # [1, kv, T, d]
            values = attn.v_proj(u).view(1, n_written, -1, attn.head_dim).transpose(1, 2)
            cos, sin = model.model.rotary_emb(x, positions)
            _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        # Float32 noise from two implementations of the layers (keys and values of size ~10 here); a wrong
        # propagation (a deeper state, no state, a missing RoPE) is off by O(1).
        torch.testing.assert_close(result.cache[j].k_cache[:, :, :n_written], keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result.cache[j].v_cache[:, :, :n_written], values, rtol=1e-4, atol=1e-4)
    generated = slice(ids.shape[1] - 1, n_written)  # positions decided by an exit
    assert torch.equal(inputs[k + 1][:, generated], inputs[k][:, generated])  # the copy the test relies on


# --- monotonicity ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 3), prompt_len=st.integers(1, 8), high=st.floats(0, 1), low_fraction=st.floats(0, 1),
       confidence=st.sampled_from(["softmax_response", "hidden_state_saturation"]))
def test_the_first_tokens_exit_layer_is_monotone_in_the_threshold(seed, prompt_len, high, low_fraction, confidence):
    """The first token's cache (the prefilled prompt) does not depend on the threshold, so its exit
    layer, the first tested layer with c >= lambda, cannot rise as lambda falls. (Over a whole sequence
    this need not hold: an earlier exit changes the cache and the text that later tokens see.)"""
    model, ids = _tiny(seed), _ids(prompt_len, seed)
    exit_at = [early_exit_generate(model, ids, 1, threshold=lam, confidence=confidence).exit_layers[0]
               for lam in (high, high * low_fraction)]
    assert exit_at[1] <= exit_at[0]


@pytest.mark.parametrize("seed", range(4))
def test_lower_thresholds_use_fewer_layers_on_a_coarse_grid(seed):
    """Over whole sequences, lambda 1 > 0.5 > 0 use fewer and fewer layers per token on average, down to
    the minimum. On a fine grid this is a tendency, not a law: here seed 1 (lambda 0.8 -> 0.7) and seed 3
    (0.2 -> 0.1) use slightly more layers at the lower threshold, because different earlier exits
    change the cache and the text."""
    model, ids = _tiny(seed), _ids(6, seed)
    means = [early_exit_generate(model, ids, 20, threshold=lam).mean_layers for lam in (1.0, 0.5, 0.0)]
    assert means[0] > means[1] > means[2] == 1


# --- primitives ------------------------------------------------------------------------------------


def test_softmax_response_is_the_top_two_probability_gap():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    torch.testing.assert_close(softmax_response(probs.log()), torch.tensor([0.3, 0.25]))
    assert softmax_response(torch.tensor([0.0, 0.0])).item() == 0.0


def test_hidden_state_saturation_is_the_cosine_similarity():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(hidden_state_saturation(a, torch.tensor([[2.0, 0.0], [-1.0, 1.0]])),
                               torch.tensor([1.0, 0.0]))


def test_decaying_threshold_starts_at_lambda_and_decays():
    assert decaying_threshold(0.8, 0, 10) == pytest.approx(0.8)
    assert decaying_threshold(0.8, 10, 10, temperature=4.0) == pytest.approx(0.8 * (0.9 + 0.1 * math.exp(-4)))
    assert decaying_threshold(0.0, 5, 10) == 0.0
    values = [decaying_threshold(0.5, t, 10) for t in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_the_decaying_threshold_is_taken_at_each_tokens_index(monkeypatch):
    """Token t (0-based) of N = max_new_tokens is tested against lambda(t), at every tested layer."""
    from refimpl.decoding import early_exit

    calls = []

    def recording(threshold, t, max_new_tokens, temperature=4.0):
        calls.append((threshold, t, max_new_tokens, temperature))
        return decaying_threshold(threshold, t, max_new_tokens, temperature)

    monkeypatch.setattr(early_exit, "decaying_threshold", recording)
    result = early_exit_generate(_tiny(0), _ids(3), 5, threshold=[0.9, 0.8, 0.7], threshold_decay=2.0)
    expected = [(lam, t, 5, 2.0) for t, layers in enumerate(result.exit_layers)
                for lam in [0.9, 0.8, 0.7][:min(layers, N_LAYERS - 1)]]
    assert calls == expected


def test_token_inconsistency_counts_differing_and_missing_positions():
    assert token_inconsistency(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 9, 4])) == 0.25
    assert token_inconsistency(torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4])) == 0.5
    assert token_inconsistency(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 0.0


# --- p-values and Learn-then-Test --------------------------------------------------------------------


@pytest.mark.parametrize("risk,n,delta", [(0.0, 10, 0.2), (0.05, 100, 0.1), (0.1, 1000, 0.12), (0.3, 50, 0.2)])
def test_hoeffding_p_value_is_the_formula(risk, n, delta):
    expected = math.exp(-2 * n * (delta - risk) ** 2) if risk < delta else 1.0
    assert hoeffding_p_value(risk, n, delta) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("risk,n,delta", [(0.0, 10, 0.2), (0.05, 40, 0.1), (0.1, 30, 0.3), (0.3, 20, 0.2)])
def test_hoeffding_bentkus_p_value_is_the_formula(risk, n, delta):
    a = min(risk, delta)
    kl = (a * math.log(a / delta) if a else 0.0) + (1 - a) * math.log((1 - a) / (1 - delta))
    binomial = sum(math.comb(n, i) * delta ** i * (1 - delta) ** (n - i) for i in range(math.ceil(n * risk) + 1))
    expected = min(1.0, math.exp(-n * kl), math.e * binomial)
    assert hoeffding_bentkus_p_value(risk, n, delta) == pytest.approx(expected, rel=1e-9)
    assert hoeffding_bentkus_p_value(risk, n, delta) <= hoeffding_p_value(risk, n, delta) + 1e-12


def _table(risks, n=1000):
    """Losses [k, n] of 0/1 values whose means are exactly ``risks``."""
    rows = []
    for r in risks:
        ones = round(r * n)
        rows.append(torch.cat([torch.ones(ones), torch.zeros(n - ones)]))
    return torch.stack(rows).double()


def test_learn_then_test_stops_at_the_first_uncertified_threshold():
    # delta 0.1, n 1000: Hoeffding p = exp(-2000 (0.1 - R)^2) -> R = 0: e^-20, 0.01: e^-16.2, 0.05: e^-5 = 0.0067
    # (all <= 0.05), R = 0.2: p = 1, which ends the sequence; the low risk at 0.1 is never tested.
    grid = [0.9, 0.7, 0.5, 0.3, 0.1]
    result = learn_then_test(_table([0.0, 0.01, 0.05, 0.2, 0.05]), grid, delta=0.1, epsilon=0.05, p_value="hoeffding")
    assert isinstance(result, ThresholdCalibration)
    assert result.threshold == 0.5
    assert result.risks == pytest.approx([0.0, 0.01, 0.05, 0.2, 0.05])
    assert result.p_values == pytest.approx([math.exp(-20), math.exp(-16.2), math.exp(-5), 1.0, math.exp(-5)])
    # epsilon below e^-5: the third is not certified either.
    assert learn_then_test(_table([0.0, 0.01, 0.05, 0.2, 0.05]), grid, 0.1, 0.005, "hoeffding").threshold == 0.7
    # nothing certified: run the full model.
    assert learn_then_test(_table([0.5, 0.0]), [0.9, 0.1], 0.1, 0.05).threshold is None


def test_hoeffding_bentkus_certifies_what_hoeffding_cannot():
    # n = 100, R = 0, delta = 0.05: Hoeffding e^-0.5 = 0.61; Bentkus e * 0.95^100 = 0.016.
    table = _table([0.0], n=100)
    assert learn_then_test(table, [0.5], 0.05, 0.05, "hoeffding").threshold is None
    assert learn_then_test(table, [0.5], 0.05, 0.05, "hoeffding_bentkus").threshold == 0.5


def test_calibrate_threshold_measures_consistency_and_tests_it():
    model = _tiny(2)
    prompts = [_ids(4, s) for s in range(4)]
    grid = (1.0, 0.5, 0.0)
    result = calibrate_threshold(model, prompts, 6, delta=0.9, epsilon=0.5, thresholds=grid, p_value="hoeffding")
    for j, lam in enumerate(grid):
        losses = [token_inconsistency(early_exit_generate(model, p, 6, threshold=lam).sequences[0, 4:],
                                      generate(model, p, 6)[0, 4:]) for p in prompts]
        assert result.risks[j] == pytest.approx(sum(losses) / len(losses))
    assert result.n == 4 and result.risks[0] == 0.0 and result.risks[-1] > 0
    assert result.threshold == learn_then_test(_table(result.risks, 4), grid, 0.9, 0.5, "hoeffding").threshold
    assert result.threshold is not None  # R = 0 at lambda = 1 gives p = exp(-8 * 0.81) < 0.5


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=1.5), "threshold"), (dict(threshold=-0.1), "threshold"),
    (dict(threshold=float("nan")), "threshold"), (dict(threshold=True), "threshold"),
    (dict(threshold="high"), "threshold"), (dict(threshold=[0.5, 0.5]), "threshold"),
    (dict(threshold=[0.5, 2.0, 0.5]), "threshold"), (dict(min_layer=0), "min_layer"),
    (dict(min_layer=N_LAYERS + 1), "min_layer"), (dict(layer_interval=0), "layer_interval"),
    (dict(confidence="entropy"), "confidence"), (dict(threshold_decay=-1.0), "threshold_decay"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(input_ids=torch.tensor([[1, 128]])), "input_ids"),
    (dict(input_ids=torch.tensor([[1, -1]])), "input_ids"),
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.long)), "input_ids"),
])
def test_early_exit_generate_rejects_bad_arguments(kwargs, match):
    arguments = dict(input_ids=_ids(3), max_new_tokens=4, threshold=0.5)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        early_exit_generate(_tiny(0), **arguments)


def test_early_exit_generate_type_errors():
    with pytest.raises(TypeError, match="input_ids"):
        early_exit_generate(_tiny(0), torch.ones(1, 3), 4)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        early_exit_generate(torch.nn.Linear(2, 2), _ids(3), 4)
    with pytest.raises(TypeError, match="early"):
        token_inconsistency([1, 2], torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="losses"):
        learn_then_test(torch.zeros(1, 3, dtype=torch.long), [0.5], 0.1, 0.1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(delta=0.0), "delta"), (dict(delta=1.0), "delta"), (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=1.5), "epsilon"), (dict(prompts=[]), "prompts"), (dict(prompts=_ids(3)), "prompts"),
    (dict(thresholds=[0.5, 0.7]), "thresholds"), (dict(thresholds=[1.2]), "thresholds"),
    (dict(thresholds=[]), "thresholds"), (dict(p_value="bonferroni"), "p_value"), (dict(min_layer=0), "min_layer"),
    (dict(prompts=[_ids(3), torch.tensor([[5, 200]])]), r"prompts\[1\] must hold token ids in \[0, 128\)"),
    (dict(prompts=[torch.zeros(2, 3, dtype=torch.long)]), r"prompts\[0\] must hold one sequence"),
])
def test_calibrate_threshold_rejects_bad_arguments(kwargs, match):
    arguments = dict(prompts=[_ids(3)], max_new_tokens=2, delta=0.1, epsilon=0.1, thresholds=[1.0, 0.5])
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_threshold(_tiny(0), **arguments)


@pytest.mark.parametrize("call,match", [
    (lambda: learn_then_test(_table([0.1]), [0.5], 0.0, 0.1), "delta"),
    (lambda: learn_then_test(_table([0.1]), [0.5], 0.1, 1.0), "epsilon"),
    (lambda: learn_then_test(_table([0.1, 0.2]), [0.5], 0.1, 0.1), "losses"),
    (lambda: learn_then_test(torch.full((1, 3), 1.5), [0.5], 0.1, 0.1), "losses"),
    (lambda: learn_then_test(torch.zeros(1, 0), [0.5], 0.1, 0.1), "losses"),
    (lambda: learn_then_test(_table([0.1, 0.1]), [0.5, 0.5], 0.1, 0.1), "thresholds"),
    (lambda: hoeffding_p_value(0.1, 0, 0.1), "n"),
    (lambda: hoeffding_bentkus_p_value(1.1, 10, 0.1), "risk"),
    (lambda: decaying_threshold(0.5, 0, 0), "max_new_tokens"),
    (lambda: decaying_threshold(0.5, 0, 10, temperature=0), "temperature"),
])
def test_calibration_primitives_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_model_is_never_modified():
    model = _tiny(0)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    early_exit_generate(model, _ids(4), 6, threshold=0.3)
    early_exit_generate(Decoder.from_hf(model), _ids(4), 6, threshold=0.3, confidence="hidden_state_saturation")
    with pytest.raises(ValueError):
        early_exit_generate(model, _ids(4), 6, threshold=2.0)
    calibrate_threshold(model, [_ids(3)], 3, 0.5, 0.5, thresholds=[1.0, 0.0])
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_stop_tokens_and_zero_new_tokens():
    model, ids = _tiny(0), _ids(4)
    assert torch.equal(early_exit_generate(model, ids, 0).sequences, ids)
    full = early_exit_generate(model, ids, 10, threshold=0.3)
    stop = int(full.sequences[0, 6])
    stopped = early_exit_generate(model, ids, 10, threshold=0.3, stop_tokens=[stop])
    first = next(i for i, t in enumerate(full.sequences[0, 4:].tolist()) if t == stop)
    assert torch.equal(stopped.sequences, full.sequences[:, :4 + first + 1])
    assert stopped.exit_layers == full.exit_layers[:first + 1]


# --- the real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_without_exits_equals_generate(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    result = early_exit_generate(model, ids, 8, threshold=None)
    assert torch.equal(result.sequences, generate(model, ids, 8))
