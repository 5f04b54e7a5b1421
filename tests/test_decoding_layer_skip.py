"""refimpl.decoding.layer_skip (Draft & Verify): skipping nothing is the target bit for bit; skipping
a sublayer is the target with that sublayer's output projection zeroed (against Decoder on the zeroed
copy, exactly, and against Hugging Face's model); skipping both sublayers of the last layers is the
early exit; cached decoding equals the full pass; greedy speculative decoding with the draft returns
the target's tokens in the number of target calls that teacher-forced agreement predicts; the cost
ratio by hand; the GP and expected improvement against their formulas; Bayesian optimization
deterministic, never repeating a point, finding a toy optimum; the layer selection's figures
recomputed; validation, with the model never modified; SmolLM2."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from tiny import make_decoding_llama, random_prompt

from refimpl.attention.decoder import Decoder
from refimpl.attention.kv_cache import KVCache
from refimpl.decoding import speculative as spec
from refimpl.decoding.generate import generate
from refimpl.decoding.layer_skip import (BayesOptResult, LayerSkipDecoder, SkipKVCache, SkipSelection,
                                         bayesian_optimization, calibration_set, cost_ratio, expected_improvement,
                                         gp_posterior, greedy_acceptance, hamming_rbf_kernel,
                                         select_skipped_layers, skip_sets)

N_LAYERS = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=None)
def _tiny(seed=0):
    """Shared, never modified."""
    return make_decoding_llama(seed, N_LAYERS)


_ids = random_prompt


def _state(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _zeroed(model, skip_attention, skip_mlp):
    """A copy of ``model`` whose skipped sublayers add zero to the residual (output projection zeroed)."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for l in skip_attention:
            zeroed.model.layers[l].self_attn.o_proj.weight.zero_()
        for l in skip_mlp:
            zeroed.model.layers[l].mlp.down_proj.weight.zero_()
    return zeroed


# --- the draft ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_skipping_nothing_is_the_target_exactly(seed):
    model, ids = _tiny(seed), _ids(11, seed)
    draft = LayerSkipDecoder.from_hf(model)
    assert draft.layers == tuple(range(N_LAYERS)) and draft.attention_runs == (True,) * N_LAYERS
    with torch.no_grad():
        logits = draft(ids)
        assert torch.equal(logits, Decoder.from_hf(model)(ids))
        assert torch.allclose(logits, model(ids).logits, atol=1e-4)


@pytest.mark.parametrize("skip_attention, skip_mlp", [
    ((1,), ()), ((), (2,)), ((0,), ()), ((), (3,)), ((0, 2), (1, 2)), ((1, 2, 3), (0,)), ((3,), (3,)), ((1,), (1, 3)),
])
def test_skipping_a_sublayer_is_the_model_with_its_output_zeroed(skip_attention, skip_mlp):
    model, ids = _tiny(2), _ids(9, 2)
    zeroed = _zeroed(model, skip_attention, skip_mlp)
    with torch.no_grad():
        logits = LayerSkipDecoder(model, skip_attention, skip_mlp)(ids)
        assert torch.equal(logits, Decoder.from_hf(zeroed)(ids))  # h + 0 is h: the same operations after it
        assert torch.allclose(logits, zeroed(ids).logits, atol=1e-4)  # Hugging Face's own forward
        assert not torch.allclose(logits, model(ids).logits, atol=1e-3)  # the skip changes something


def test_skipping_both_sublayers_of_the_last_layers_is_the_early_exit():
    model, ids = _tiny(), _ids(8)
    for k in range(1, N_LAYERS):
        draft = LayerSkipDecoder(model, range(k, N_LAYERS), range(k, N_LAYERS))
        assert draft.layers == tuple(range(k))  # layers with nothing left are not run
        with torch.no_grad():
            assert torch.equal(draft(ids), Decoder.from_hf(model, layers=range(k))(ids))


@pytest.mark.parametrize("skip_attention, skip_mlp", [((0,), ()), ((0, 2), (2, 3)), ((), (1,)), ((1, 2), (1,))])
def test_cached_decoding_equals_the_full_pass_and_caches_only_the_attention_run(skip_attention, skip_mlp):
    model, ids = _tiny(3), _ids(12, 3)
    draft = LayerSkipDecoder(model, skip_attention, skip_mlp)
    cache = draft.new_cache(1, 16)
    assert isinstance(cache, SkipKVCache) and len(cache.layers) == N_LAYERS - len(skip_attention)
    assert len(cache) == len(draft.layers)
    assert [cache[i] is None for i in range(len(draft.layers))] == [l in skip_attention for l in draft.layers]
    with torch.no_grad():
        steps = [draft(ids[:, :5], cache)] + [draft(ids[:, t:t + 1], cache) for t in range(5, 12)]
        assert torch.allclose(torch.cat(steps, dim=1), draft(ids), atol=1e-4)
        assert cache.length == 12 and all(isinstance(c, KVCache) and c.length == 12 for c in cache.layers)
        cache.truncate(7)  # roll back, as speculative decoding does, and decode again
        assert torch.allclose(draft(ids[:, 7:], cache), draft(ids)[:, 7:], atol=1e-4)


@pytest.mark.parametrize("skip_attention, skip_mlp, gamma", [
    ((), (), 3), ((1,), (2,), 2), ((0, 3), (1, 3), 4), ((2, 3), (2, 3), 3), ((0, 1, 2), (0, 1, 2, 3), 5),
])
def test_speculative_decoding_with_the_draft_returns_the_target_greedy_tokens(skip_attention, skip_mlp, gamma):
    model = _tiny(4)
    draft = LayerSkipDecoder(model, skip_attention, skip_mlp)
    for seed in range(3):
        ids = _ids(3 + 2 * seed, seed)
        result = spec.speculative_generate(model, spec.ModelDraft(draft), ids, 16, gamma=gamma)
        expected = generate(model, ids, 16)
        assert torch.equal(result.sequences, expected)
        with torch.no_grad():  # the rounds follow from the teacher-forced agreement along the output
            target = Decoder.from_hf(model)(expected)[0, ids.shape[1] - 1:-1].argmax(-1)
            agrees = draft(expected)[0, ids.shape[1] - 1:-1].argmax(-1) == target  # [16]
        assert result.rounds == spec.greedy_rounds(agrees, gamma)
        if not skip_attention and not skip_mlp:
            assert all(accepted == proposed for proposed, accepted in result.rounds)


def test_the_draft_refuses_another_cache():
    model, ids = _tiny(), _ids(4)
    draft = LayerSkipDecoder(model, (1,), ())
    for cache in (Decoder.from_hf(model).new_cache(1, 8), LayerSkipDecoder(model, (2,), ()).new_cache(1, 8)):
        with pytest.raises(TypeError, match=r"cache must come from this draft's new_cache\(\)"):
            draft(ids, cache)


def test_cost_ratio_by_hand_and_skip_sets():
    model = _tiny()
    h, kv, i, vocab = 64, 2 * 16, 128, 128  # hidden, kv heads x head_dim, MLP width, vocabulary
    attention, mlp, head = 2 * h * h + 2 * h * kv, 3 * h * i, vocab * h
    total = head + N_LAYERS * (attention + mlp)
    assert cost_ratio(model) == 1.0
    assert math.isclose(cost_ratio(model, (0, 2), (3,)), (total - 2 * attention - mlp) / total, rel_tol=1e-12)
    assert math.isclose(cost_ratio(model, range(2, 4), range(2, 4)), (head + 2 * (attention + mlp)) / total,
                        rel_tol=1e-12)
    z = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert skip_sets(z) == ((0, 2), (3,))


# --- Bayesian optimization ------------------------------------------------------------------------


def test_gp_posterior_interpolates_and_matches_the_formula_for_one_length_scale():
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(12, 10, generator=generator) < 0.5
    values = torch.randn(12, generator=generator, dtype=torch.float64)
    mean, std = gp_posterior(points, values, points, noise=1e-8)
    assert torch.allclose(mean, values, atol=1e-4) and bool((std < 1e-3).all())
    queries = torch.rand(5, 10, generator=generator) < 0.5
    mean, std = gp_posterior(points, values, queries, length_scales=(2.0,), noise=1e-3)
    y = (values - values.mean()) / values.std()
    k = hamming_rbf_kernel(points, points, 2.0) + 1e-3 * torch.eye(12, dtype=torch.float64)
    cross = hamming_rbf_kernel(points, queries, 2.0)
    assert torch.allclose(mean, values.mean() + values.std() * cross.T @ torch.linalg.solve(k, y), atol=1e-10)
    variance = 1 - torch.diag(cross.T @ torch.linalg.solve(k, cross))
    assert torch.allclose(std, values.std() * variance.sqrt(), atol=1e-10)
    assert math.isclose(hamming_rbf_kernel(points[:1], queries[:1], 2.0).item(),
                        math.exp(-int((points[0] != queries[0]).sum()) / 8), rel_tol=1e-12)


def test_expected_improvement_against_its_formula():
    mean, std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.5, 1e-9], dtype=torch.float64)
    ei = expected_improvement(mean, std, 1.0)
    phi = lambda u: math.exp(-u * u / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2)))  # noqa: E731
    assert math.isclose(ei[0].item(), -0.5 * cdf(-0.5) + phi(-0.5), rel_tol=1e-9)
    assert math.isclose(ei[1].item(), 0.5 * phi(0.0), rel_tol=1e-9)
    assert math.isclose(ei[2].item(), 1.0, rel_tol=1e-6)  # certain improvement: mu - y+
    assert bool((ei >= 0).all())


TARGET = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0], dtype=torch.bool)


def _toy(z):
    """Maximum 0 at TARGET only; a plateau-free landscape with an interaction between bits 0 and 1."""
    return -float((z ^ TARGET).sum()) - 0.5 * float(z[0] == z[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bayesian_optimization_finds_the_toy_optimum_and_keeps_its_invariants(seed):
    feasible = lambda z: bool(z[:4].sum() <= 3)  # noqa: E731
    initial = [torch.zeros(12, dtype=torch.bool)]
    result = bayesian_optimization(_toy, 12, 60, n_init=6, seed=seed, feasible=feasible, initial=initial)
    again = bayesian_optimization(_toy, 12, 60, n_init=6, seed=seed, feasible=feasible, initial=initial)
    assert isinstance(result, BayesOptResult)
    assert torch.equal(result.points, again.points) and torch.equal(result.values, again.values)  # deterministic
    assert torch.equal(result.best, TARGET) and result.value == 0.0  # 60 + 7 of 3,840 feasible vectors
    assert len(result.values) == 1 + 6 + 60 and torch.equal(result.points[0], initial[0])
    assert len({tuple(z.tolist()) for z in result.points}) == len(result.points)  # no point twice
    assert all(feasible(z) for z in result.points)
    assert torch.equal(result.values, torch.tensor([_toy(z) for z in result.points], dtype=torch.float64))
    assert bool((result.value >= result.values).all()) and result.best_so_far[-1] == result.value
    assert bool((result.best_so_far.diff() >= 0).all())


def test_bayesian_optimization_beats_random_search_of_the_same_budget():
    for seed in range(3):
        bo = bayesian_optimization(_toy, 12, 30, n_init=6, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        random = max(_toy(z) for z in torch.rand(37, 12, generator=generator) < 0.5)
        assert bo.value > random


# --- the layer selection --------------------------------------------------------------------------


def test_select_skipped_layers_reports_what_it_found():
    model = _tiny(5)
    prompts = [_ids(4, 5), _ids(7, 6)]
    selection = select_skipped_layers(model, prompts, 10, gamma=3, n_iter=12, n_init=4, seed=0)
    again = select_skipped_layers(model, prompts, 10, gamma=3, n_iter=12, n_init=4, seed=0)
    assert isinstance(selection, SkipSelection) and torch.equal(selection.search.values, again.search.values)
    assert torch.equal(selection.search.points, again.search.points)
    search = selection.search
    assert len(search.values) == 1 + 4 + 12 and not search.points[0].any() and search.values[0] == 1.0
    assert (selection.skip_attention, selection.skip_mlp) == skip_sets(search.best)
    calibration = calibration_set(model, prompts, 10)
    alpha = greedy_acceptance(LayerSkipDecoder(model, selection.skip_attention, selection.skip_mlp), calibration)
    c = cost_ratio(model, selection.skip_attention, selection.skip_mlp)
    assert (selection.alpha, selection.cost_ratio) == (alpha, pytest.approx(c, rel=1e-12))
    assert selection.speedup == search.value == pytest.approx(spec.expected_speedup(alpha, 3, cost_ratio=c))
    for z, value in zip(search.points, search.values):  # every evaluation is S(z)
        draft = LayerSkipDecoder(model, *skip_sets(z))
        expected = spec.expected_speedup(greedy_acceptance(draft, calibration), 3, cost_ratio(model, *skip_sets(z)))
        assert value.item() == pytest.approx(expected, rel=1e-12)


def test_select_skipped_layers_keeps_within_the_cost_band():
    model = _tiny(5)
    selection = select_skipped_layers(model, [_ids(5, 7)], 8, gamma=2, n_iter=6, n_init=4, min_cost_ratio=0.5,
                                      max_cost_ratio=0.7)
    assert all(0.5 <= cost_ratio(model, *skip_sets(z)) <= 0.7 for z in selection.search.points)
    assert 0.5 <= selection.cost_ratio <= 0.7 and len(selection.search.values) == 4 + 6


def test_greedy_acceptance_of_the_target_itself_is_one():
    model = _tiny(6)
    calibration = calibration_set(model, [_ids(3, 1), _ids(6, 2)], 9)
    assert [s.shape[1] for s in calibration.sequences] == [12, 15]
    for tokens, sequence, t in zip(calibration.target_tokens, calibration.sequences, calibration.prompt_lengths):
        assert torch.equal(tokens, sequence[0, t:])  # the target's argmax along its own greedy output
    assert greedy_acceptance(LayerSkipDecoder(model), calibration) == 1.0


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(skip_attention=(4,)), r"skip_attention must hold layer indices in \[0, 4\), got \[4\]"),
    (dict(skip_mlp=(-1, 2)), r"skip_mlp must hold layer indices in \[0, 4\), got \[-1, 2\]"),
    (dict(skip_mlp=(1, 1)), r"skip_mlp must not repeat a layer index, got \[1, 1\]"),
    (dict(skip_attention=(1.0,)), r"skip_attention must hold ints, got \[1.0\]"),
    (dict(skip_attention=(True,)), r"skip_attention must hold ints, got \[True\]"),
    (dict(skip_mlp="12"), r"skip_mlp must be a sequence or set of layer indices, got '12'"),
    (dict(skip_mlp=3), r"skip_mlp must be a sequence or set of layer indices, got 3"),
    (dict(skip_attention=torch.tensor([1])), r"skip_attention must be a sequence or set of layer indices"),
    (dict(skip_attention=range(4)), r"skip_attention must leave at least one of the 4 attention sublayers"),
])
def test_skip_sets_are_checked(kwargs, message):
    model = _tiny()
    before = _state(model)
    for build in (LayerSkipDecoder, LayerSkipDecoder.from_hf, cost_ratio):
        with pytest.raises(ValueError, match=message):
            build(model, **kwargs)
    _assert_unchanged(model, before)


def test_skip_sets_may_be_sets_in_any_order():
    draft = LayerSkipDecoder(_tiny(), skip_attention={2, 0}, skip_mlp=[3, 1])
    assert (draft.skip_attention, draft.skip_mlp) == ((0, 2), (1, 3))


def test_the_draft_needs_a_llama():
    with pytest.raises(TypeError, match="model must be a Hugging Face LlamaForCausalLM"):
        LayerSkipDecoder(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(objective=3), TypeError, "objective must be callable"),
    (dict(n_bits=0), ValueError, "n_bits must be a positive int"),
    (dict(n_iter=-1), ValueError, "n_iter must be a non-negative int"),
    (dict(n_init=1.5), ValueError, "n_init must be a non-negative int"),
    (dict(seed=-2), ValueError, "seed must be a non-negative int"),
    (dict(n_random=0), ValueError, "n_random must be a positive int"),
    (dict(initial=[torch.zeros(11, dtype=torch.bool)]), ValueError, r"initial\[0\] must be a feasible BoolTensor\[12\]"),
    (dict(initial=[torch.zeros(12)]), ValueError, r"initial\[0\] must be a feasible BoolTensor\[12\]"),
    (dict(initial=[torch.ones(12, dtype=torch.bool)], feasible=lambda z: not z.all()), ValueError,
     r"initial\[0\] must be a feasible"),
    (dict(n_init=0), ValueError, "feasible rejected every initial and random vector"),
    (dict(objective=lambda z: float("nan")), ValueError, "objective must return finite values, got nan"),
    (dict(feasible=lambda z: False), ValueError, "feasible rejected every initial and random vector"),
])
def test_bayesian_optimization_checks_its_arguments(kwargs, error, message):
    arguments = dict(objective=_toy, n_bits=12, n_iter=2) | kwargs
    with pytest.raises(error, match=message):
        bayesian_optimization(**arguments)


def test_skip_sets_checks_z():
    for z in (torch.zeros(7, dtype=torch.bool), torch.zeros(8), torch.zeros(2, 4, dtype=torch.bool), [0, 1]):
        with pytest.raises(ValueError, match=r"z must be a BoolTensor \[2L\]"):
            skip_sets(z)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(gamma=0), ValueError, "gamma must be a positive int"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive int"),
    (dict(n_iter=-1), ValueError, "n_iter must be a non-negative int"),
    (dict(n_init=-1), ValueError, "n_init must be a non-negative int"),
    (dict(seed=-1), ValueError, "seed must be a non-negative int"),
    (dict(verify_ratio=0.0), ValueError, "verify_ratio must be a positive finite number"),
    (dict(max_cost_ratio=1.5), ValueError, r"max_cost_ratio must be a number in \[0, 1\]"),
    (dict(max_cost_ratio=0.0), ValueError, "feasible rejected every initial and random vector"),
    (dict(min_cost_ratio=-0.1), ValueError, r"min_cost_ratio must be a number in \[0, 1\]"),
    (dict(min_cost_ratio=0.6, max_cost_ratio=0.5), ValueError, r"min_cost_ratio \(0.6\) must not exceed max_cost_ratio"),
    (dict(prompts=[]), ValueError, "prompts must be a non-empty sequence of LongTensor"),
    (dict(prompts=torch.zeros(1, 3, dtype=torch.long)), ValueError, "prompts must be a non-empty sequence"),
    (dict(prompts=[torch.zeros(2, 3, dtype=torch.long)]), ValueError, r"prompts\[0\] must hold one sequence"),
    (dict(prompts=[torch.full((1, 3), 128)]), ValueError, r"prompts\[0\] must hold token ids in \[0, 128\)"),
    (dict(prompts=[torch.zeros(1, 3)]), TypeError, r"prompts\[0\] must be a LongTensor"),
    (dict(model=torch.nn.Linear(2, 2)), TypeError, "model must be a Hugging Face LlamaForCausalLM"),
])
def test_select_skipped_layers_checks_its_arguments_and_leaves_the_model_whole(kwargs, error, message):
    model = _tiny()
    before = _state(model)
    arguments = dict(model=model, prompts=[_ids(4)], max_new_tokens=4, gamma=2, n_iter=1, n_init=1) | kwargs
    with pytest.raises(error, match=message):
        select_skipped_layers(**arguments)
    _assert_unchanged(model, before)


# --- SmolLM2 --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_speculative_decoding_with_a_layer_skipping_draft_is_the_target(smollm2):
    """SmolLM2-135M-Instruct: greedy speculative decoding with drafts that skip attention and MLP
    sublayers (some in the first layer) returns generate()'s tokens, in the rounds that teacher-forced
    agreement predicts; skipping nothing keeps the target's logits bit for bit."""
    model, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a prime number is."}],
                                         tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text).input_ids])
    expected = generate(model, ids, 16)
    with torch.no_grad():
        assert torch.equal(LayerSkipDecoder(model)(ids), Decoder.from_hf(model)(ids))
        target = Decoder.from_hf(model)(expected)[0, ids.shape[1] - 1:-1].argmax(-1)
    for skip_attention, skip_mlp in [((0, 5, 11, 17), (3, 9, 20)), (range(10, 30, 2), range(1, 30, 3))]:
        draft = LayerSkipDecoder(model, skip_attention, skip_mlp)
        result = spec.speculative_generate(model, spec.ModelDraft(draft), ids, 16, gamma=3)
        assert torch.equal(result.sequences, expected)
        with torch.no_grad():
            agrees = draft(expected)[0, ids.shape[1] - 1:-1].argmax(-1) == target
        assert result.rounds == spec.greedy_rounds(agrees, 3)
