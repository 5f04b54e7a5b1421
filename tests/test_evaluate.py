"""refimpl.evaluate: perplexity parity with Hugging Face's loss, byte counting, timing helpers."""

from __future__ import annotations

import math

import pytest
import torch

from refimpl import evaluate


def test_perplexity_matches_hf_loss(tiny_llama):
    torch.manual_seed(1)
    blocks = torch.randint(0, 128, (5, 17))
    with torch.no_grad():  # HF's loss is the mean token NLL of one batch with labels = inputs
        losses = [tiny_llama(b[None], labels=b[None]).loss for b in blocks]
    expected = math.exp(torch.stack(losses).mean().item())  # equal block lengths: mean of means
    assert evaluate.perplexity(tiny_llama, blocks, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_perplexity_does_not_depend_on_batching(tiny_llama):
    blocks = torch.randint(0, 128, (7, 9))
    a = evaluate.mean_nll(tiny_llama, blocks, batch_size=1)
    b = evaluate.mean_nll(tiny_llama, blocks, batch_size=7)
    assert a == pytest.approx(b, rel=1e-6)


def test_perfect_model_has_perplexity_one():
    class Oracle(torch.nn.Module):
        """Predicts token t+1 = token t + 1 with certainty."""

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            logits = torch.full((*ids.shape, 10), -1e4)
            logits.scatter_(-1, ((ids + 1) % 10)[..., None], 0.0)
            return type("Out", (), {"logits": logits})

    blocks = torch.arange(20).remainder(10).view(2, 10)
    assert evaluate.perplexity(Oracle(), blocks) == pytest.approx(1.0)


@pytest.mark.parametrize("bad, error, match", [
    (torch.empty(0, 8, dtype=torch.long), ValueError, "empty"),
    (torch.empty(0, dtype=torch.long), ValueError, "shape"),
    (torch.zeros(2, 1, dtype=torch.long), ValueError, "at least 2 tokens"),
    (torch.zeros(2, 8), TypeError, "torch.long"),
    ([[1, 2, 3]], TypeError, "torch.Tensor"),
])
def test_perplexity_rejects_bad_blocks(tiny_llama, bad, error, match):
    with pytest.raises(error, match=match):
        evaluate.perplexity(tiny_llama, bad)


def test_perplexity_rejects_bad_batch_size(tiny_llama):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate.perplexity(tiny_llama, torch.zeros(2, 4, dtype=torch.long), batch_size=0)


def test_model_bytes_counts_tied_weights_once(tiny_llama):
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    params = evaluate.parameter_count(tiny_llama)
    buffer_bytes = sum(b.numel() * b.element_size() for b in tiny_llama.buffers())
    assert evaluate.model_bytes(tiny_llama) == 4 * params + buffer_bytes
    half = tiny_llama.to(torch.bfloat16)
    assert evaluate.model_bytes(half) == 2 * params + sum(b.numel() * b.element_size() for b in half.buffers())


def test_model_bytes_measures_packed_buffers():
    class Packed(torch.nn.Module):
        """Stands for a packed 4-bit linear layer: two codes per byte plus fp16 scales."""

        def __init__(self):
            super().__init__()
            self.register_buffer("codes", torch.zeros(64, 32, dtype=torch.uint8))  # 64x64 4-bit
            self.register_buffer("scales", torch.ones(64, 1, dtype=torch.float16))

    assert evaluate.model_bytes(Packed()) == 64 * 32 + 64 * 2


def test_model_bytes_counts_views_of_one_storage_once():
    m = torch.nn.Module()
    base = torch.zeros(100)
    m.register_buffer("a", base[:50])
    m.register_buffer("b", base[50:])
    assert evaluate.model_bytes(m) == 400


def test_model_bytes_rejects_non_modules():
    with pytest.raises(TypeError, match="model"):
        evaluate.model_bytes({"w": torch.zeros(3)})


def _count_forward_calls(model):
    """Record the number of tokens per sequence of every forward call of ``model``."""
    lengths = []
    model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]),
        with_kwargs=True)
    return lengths


def test_prefill_timing_runs_the_prompt_once_per_repeat(tiny_llama):
    lengths = _count_forward_calls(tiny_llama)
    ids = torch.randint(0, 128, (2, 12))
    prefill = evaluate.prefill_latency(tiny_llama, ids, repeats=3, warmup=1)
    assert len(prefill.times_s) == 3 and prefill.tokens == 24 and prefill.tokens_per_s > 0
    assert lengths == [12] * 4  # one warm-up, three timed


def test_decode_timing_decodes_one_token_at_a_time_with_the_cache(tiny_llama):
    lengths = _count_forward_calls(tiny_llama)
    ids = torch.randint(0, 128, (2, 12))
    decode = evaluate.decode_latency(tiny_llama, ids, n_tokens=5, repeats=2, warmup=0)
    assert len(decode.times_s) == 2 and decode.tokens == 10
    assert decode.median_s == pytest.approx(sum(decode.times_s) / 2)  # median of two
    # per repeat: the (untimed) prefill of the prompt, then 5 single-token steps
    assert lengths == ([12] + [1] * 5) * 2


def test_measurements_run_in_eval_mode_and_restore_the_mode():
    from tiny import make_tiny_llama

    model = make_tiny_llama(attention_dropout=0.5).train()
    blocks = torch.randint(0, 128, (2, 16))
    first = evaluate.perplexity(model, blocks)
    assert model.training  # given back in the mode it came in
    assert evaluate.perplexity(model, blocks) == first  # no dropout while measuring
    evaluate.decode_latency(model, blocks[:, :4], n_tokens=2, repeats=1)
    assert model.training


def test_block_nll_per_block(tiny_llama):
    blocks = torch.randint(0, 128, (3, 10))
    per_block = evaluate.block_nll(tiny_llama, blocks, batch_size=2)
    assert per_block.shape == (3,)
    # float32 logits of a batch of one against a batch of two: matmuls of other shapes sum in another
    # order, ~1e-7 relative on each token's NLL
    singles = [evaluate.mean_nll(tiny_llama, b[None]) for b in blocks]
    assert per_block.tolist() == pytest.approx(singles, rel=1e-6)
    # the same batches: mean_nll is the float64 mean of these very values
    assert evaluate.mean_nll(tiny_llama, blocks, batch_size=2) == per_block.mean().item()
    # one batch of three: float32 rounding again, not 1e-12 (4.9e-12 measured on an AVX-512 Xeon)
    assert evaluate.mean_nll(tiny_llama, blocks) == pytest.approx(per_block.mean().item(), rel=1e-6)


def test_perplexity_rejects_token_ids_outside_the_vocabulary(tiny_llama):
    with pytest.raises(ValueError, match=r"token ids in \[0, 128\)"):
        evaluate.perplexity(tiny_llama, torch.tensor([[1, 2, 128]]))
    with pytest.raises(ValueError, match="token ids"):
        evaluate.perplexity(tiny_llama, torch.tensor([[1, -2, 3]]))


def test_perplexity_rejects_non_modules():
    with pytest.raises(TypeError, match="model"):
        evaluate.perplexity(lambda ids: ids, torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [(dict(repeats=0), "repeats"), (dict(warmup=-1), "warmup")])
def test_timing_rejects_bad_counts(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate.prefill_latency(tiny_llama, torch.zeros(1, 4, dtype=torch.long), **kwargs)


def test_decode_rejects_bad_token_count(tiny_llama):
    with pytest.raises(ValueError, match="n_tokens"):
        evaluate.decode_latency(tiny_llama, torch.zeros(1, 4, dtype=torch.long), n_tokens=0)


def test_peak_memory_sees_a_large_allocation():
    size = 200 * 2**20
    result, peak = evaluate.peak_memory(lambda: torch.ones(size // 4).sum().item())
    assert result == size // 4
    assert 0.9 * size < peak < 3 * size


def test_peak_memory_rejects_non_callables():
    with pytest.raises(TypeError, match="fn"):
        evaluate.peak_memory(42)


def test_memory_bandwidth_is_plausible():
    bandwidth = evaluate.memory_bandwidth(size_mib=64, repeats=3)
    assert 1e8 < bandwidth < 1e13  # between 0.1 GB/s and 10 TB/s


def test_kv_cache_formula_matches_real_cache_tensors(tiny_llama):
    out = tiny_llama(torch.zeros(3, 11, dtype=torch.long), use_cache=True)
    expected = evaluate.kv_cache_bytes(tiny_llama.config, seq_len=11, batch_size=3)
    assert evaluate.cache_bytes(out.past_key_values) == expected == 2 * 2 * 2 * 16 * 11 * 3 * 4


def test_cache_bytes_rejects_non_caches():
    with pytest.raises(TypeError, match="past_key_values"):
        evaluate.cache_bytes([(torch.zeros(2), torch.zeros(2))])


def test_device_and_dtype_errors_name_the_parameter():
    with pytest.raises(ValueError, match="device 'gpu0'"):
        evaluate.memory_bandwidth(size_mib=1, device="gpu0")
    with pytest.raises(TypeError, match="device"):
        evaluate.peak_memory(lambda: None, device=0)
    with pytest.raises(TypeError, match="dtype"):
        evaluate.matmul_flops(size=8, dtype=torch.int8)


def test_kv_cache_formula_validates(tiny_llama):
    with pytest.raises(ValueError, match="seq_len"):
        evaluate.kv_cache_bytes(tiny_llama.config, seq_len=0)
    with pytest.raises(TypeError, match="dtype"):
        evaluate.kv_cache_bytes(tiny_llama.config, seq_len=4, dtype="fp16")


def test_matmul_flops_is_plausible():
    assert 1e8 < evaluate.matmul_flops(size=256, repeats=3) < 1e16


def test_side_by_side_alternates_models_and_collects_rounds():
    calls = []

    def measure(model):
        calls.append(model)
        return evaluate.Timing([0.1 * len(calls)], tokens=7)

    result = evaluate.side_by_side({"a": "model-a", "b": "model-b"}, measure, rounds=3)
    assert calls == ["model-a", "model-b"] * 4  # a warm-up round, then three timed rounds
    assert result["a"].times_s == pytest.approx([0.3, 0.5, 0.7]) and result["a"].tokens == 7
    assert result["b"].times_s == pytest.approx([0.4, 0.6, 0.8])
    calls.clear()
    result = evaluate.side_by_side({"a": "model-a", "b": "model-b"}, measure, rounds=1, warmup_rounds=0)
    assert calls == ["model-a", "model-b"] and result["a"].times_s == pytest.approx([0.1])


def test_side_by_side_validates():
    with pytest.raises(ValueError, match="models"):
        evaluate.side_by_side({}, lambda m: None)
    with pytest.raises(ValueError, match="rounds"):
        evaluate.side_by_side({"a": 1}, lambda m: None, rounds=0)
    with pytest.raises(ValueError, match="warmup_rounds"):
        evaluate.side_by_side({"a": 1}, lambda m: None, warmup_rounds=-1)


def test_pareto_frontier_keeps_the_points_nothing_beats():
    points = {"big": (10, 1.0), "mid": (5, 2.0), "worse mid": (6, 2.5), "tie": (5, 2.0), "small": (1, 9.0),
              "dominated": (10, 1.5)}
    assert evaluate.pareto_frontier(points) == ["small", "mid", "tie", "big"]
    assert evaluate.pareto_frontier({"only": (1.0, 1.0)}) == ["only"]
    assert evaluate.pareto_frontier({"a": (5, 2.0), "larger, as good": (6, 2.0)}) == ["a"]
    with pytest.raises(ValueError, match="non-empty"):
        evaluate.pareto_frontier({})
    with pytest.raises(ValueError, match="points\\['x'\\]"):
        evaluate.pareto_frontier({"x": (1.0, float("nan"))})


def test_perplexities_are_perplexity_per_named_set(tiny_llama):
    torch.manual_seed(0)
    blocks = {"a": torch.randint(0, tiny_llama.config.vocab_size, (2, 12)),
              "b": torch.randint(0, tiny_llama.config.vocab_size, (3, 12))}
    ppl = evaluate.perplexities(tiny_llama, blocks)
    assert list(ppl) == ["a", "b"]
    assert ppl == {name: evaluate.perplexity(tiny_llama, named) for name, named in blocks.items()}
    with pytest.raises(ValueError, match="blocks"):
        evaluate.perplexities(tiny_llama, {})
    with pytest.raises(ValueError, match="blocks"):
        evaluate.perplexities(tiny_llama, blocks["a"])


def test_scores_keep_the_block_losses_for_intervals_and_paired_ratios(tiny_llama):
    torch.manual_seed(0)
    blocks = {"a": torch.randint(0, tiny_llama.config.vocab_size, (4, 12)),
              "b": torch.randint(0, tiny_llama.config.vocab_size, (3, 12))}
    scores = evaluate.perplexities(tiny_llama, blocks)
    assert isinstance(scores, evaluate.Scores)
    assert repr(scores) == repr(dict(scores)) and evaluate.rounded(scores) == evaluate.rounded(dict(scores))
    assert torch.equal(scores.block_nll["a"], evaluate.block_nll(tiny_llama, blocks["a"]))
    interval = scores.interval()["a"]
    assert interval.estimate == pytest.approx(scores["a"]) and interval.low <= scores["a"] <= interval.high
    assert all(r.estimate == 1.0 and r.low == r.high == 1.0 for r in scores.ratio(scores).values())
    worse = evaluate.Scores({name: nll + 0.1 for name, nll in scores.block_nll.items()})  # every block worse
    ratio = worse.ratio(scores)
    assert ratio["b"].estimate == pytest.approx(math.exp(0.1)) and ratio["b"].excludes(1.0)
    assert ratio == {name: evaluate.paired_ratio(worse.block_nll[name], scores.block_nll[name]) for name in blocks}
    with pytest.raises(ValueError, match="reference"):
        worse.ratio(evaluate.Scores({"a": scores.block_nll["a"]}))
    with pytest.raises(ValueError, match="block_nll\\['a'\\]"):
        evaluate.Scores({"a": torch.tensor([])})
    with pytest.raises(ValueError, match="block_nll"):
        evaluate.Scores({})


def test_rounded_rounds_every_value_and_checks_digits():
    assert evaluate.rounded({"x": 40.6949, "y": 43.3351}) == {"x": 40.69, "y": 43.34}
    assert evaluate.rounded({"x": 1.23456}, digits=3) == {"x": 1.235}
    with pytest.raises(ValueError, match="digits"):
        evaluate.rounded({"x": 1.0}, digits=-1)
    with pytest.raises(TypeError, match="values"):
        evaluate.rounded([1.0])


# --- uncertainty --------------------------------------------------------------------------------


def test_paired_ratio_is_the_perplexity_ratio_and_its_interval_covers_the_truth():
    # Blocks whose difficulty varies a lot (shared by both models) and a model 5 % worse in NLL with
    # some per-block noise: the paired interval excludes 1, the unpaired perplexity intervals overlap.
    generator = torch.Generator().manual_seed(0)
    difficulty = 3 + torch.rand(32, generator=generator, dtype=torch.float64)  # [blocks]
    reference = difficulty
    model = difficulty + 0.05 + 0.02 * torch.randn(32, generator=generator, dtype=torch.float64)
    ratio = evaluate.paired_ratio(model, reference)
    assert ratio.estimate == pytest.approx(math.exp(model.mean() - reference.mean()))
    assert ratio.low < math.exp(0.05) < ratio.high and ratio.excludes(1.0)
    ppl, ppl_ref = evaluate.perplexity_interval(model), evaluate.perplexity_interval(reference)
    assert ppl.estimate == pytest.approx(math.exp(model.mean()))
    assert ppl.low < ppl_ref.high  # alone, neither perplexity is known well enough to order them


def test_paired_ratio_of_indistinguishable_models_includes_one():
    generator = torch.Generator().manual_seed(1)
    reference = 3 + torch.rand(16, generator=generator, dtype=torch.float64)
    model = reference + 0.05 * torch.randn(16, generator=generator, dtype=torch.float64)
    model = model - (model - reference).mean()  # the same mean NLL: ratio exactly 1
    ratio = evaluate.paired_ratio(model, reference)
    assert ratio.estimate == pytest.approx(1.0) and not ratio.excludes(1.0)
    assert ratio.low < 1 < ratio.high


def test_bootstrap_coverage_is_about_the_confidence():
    # Independent normal per-block differences: the 90 % interval of the ratio covers the true ratio in
    # about 90 % of 200 independent experiments (the percentile bootstrap on 20 blocks undercovers a little).
    generator = torch.Generator().manual_seed(2)
    covered = 0
    for trial in range(200):
        reference = 3 + torch.rand(20, generator=generator, dtype=torch.float64)
        model = reference + 0.1 + 0.1 * torch.randn(20, generator=generator, dtype=torch.float64)
        interval = evaluate.paired_ratio(model, reference, confidence=0.9, n_resamples=2000, seed=trial)
        covered += not interval.excludes(math.exp(0.1))
    assert 0.8 <= covered / 200 <= 0.96


def test_intervals_are_deterministic_and_formatted():
    nll = 3 + torch.rand(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    first, again = evaluate.perplexity_interval(nll), evaluate.perplexity_interval(nll)
    assert first == again and first.low <= first.estimate <= first.high
    assert evaluate.perplexity_interval(nll, seed=1) != first  # the seed is used
    assert format(evaluate.Interval(1.2134, 1.17, 1.25, 0.95), ".2f") == "1.21 [1.17, 1.25]"


@pytest.mark.parametrize("kwargs, match", [
    (dict(nll=torch.tensor([3.0])), "nll must be a 1-D"),
    (dict(nll=torch.tensor([[3.0, 3.1]])), "nll must be a 1-D"),
    (dict(nll=torch.tensor([3, 4])), "nll must be a 1-D floating-point"),
    (dict(nll=torch.tensor([3.0, float("nan")])), "nll holds NaN"),
    (dict(reference_nll=torch.tensor([3.0, 3.1, 3.2])), "same blocks"),
    (dict(reference_nll=[3.0, 3.1]), "reference_nll must be"),
    (dict(confidence=1.0), "confidence must be"),
    (dict(confidence=95), "confidence must be"),
    (dict(n_resamples=0), "n_resamples"),
    (dict(seed=-1), "seed"),
])
def test_paired_ratio_validates(kwargs, match):
    args = dict(nll=torch.tensor([3.0, 3.1]), reference_nll=torch.tensor([3.0, 3.0]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate.paired_ratio(**args)


def test_format_intervals_prints_each_name_with_its_interval():
    intervals = {"a": evaluate.Interval(0.7214, 0.6291, 0.8325, 0.95), "b": evaluate.Interval(1.0, 0.99, 1.01, 0.95)}
    assert evaluate.format_intervals(intervals) == "a 0.721 [0.629, 0.833]  b 1.000 [0.990, 1.010]"
    assert evaluate.format_intervals(intervals, ".2f") == "a 0.72 [0.63, 0.83]  b 1.00 [0.99, 1.01]"
    with pytest.raises(TypeError, match="intervals"):
        evaluate.format_intervals({"a": 0.7})
