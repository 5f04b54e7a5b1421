"""refimpl.decoding: the sampling rules against Hugging Face's logits warpers; generate() against
Hugging Face ``generate`` (greedy, stop tokens and padding, seeded sampling drawn from the rule's
distribution); speculative sampling's exactness on a toy vocabulary, by enumerating verify()'s
decisions and by a chi-square test of its draws; greedy speculative decoding reproducing greedy
decoding for every kind of draft with the number of target calls predicted from teacher-forced
agreements; rejected proposals never left in the target's or the draft's KV cache; the acceptance
arithmetic; prompt lookup; Decoder(layers=...) against a depth-pruned Hugging Face model;
validation; the same on SmolLM2."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from tiny import make_tiny_llama

from refimpl.attention.decoder import Decoder
from refimpl.decoding.generate import Sampling, generate, make_generator
from refimpl.decoding.speculative import (Draft, ModelDraft, PromptLookupDraft, SpeculativeResult, acceptance_rate,
                                          expected_speedup, expected_tokens_per_call, greedy_rounds,
                                          greedy_target_calls,
                                          speculative_generate, verify)

# Chi-square critical values at p = 0.001 by degrees of freedom (no scipy here).
CHI2_CRITICAL_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=None)
def _tiny(seed=0, **overrides):
    """A tiny random Llama whose greedy output does not collapse onto one token (initializer range
    0.5 unless overridden). Building one takes a sizeable fraction of a second, so each is built once
    and shared: tests must not modify it (they modify deep copies)."""
    return make_tiny_llama(seed, **{"initializer_range": 0.5, **overrides})


def _ids(batch, length, seed=0, vocab=128):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_generate(model, ids, max_new_tokens, **kwargs):
    """Hugging Face greedy generation; no stop token unless ``eos_token_id`` is given."""
    kwargs.setdefault("eos_token_id", None)
    kwargs.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new_tokens, **kwargs)


@functools.lru_cache(maxsize=None)
def _noisy_copy(model, scale, seed):
    """A copy of ``model`` with Gaussian noise of std ``scale`` on every weight: a draft that agrees
    with the target often, but not always."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return noisy


def _prefilled(decoder, ids):
    """A fresh cache of ``decoder`` holding ``ids [1, t]``, written in one pass."""
    cache = decoder.new_cache(ids.shape[0], max(ids.shape[1], 1))
    if ids.shape[1]:
        with torch.no_grad():
            decoder(ids, cache)
    return cache


def _assert_cache_holds(cache, decoder, ids):
    """``cache`` holds exactly the keys and values of ``ids [1, t]`` (those of a fresh prefill)."""
    t = ids.shape[1]
    assert cache.length == t
    assert len(cache) == len(decoder.layers)
    fresh = _prefilled(decoder, ids)
    for layer, expected in zip(cache, fresh):
        assert layer.slot_positions[:t].tolist() == list(range(t))
        assert (layer.slot_positions[t:] == -1).all()  # nothing beyond the accepted text is visible
        # chunked and one-pass attention sum in different orders; a leaked or stale position is off by O(1)
        torch.testing.assert_close(layer.k_cache[:, :, :t], expected.k_cache[:, :, :t], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(layer.v_cache[:, :, :t], expected.v_cache[:, :, :t], atol=2e-4, rtol=1e-4)


def _chi_square(counts, probs):
    """Pearson's statistic of ``counts [V]`` against ``probs [V]``, and its degrees of freedom; a
    category of probability 0 must never occur."""
    counts, probs = counts.double(), probs.double()
    assert counts[probs == 0].sum() == 0, f"impossible tokens drawn: {counts.tolist()} vs {probs.tolist()}"
    n, support = counts.sum(), probs > 0
    expected = n * probs[support]
    assert expected.min() >= 5, "too few draws for a chi-square test"
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def _assert_distributed_as(counts, probs):
    statistic, df = _chi_square(counts, probs)
    assert statistic < CHI2_CRITICAL_0001[df], (statistic, df, counts.tolist(), probs.tolist())


def _teacher_forced_argmax(model_or_decoder, sequences, prompt_len):
    """The greedy prediction of each new token of ``sequences [1, t]`` from the true prefix, in one pass."""
    decoder = model_or_decoder if isinstance(model_or_decoder, Decoder) else Decoder.from_hf(model_or_decoder)
    with torch.no_grad():
        return decoder(sequences)[0, prompt_len - 1:-1].argmax(-1)


# --- Sampling ---------------------------------------------------------------------------------------


def _hf_probabilities(logits, temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, None), (0.7, None, None), (2.5, None, None),
    (1.0, 10, None), (0.5, 1, None), (1.3, 200, None),  # top-k only (1: greedy-like; 200 > vocab: all)
    (1.0, None, 0.9), (0.8, None, 0.5), (1.7, None, 0.05), (1.0, None, 1.0),  # top-p only
    (1.0, 20, 0.8), (0.6, 50, 0.95), (2.0, 5, 0.3),  # both
])
def test_probabilities_equal_hugging_faces_warpers(temperature, top_k, top_p):
    logits = 3 * torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    probs = Sampling(temperature, top_k, top_p).probabilities(logits)
    expected = _hf_probabilities(logits, temperature, top_k, top_p)
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    assert torch.equal(probs > 0, expected > 0)  # the same tokens kept
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4), atol=1e-6, rtol=0)
    if top_k is not None and top_k < 128:
        assert ((probs > 0).sum(-1) <= top_k).all()


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    torch.testing.assert_close(Sampling(1.0, top_p=0.7).probabilities(logits), torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(Sampling(1.0, top_p=0.85).probabilities(logits),
                               torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    torch.testing.assert_close(Sampling(1.0, top_p=0.4).probabilities(logits), torch.tensor([1.0, 0, 0, 0]))
    # exactly at the boundary (uniform probabilities are exact): the nucleus stops as soon as it reaches p
    uniform = Sampling(1.0, top_p=0.5).probabilities(torch.zeros(3, 4))
    assert ((uniform > 0).sum(-1) == 2).all() and torch.equal(uniform.sum(-1), torch.ones(3))
    assert torch.equal(uniform.max(-1).values, torch.full((3,), 0.5))
    # top-k first, then the nucleus of the renormalised top-k distribution: 0.5/0.8 = 0.625 >= 0.6
    torch.testing.assert_close(Sampling(1.0, top_k=2, top_p=0.6).probabilities(logits), torch.tensor([1.0, 0, 0, 0]))


def test_greedy_is_the_one_hot_argmax_and_draws_nothing():
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1))
    logits[0, 0, 7] = logits[0, 0, 9] = logits[0, 0].max() + 1  # a tie: the first one wins, as argmax
    greedy = Sampling()
    assert greedy.greedy and not Sampling(0.1).greedy
    probs = greedy.probabilities(logits.double())
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 40).float())
    assert probs[0, 0, 7] == 1 and probs[0, 0, 9] == 0
    generator = make_generator(3)
    state = generator.get_state()
    assert torch.equal(greedy.sample(probs, generator), logits.argmax(-1))
    assert torch.equal(generator.get_state(), state)


def test_sample_draws_from_the_distribution_and_is_seeded():
    probs = torch.tensor([0.1, 0.0, 0.4, 0.2, 0.3, 0.0])
    rule = Sampling(1.0)
    draws = rule.sample(probs.expand(20000, 6), make_generator(5))
    assert draws.shape == (20000,)
    _assert_distributed_as(torch.bincount(draws, minlength=6), probs)
    assert torch.equal(rule.sample(probs.expand(50, 6), make_generator(5)), draws[:50])
    assert not torch.equal(rule.sample(probs.expand(50, 6), make_generator(6)), draws[:50])


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=True), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(temperature=1.0, top_k=0), "top_k"), (dict(temperature=1.0, top_k=2.0), "top_k"),
    (dict(temperature=1.0, top_k=True), "top_k"),
    (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_p=-0.2), "top_p"), (dict(temperature=1.0, top_p=float("nan")), "top_p"),
])
def test_invalid_sampling_parameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_probabilities_reject_non_float_logits():
    with pytest.raises(TypeError, match="logits"):
        Sampling(1.0).probabilities(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="logits"):
        Sampling().probabilities(torch.tensor(1.0))


# --- generate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, prompt_len, max_new_tokens", [(0, 6, 1), (1, 5, 7), (2, 9, 20), (3, 1, 13)])
def test_greedy_generate_equals_hugging_face(seed, prompt_len, max_new_tokens):
    model = _tiny(seed)
    ids = _ids(2, prompt_len, seed)
    out = generate(model, ids, max_new_tokens)
    expected = _hf_generate(model, ids, max_new_tokens)
    assert out.shape == (2, prompt_len + max_new_tokens)
    assert torch.equal(out, expected)
    assert torch.equal(generate(Decoder.from_hf(model), ids, max_new_tokens), out)  # a Decoder works as well
    assert len(set(out[0, prompt_len:].tolist())) > min(3, max_new_tokens - 1)  # not one repeated token


def test_zero_new_tokens_returns_the_prompt():
    ids = _ids(2, 5)
    assert torch.equal(generate(_tiny(), ids, 0), ids)


def _greedy_continuations(model, ids, n):
    out = generate(model, ids, n)
    return [row[ids.shape[1]:].tolist() for row in out]


def test_stop_token_pads_a_finished_sequence_while_the_other_continues():
    model, ids, n = _tiny(4), _ids(2, 6, 4), 24
    first, second = _greedy_continuations(model, ids, n)
    # a token of the first continuation (not at its start or end) that the second never produces
    k, stop = next((k, t) for k, t in enumerate(first) if 2 <= k < n - 4 and t not in first[:k] and t not in second)
    pad = next(t for t in range(128) if t != stop)
    out = generate(model, ids, n, stop_tokens=[stop], pad_token_id=pad)
    assert out[0, 6:].tolist() == first[:k + 1] + [pad] * (n - k - 1)
    assert out[1, 6:].tolist() == second
    assert torch.equal(out, _hf_generate(model, ids, n, eos_token_id=stop, pad_token_id=pad))
    # the pad token defaults to the smallest stop token
    never = next(t for t in range(128) if t not in first and t not in second)
    default = generate(model, ids, n, stop_tokens=[stop, never])
    assert default[0, 6 + k + 1:].tolist() == [min(stop, never)] * (n - k - 1)
    assert torch.equal(default[1], out[1])


def test_generation_ends_when_every_sequence_has_stopped():
    model, ids, n = _tiny(5), _ids(2, 4, 5), 30
    first, second = _greedy_continuations(model, ids, n)
    k0, t0 = next((k, t) for k, t in enumerate(first) if k >= 2 and t not in first[:k] and t not in second)
    k1, t1 = next((k, t) for k, t in enumerate(second) if k > k0 + 1 and t not in second[:k] and t not in first[:k0 + 1])
    out = generate(model, ids, n, stop_tokens={t0, t1}, pad_token_id=3)
    assert out.shape == (2, 4 + k1 + 1)  # ends with the last sequence's stop token
    assert out[0, 4:].tolist() == first[:k0 + 1] + [3] * (k1 - k0)
    assert out[1, 4:].tolist() == second[:k1 + 1]
    assert torch.equal(out, _hf_generate(model, ids, n, eos_token_id=[t0, t1], pad_token_id=3))


def test_sampled_generation_is_reproducible_and_seeded():
    model, ids = _tiny(6), _ids(2, 5, 6)
    rule = Sampling(temperature=1.5, top_k=20)
    a = generate(model, ids, 16, rule, seed=11)
    assert torch.equal(generate(model, ids, 16, rule, seed=11), a)
    assert not torch.equal(generate(model, ids, 16, rule, seed=12), a)
    assert not torch.equal(a, generate(model, ids, 16))  # not greedy


def test_sampled_first_token_follows_the_rules_distribution():
    model, n = _tiny(7), 6000
    prompt = _ids(1, 5, 7)
    rule = Sampling(temperature=2.0, top_k=5)
    with torch.no_grad():
        probs = rule.probabilities(Decoder.from_hf(model)(prompt)[0, -1])
    assert (probs > 0).sum() == 5 and probs[probs > 0].min() > 0.01
    out = generate(model, prompt.expand(n, 5), 1, rule, seed=1)
    _assert_distributed_as(torch.bincount(out[:, -1], minlength=128), probs)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: generate(m, _ids(2, 4).float(), 3), TypeError, "input_ids"),
    (lambda m: generate(m, _ids(2, 4).int(), 3), TypeError, "input_ids"),
    (lambda m: generate(m, _ids(1, 4)[0], 3), ValueError, "input_ids"),
    (lambda m: generate(m, _ids(2, 4)[None], 3), ValueError, "input_ids"),
    (lambda m: generate(m, _ids(2, 0), 3), ValueError, "input_ids"),
    (lambda m: generate(m, [[1, 2, 3]], 3), TypeError, "input_ids"),
    (lambda m: generate(m, _ids(2, 4), -1), ValueError, "max_new_tokens"),
    (lambda m: generate(m, _ids(2, 4), 2.0), ValueError, "max_new_tokens"),
    (lambda m: generate(m, _ids(2, 4), 3, sampling=0.7), TypeError, "sampling"),
    (lambda m: generate(m, _ids(2, 4), 3, sampling={"temperature": 1.0}), TypeError, "sampling"),
    (lambda m: generate(m, _ids(2, 4), 3, stop_tokens=2), TypeError, "stop_tokens"),
    (lambda m: generate(m, _ids(2, 4), 3, stop_tokens=[-1]), ValueError, "stop_tokens"),
    (lambda m: generate(m, _ids(2, 4), 3, pad_token_id=-1), ValueError, "pad_token_id"),
    (lambda m: generate(m, _ids(2, 4), 3, pad_token_id=500), ValueError, "pad_token_id must be token ids below"),
    (lambda m: generate(m, _ids(2, 4), 3, stop_tokens=[128]), ValueError, "stop_tokens must be token ids below"),
    (lambda m: generate(m, _ids(2, 4), 3, seed=-1), ValueError, "seed"),
])
def test_generate_rejects_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(_tiny())


# --- speculative sampling is exact: a toy vocabulary --------------------------------------------------

TOY_CASES = {
    # p [2, V] (the target at the proposal and after it), q [1, V] (the draft at the proposal)
    "overlapping": (torch.tensor([[0.10, 0.20, 0.30, 0.25, 0.15], [0.05, 0.40, 0.15, 0.10, 0.30]]),
                    torch.tensor([[0.30, 0.10, 0.10, 0.20, 0.30]])),
    "disjoint mass": (torch.tensor([[0.40, 0.00, 0.35, 0.25, 0.00], [0.20, 0.20, 0.20, 0.20, 0.20]]),
                      torch.tensor([[0.10, 0.50, 0.00, 0.20, 0.20]])),  # q on 1, 4 where p = 0; p on 2 where q = 0
}


def _residual(p, q):
    r = (p - q).clamp(min=0)
    return r / r.sum()


@pytest.mark.parametrize("case", list(TOY_CASES))
def test_verify_emits_the_targets_distribution_by_enumeration(case, monkeypatch):
    """Every decision of verify() for one proposal, with the uniform draw fixed: the acceptance
    threshold of each proposal x (found by bisection on u, checking that acceptance is u < threshold)
    and the distribution it resamples from after a rejection. Summing over x ~ q gives the exact
    probability of each first token, which must be p[0] (Leviathan et al. Theorem 3.5)."""
    p, q = (t.double() / t.double().sum(-1, keepdim=True) for t in TOY_CASES[case])  # sums exactly 1
    rule = Sampling(1.0)
    u_value, resampled_from = [0.0], []

    def fake_rand(*args, **kwargs):
        return torch.tensor(u_value[0], dtype=torch.float64)

    def fake_multinomial(probs, num_samples, generator=None):
        resampled_from.append(probs.reshape(-1).clone())
        return torch.zeros(probs.shape[:-1] + (num_samples,), dtype=torch.long)

    monkeypatch.setattr(torch, "rand", fake_rand)
    monkeypatch.setattr(torch, "multinomial", fake_multinomial)

    def accepted(x, u):
        u_value[0] = u
        n_accepted, _ = verify(torch.tensor([x]), q, p, rule)
        return n_accepted == 1

    emitted = torch.zeros(5, dtype=torch.float64)
    for x in range(5):
        if q[0, x] == 0:
            continue  # never proposed
        low, high = 0.0, 1.0  # accepted below the threshold, rejected at and above it
        if accepted(x, 1 - 1e-12):
            threshold = 1.0
        elif not accepted(x, 0.0):
            threshold = 0.0
        else:
            for _ in range(50):
                mid = (low + high) / 2
                low, high = (mid, high) if accepted(x, mid) else (low, mid)
            threshold = high
            assert not accepted(x, threshold + 1e-9) and accepted(x, threshold - 1e-9)
        assert threshold == pytest.approx(min(1.0, float(p[0, x] / q[0, x])), abs=1e-9)
        if threshold < 1:
            resampled_from.clear()
            accepted(x, threshold + 1e-6)
            (residual,) = resampled_from
            torch.testing.assert_close(residual.double(), _residual(p[0], q[0]))
            emitted += q[0, x] * (1 - threshold) * residual.double()
        emitted[x] += q[0, x] * threshold
        # an accepted proposal is followed by the bonus token drawn from p[1]
        resampled_from.clear()
        if threshold > 0:
            accepted(x, 0.0)
            torch.testing.assert_close(resampled_from[-1].double(), p[1])
    torch.testing.assert_close(emitted, p[0], atol=1e-9, rtol=0)
    # and the closed form: P(emit v) = q(v) min(1, p(v)/q(v)) + (1 - beta) residual(v)
    beta = acceptance_rate(p[0], q[0]).double()
    closed = torch.minimum(q[0], p[0]) + (1 - beta) * _residual(p[0], q[0])
    torch.testing.assert_close(closed, p[0], atol=1e-7, rtol=0)


@pytest.mark.parametrize("case, n", [("overlapping", 12000), ("disjoint mass", 8000)])
def test_verify_samples_the_targets_distribution(case, n):
    """Draw x ~ q and verify it n times with one seeded generator: the first emitted token (x if
    accepted, else the resampled token) is distributed as p[0], the acceptance rate is
    beta = sum(min(p, q)), and the bonus token after an acceptance is distributed as p[1]."""
    p, q = TOY_CASES[case]
    rule, generator = Sampling(1.0), make_generator(1234)
    first, bonus = torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    n_accepted = 0
    proposals = torch.multinomial(q[0], n, replacement=True, generator=generator).split(1)  # x ~ q, n times
    for x in proposals:
        accepted, next_token = verify(x, q, p, rule, generator)
        assert accepted in (0, 1) and 0 <= next_token < 5
        if accepted:
            n_accepted += 1
            first[x] += 1
            bonus[next_token] += 1
        else:
            first[next_token] += 1
    _assert_distributed_as(first, p[0])
    _assert_distributed_as(bonus, p[1])
    beta = float(acceptance_rate(p[0], q[0]))
    assert beta == pytest.approx(float(torch.minimum(p[0], q[0]).sum()))
    assert abs(n_accepted / n - beta) < 4.5 * math.sqrt(beta * (1 - beta) / n)


def test_verify_greedy_keeps_the_agreeing_prefix():
    V = 6
    target_argmax = torch.tensor([2, 4, 1, 5])  # p at the 3 proposals and after them
    p = torch.nn.functional.one_hot(target_argmax, V).float()
    for proposals, expected in [([2, 4, 1], (3, 5)), ([2, 4, 0], (2, 1)), ([3, 4, 1], (0, 2)), ([2, 0, 1], (1, 4))]:
        draft = torch.tensor(proposals)
        q = torch.nn.functional.one_hot(draft, V).float()
        assert verify(draft, q, p, Sampling()) == expected
    assert verify(torch.tensor([], dtype=torch.long), torch.zeros(0, V), p[:1], Sampling()) == (0, 2)


@pytest.mark.parametrize("args, error, match", [
    ((torch.tensor([1.0]), torch.rand(1, 5), torch.rand(2, 5)), TypeError, "draft_tokens"),
    ((torch.tensor([[1]]), torch.rand(1, 5), torch.rand(2, 5)), TypeError, "draft_tokens"),
    ((torch.tensor([1, 2]), torch.rand(1, 5), torch.rand(3, 5)), ValueError, "q must"),
    ((torch.tensor([1]), torch.rand(5), torch.rand(2, 5)), ValueError, "q must"),
    ((torch.tensor([1]), torch.rand(1, 5), torch.rand(1, 5)), ValueError, "p must"),
    ((torch.tensor([1]), torch.rand(1, 5), torch.rand(2, 6)), ValueError, "p must"),
])
def test_verify_rejects_bad_shapes(args, error, match):
    with pytest.raises(error, match=match):
        verify(*args, Sampling(1.0))


# --- acceptance arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0, 1, 3, 7])
def test_expected_tokens_per_call(gamma):
    assert expected_tokens_per_call(0.0, gamma) == 1
    assert expected_tokens_per_call(1.0, gamma) == gamma + 1
    for alpha in (0.3, 0.8, 0.999):
        assert expected_tokens_per_call(alpha, gamma) == pytest.approx(sum(alpha ** i for i in range(gamma + 1)))
    assert expected_tokens_per_call(0.6, 3) == pytest.approx(1 + 0.6 + 0.36 + 0.216)


def test_expected_speedup_is_theorem_3_8():
    alpha, gamma, c = 0.8, 4, 0.05
    assert expected_speedup(alpha, gamma, c) == pytest.approx((1 - alpha ** 5) / ((1 - alpha) * (gamma * c + 1)))
    assert expected_speedup(alpha, gamma, c, verify_ratio=1.5) == pytest.approx(
        (1 - alpha ** 5) / ((1 - alpha) * (gamma * c + 1.5)))
    assert expected_speedup(0.0, 3, 0.1) == pytest.approx(1 / 1.3)  # nothing accepted: a loss
    assert expected_speedup(1.0, 3, 0.0) == 4.0  # a free perfect draft
    assert expected_speedup(0.9, 2, 0.0) > expected_speedup(0.9, 2, 0.2)


@pytest.mark.parametrize("call, match", [
    (lambda: expected_tokens_per_call(-0.1, 3), "alpha"), (lambda: expected_tokens_per_call(1.01, 3), "alpha"),
    (lambda: expected_tokens_per_call(True, 3), "alpha"), (lambda: expected_tokens_per_call(0.5, -1), "gamma"),
    (lambda: expected_speedup(0.5, 3, -0.1), "cost_ratio"), (lambda: expected_speedup(0.5, 3, 0.1, -1), "verify_ratio"),
    (lambda: expected_speedup(2.0, 3, 0.1), "alpha"),
    (lambda: greedy_target_calls(torch.ones(4, dtype=torch.bool), 0), "gamma"),
    (lambda: acceptance_rate(torch.rand(2, 5), torch.rand(3, 5)), "same shape"),
    (lambda: speculative_generate(_tiny(), PromptLookupDraft(128), _ids(1, 4), 5, gamma=0), "gamma"),
    (lambda: speculative_generate(_tiny(), PromptLookupDraft(128), _ids(2, 4), 5, gamma=2), "input_ids"),
    (lambda: speculative_generate(_tiny(), PromptLookupDraft(128), _ids(1, 4), -1, gamma=2), "max_new_tokens"),
])
def test_arithmetic_and_speculative_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_speculative_generate_type_errors():
    with pytest.raises(TypeError, match="draft"):
        speculative_generate(_tiny(), _tiny(1), _ids(1, 4), 5, gamma=2)
    with pytest.raises(TypeError, match="sampling"):
        speculative_generate(_tiny(), PromptLookupDraft(128), _ids(1, 4), 5, gamma=2, sampling=1.0)
    with pytest.raises(TypeError, match="agrees"):
        greedy_target_calls(torch.ones(4), 2)


@pytest.mark.parametrize("agrees, gamma, calls", [
    ([True] * 8, 3, 2),  # 4 + 4
    ([False] * 8, 3, 8),
    ([True] * 8, 1, 4),
    ([True] * 9, 3, 3),  # 4 + 4 + 1
    ([True, False, True, True, True, True, False], 2, 3),  # 2 (one agreement) + 3 (two, capped) + 2 (limit)
    ([False, True, True, True, True, True, True, True], 8, 2),  # 1 + 7 (the last is always the target's)
    ([True], 4, 1),
    ([], 3, 0),
])
def test_greedy_target_calls_on_hand_made_agreements(agrees, gamma, calls):
    assert greedy_target_calls(torch.tensor(agrees, dtype=torch.bool), gamma) == calls


def test_greedy_rounds_lists_proposals_and_acceptances():
    agrees = torch.tensor([True, False, True, True, True, True, False], dtype=torch.bool)
    assert greedy_rounds(agrees, 2) == [(2, 1), (2, 2), (1, 1)]  # positions 0-1, 2-4, 5-6 (one left to propose)
    assert greedy_rounds(torch.ones(5, dtype=torch.bool), 8) == [(4, 4)]  # capped by the tokens left
    assert greedy_rounds(torch.zeros(3, dtype=torch.bool), 4) == [(2, 0), (1, 0), (0, 0)]


def test_drafts_and_verify_check_their_arguments():
    tokens = torch.tensor([1, 2, 3, 1, 2])
    with pytest.raises(ValueError, match="vocab_size"):
        PromptLookupDraft(3).propose(tokens, 2, Sampling())
    with pytest.raises(ValueError, match="gamma"):
        PromptLookupDraft(8).propose(tokens, -1, Sampling())
    draft = ModelDraft(_tiny(1))
    with pytest.raises(RuntimeError, match="reset"):
        draft.rollback(2)
    draft.reset(16)
    with pytest.raises(ValueError, match="gamma"):
        draft.propose(tokens, -1, Sampling())
    with pytest.raises(TypeError, match="sampling"):
        verify(torch.tensor([1]), torch.rand(1, 5), torch.rand(2, 5), None)
    with pytest.raises(ValueError, match="vocabulary"):  # a draft over another vocabulary
        speculative_generate(_tiny(0), ModelDraft(_tiny(1, vocab_size=64)), _ids(1, 4, vocab=64), 5, gamma=2)


# --- prompt lookup ------------------------------------------------------------------------------------


def _lookup(tokens, gamma, max_ngram=3):
    found, q = PromptLookupDraft(20, max_ngram).propose(torch.tensor(tokens), gamma, Sampling())
    assert q.shape == (len(found), 20)
    assert torch.equal(q, torch.nn.functional.one_hot(found, 20).float())
    return found.tolist()


def test_prompt_lookup_proposes_the_continuation_of_the_latest_full_longest_match():
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 6, 1, 2, 3]
    assert _lookup(tokens, 2) == [5, 7]  # the latest of two matches of [1, 2, 3]
    assert _lookup(tokens, 4) == [5, 7, 6, 1]
    # the latest match is followed by only 6 tokens: the earliest, followed by the most, is used
    assert _lookup(tokens, 10) == [4, 9, 1, 2, 3, 5, 7, 6, 1, 2]
    tokens = [1, 2, 3, 8, 3, 9, 1, 2, 3]  # [3] alone matches later (-> 9) than [1, 2, 3] (-> 8)
    assert _lookup(tokens, 3) == [8, 3, 9]
    assert _lookup(tokens, 3, max_ngram=1) == [9, 1, 2]
    assert _lookup([4, 5, 6, 7, 5, 6], 2) == [7, 5]  # a 2-gram
    assert _lookup([4, 4, 4], 3) == [4]  # overlapping match
    assert _lookup([9] * 6, 3) == [9, 9, 9]  # the latest match with gamma tokens after it
    assert _lookup([1, 2, 3, 4], 3) == []  # no earlier occurrence
    assert _lookup([7], 3) == []
    assert _lookup([1, 2, 3, 1, 2], 0) == []


# --- Decoder(layers=...) -----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [[0], [0, 1], [0, 2], [1, 3], [2], [0, 1, 2, 3]])
def test_decoder_layers_equal_a_depth_pruned_model(keep):
    from refimpl.pruning.structured import keep_layers

    model = _tiny(8, num_hidden_layers=4)
    decoder = Decoder.from_hf(model, layers=range(keep[-1] + 1) if keep == list(range(len(keep))) else keep)
    pruned = keep_layers(copy.deepcopy(model), keep)
    ids = _ids(2, 10, 8)
    with torch.no_grad():
        expected = pruned(ids).logits
        torch.testing.assert_close(decoder(ids), expected, atol=1e-4, rtol=0)
        cache = decoder.new_cache(2, 10)
        assert len(cache) == len(keep) and decoder.layers == tuple(keep)
        stepwise = torch.cat([decoder(ids[:, :6], cache)] + [decoder(ids[:, i:i + 1], cache) for i in range(6, 10)], 1)
        # float32 logits up to 15 after 4 layers of large weights: the cached steps sum in other orders
        # (measured up to 6.9e-5); a wrong layer or position is off by O(1)
        torch.testing.assert_close(stepwise, expected, atol=2e-4, rtol=1e-4)
        if len(keep) < 4:
            assert not torch.allclose(decoder(ids), model(ids).logits, atol=1e-2)
            with pytest.raises(TypeError, match="cache"):
                decoder(ids, Decoder.from_hf(model).new_cache(2, 10))
    assert model.config.num_hidden_layers == 4  # the model is untouched


@pytest.mark.parametrize("layers", [[], [1, 0], [0, 0], [0, 4], [-1], [True], [0.0], "01", 2])
def test_decoder_rejects_bad_layers(layers):
    with pytest.raises(ValueError, match="layers"):
        Decoder.from_hf(_tiny(0, num_hidden_layers=4), layers=layers)


# --- greedy speculative decoding reproduces greedy decoding ------------------------------------------

DRAFTS = ["other model", "noisy copy", "early exit", "target itself", "prompt lookup", "lookup, repetitive target"]


def _target(kind):
    """The target of each draft matrix entry: a small initializer range makes a model that repeats
    itself (runs of one token), where prompt lookup has something to find."""
    return _tiny(0, initializer_range=0.1) if kind == "lookup, repetitive target" else _tiny(0)


def _draft(kind, target):
    if kind == "other model":
        return ModelDraft(_tiny(21))
    if kind == "noisy copy":
        return ModelDraft(_noisy_copy(target, 0.01, seed=3))
    if kind == "early exit":
        return ModelDraft(Decoder.from_hf(target, layers=[0]))
    if kind == "target itself":
        return ModelDraft(target)
    return PromptLookupDraft(128, max_ngram=3)


def _lookup_target_calls(sequences, prompt_len, gamma, max_new_tokens):
    """Target calls of greedy speculative decoding with a prompt-lookup draft, replayed on the final
    (greedy) sequence: each round's proposals are accepted while they equal the next tokens."""
    tokens, end, i, calls = sequences[0], sequences.shape[1], prompt_len, 0
    draft = PromptLookupDraft(128, max_ngram=3)
    while i < end:
        proposals, _ = draft.propose(tokens[:i], min(gamma, prompt_len + max_new_tokens - i - 1), Sampling())
        accepted = 0
        while accepted < len(proposals) and i + accepted < end and proposals[accepted] == tokens[i + accepted]:
            accepted += 1
        i, calls = i + accepted + 1, calls + 1
    return calls


@functools.lru_cache(maxsize=None)
def _greedy_reference(kind, n, with_stop):
    """generate()'s greedy output of the matrix prompt for ``kind``'s target, and the stop tokens:
    with ``with_stop``, the first occurrence of a token late in the continuation."""
    target, prompt = _target(kind), torch.tensor([[5, 9, 23, 5, 9, 23, 5, 9]])  # repeats: prompt lookup finds it
    reference = generate(target, prompt, n)
    if not with_stop:
        return prompt, reference, ()
    new = reference[0, 8:].tolist()
    stop = (next(t for k, t in enumerate(new) if k >= 11 and t not in new[:k]),)
    reference = generate(target, prompt, n, stop_tokens=stop)
    assert reference.shape[1] < 8 + n
    return prompt, reference, stop


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("kind", DRAFTS)
@pytest.mark.parametrize("with_stop", [False, True], ids=["no-stop", "stop"])
def test_greedy_speculative_equals_greedy_generate(kind, gamma, with_stop):
    target, n = _target(kind), 17  # 17 tokens: never a whole number of rounds of gamma + 1
    prompt, reference, stop = _greedy_reference(kind, n, with_stop)
    draft = _draft(kind, target)
    result = speculative_generate(target, draft, prompt, n, gamma, stop_tokens=stop)
    assert isinstance(result, SpeculativeResult)
    assert torch.equal(result.sequences, reference)
    new_tokens = reference.shape[1] - 8
    assert result.new_tokens == new_tokens
    assert all(0 <= accepted <= proposed <= gamma for proposed, accepted in result.rounds)
    if not with_stop:  # one acceptance rate per scored proposal (a stop can cut the last round's count)
        assert len(result.acceptance) == sum(min(a + 1, g) for g, a in result.rounds)
    _assert_cache_holds(result.cache, Decoder.from_hf(target), reference[:, :-1])
    if isinstance(draft, ModelDraft):
        assert draft.cache.length <= reference.shape[1]
        _assert_cache_holds(draft.cache, draft.decoder, reference[:, :draft.cache.length])
        agrees = _teacher_forced_argmax(draft.decoder, reference, 8) == reference[0, 8:]
        assert torch.equal(_teacher_forced_argmax(target, reference, 8), reference[0, 8:])
        assert result.target_calls == greedy_target_calls(agrees, gamma)
        if not with_stop:
            assert result.rounds == greedy_rounds(agrees, gamma)
    else:
        assert result.target_calls == _lookup_target_calls(reference, 8, gamma, n)
    if kind == "target itself":
        assert result.alpha == 1.0
        if not with_stop:
            assert result.target_calls == math.ceil(n / (gamma + 1))
            assert result.rounds == [(min(gamma, n - 1 - i * (gamma + 1)), min(gamma, n - 1 - i * (gamma + 1)))
                                     for i in range(result.target_calls)]
    assert result.tokens_per_call == new_tokens / result.target_calls


def test_the_drafts_span_low_and_high_agreement():
    """The draft matrix above is only meaningful if some drafts have rounds with partial acceptance,
    and prompt lookup proposes something."""
    prompt = torch.tensor([[5, 9, 23, 5, 9, 23, 5, 9]])
    alphas = {}
    for kind in DRAFTS:
        target = _target(kind)
        result = speculative_generate(target, _draft(kind, target), prompt, 17, gamma=3)
        alphas[kind] = result.alpha
        if kind == "noisy copy":
            assert any(0 < a < g for g, a in result.rounds)  # partly accepted rounds
            assert any(0 < a == g for g, a in result.rounds)  # fully accepted rounds
        if kind == "lookup, repetitive target":
            assert any(a > 0 for g, a in result.rounds)
    assert alphas["other model"] < 0.5 < alphas["noisy copy"] < 1 == alphas["target itself"]
    assert alphas["lookup, repetitive target"] > 0.2


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2])
def test_speculative_handles_tiny_lengths(max_new_tokens):
    target, prompt = _tiny(0), _ids(1, 5, 1)
    draft = ModelDraft(_noisy_copy(target, 0.01, seed=3))
    result = speculative_generate(target, draft, prompt, max_new_tokens, gamma=4)
    assert torch.equal(result.sequences, generate(target, prompt, max_new_tokens))
    assert result.new_tokens == max_new_tokens
    if max_new_tokens:
        assert result.cache.length == prompt.shape[1] + max_new_tokens - 1
    else:
        assert result.target_calls == 0


# --- rejected proposals never stay in the caches --------------------------------------------------------


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("gamma", [2, 5])
def test_caches_hold_only_the_accepted_text(sampling, gamma):
    target = _tiny(0)
    draft = ModelDraft(_noisy_copy(target, 0.02, seed=4))
    prompt = _ids(1, 6, 2)
    result = speculative_generate(target, draft, prompt, 23, gamma, sampling, seed=5)
    sequences = result.sequences
    assert sequences.shape == (1, 6 + 23)
    assert any(a < g for g, a in result.rounds)  # something was rejected and rolled back
    _assert_cache_holds(result.cache, Decoder.from_hf(target), sequences[:, :-1])
    length = draft.cache.length
    assert sequences.shape[1] - gamma - 2 <= length <= sequences.shape[1]  # at least the start of the last round
    _assert_cache_holds(draft.cache, draft.decoder, sequences[:, :length])


def test_early_exit_draft_cache_holds_only_the_accepted_text():
    target = _tiny(0, num_hidden_layers=3)
    draft = ModelDraft(Decoder.from_hf(target, layers=range(2)))
    result = speculative_generate(target, draft, _ids(1, 5, 3), 20, 3, Sampling(1.0), seed=1)
    assert len(draft.cache) == 2
    _assert_cache_holds(result.cache, Decoder.from_hf(target), result.sequences[:, :-1])
    _assert_cache_holds(draft.cache, draft.decoder, result.sequences[:, :draft.cache.length])


def test_draft_cache_after_a_stop_inside_the_proposals():
    target, prompt = _tiny(0), _ids(1, 6, 0)
    new = generate(target, prompt, 20)[0, 6:].tolist()
    stop = new[4]
    assert stop not in new[:4]
    draft = ModelDraft(target)  # accepts all 8 proposals; the stop token is the 5th
    result = speculative_generate(target, draft, prompt, 20, gamma=8, stop_tokens=[stop])
    assert result.sequences.shape[1] == 6 + 5
    assert draft.cache.length <= result.sequences.shape[1]


# --- sampled speculative decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.8, top_k=10, top_p=0.9)])
def test_a_draft_equal_to_the_target_is_always_accepted(sampling):
    target = _tiny(0)
    result = speculative_generate(target, ModelDraft(target), _ids(1, 6, 4), 20, 4, sampling, seed=2)
    assert result.new_tokens == 20
    assert all(a == g for g, a in result.rounds)
    assert result.target_calls == math.ceil(20 / 5)
    assert result.alpha == pytest.approx(1.0, abs=1e-5)


def test_sampled_speculative_is_reproducible_and_seeded():
    target, prompt = _tiny(0), _ids(1, 6, 5)
    rule = Sampling(1.0)

    def run(seed):
        return speculative_generate(target, ModelDraft(_tiny(21)), prompt, 16, 3, rule, seed=seed)

    a = run(7)
    assert a.sequences.shape == (1, 22)
    assert torch.equal(run(7).sequences, a.sequences) and run(7).rounds == a.rounds
    assert not torch.equal(run(8).sequences, a.sequences)
    assert 0 <= a.alpha < 1


def test_draft_interface_is_abstract():
    with pytest.raises(TypeError):
        Draft()
    with pytest.raises(RuntimeError, match="reset"):
        ModelDraft(_tiny()).propose(torch.tensor([1, 2]), 2, Sampling())


# --- the real model ------------------------------------------------------------------------------------

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "List three prime numbers greater than 10."]


@pytest.mark.slow
def test_smollm2_generate_and_speculative_match_hugging_face(smollm2):
    """SmolLM2-135M-Instruct: greedy generate() is Hugging Face's greedy generate, and greedy
    speculative decoding with the first 8 of its 30 layers as the draft (self-speculative) and with
    prompt lookup reproduces it token for token."""
    model, tokenizer = smollm2
    early_exit = ModelDraft(Decoder.from_hf(model, layers=range(8)))
    for question in CHAT_PROMPTS:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text).input_ids])
        out = generate(model, ids, 12)
        assert torch.equal(out, _hf_generate(model, ids, 12, pad_token_id=tokenizer.pad_token_id or 0))
        for draft in (early_exit, PromptLookupDraft(model.config.vocab_size)):
            result = speculative_generate(model, draft, ids, 12, gamma=3)
            assert torch.equal(result.sequences, out), (question, type(draft).__name__)
            assert result.new_tokens == 12 and result.target_calls <= 12


@pytest.mark.slow
def test_smollm2_speculative_sampling_reproduces_the_next_token_distribution(smollm2):
    """On SmolLM2's real next-token distribution p and a far-off q (the first 8 layers' early exit),
    the first token of 3,000 one-proposal rounds is as close to p as 3,000 direct samples of p, and
    much closer than q is."""
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    sampling = Sampling(1.0)
    with torch.no_grad():
        p = sampling.probabilities(model(ids).logits[0, -1])  # [vocab]
        q = sampling.probabilities(Decoder.from_hf(model, layers=range(8))(ids)[0, -1])
    generator, counts = make_generator(0), torch.zeros_like(p)
    for _ in range(3000):
        x = sampling.sample(q, generator)
        accepted, next_token = verify(x[None], q[None], torch.stack([p, p]), sampling, generator)
        counts[int(x) if accepted else next_token] += 1
    direct = torch.bincount(torch.multinomial(p, 3000, replacement=True, generator=make_generator(1)),
                            minlength=len(p)) / 3000
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()  # noqa: E731
    assert tv(p, q) > 0.3
    assert tv(p, counts / 3000) < 1.5 * tv(p, direct) + 0.01
    assert tv(p, counts / 3000) < 0.25 * tv(p, q)
