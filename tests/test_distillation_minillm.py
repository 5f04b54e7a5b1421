"""refimpl.distillation.minillm: on tiny models whose responses can all be enumerated, the expectation of
MiniLLM's gradient estimate equals the gradient of the exact sequence-level reverse KL (plain, with the
single-step decomposition, with unclipped exact importance weights under teacher-mixed sampling, with and
without end-of-sequence tokens), while clipping, length normalization and the paper's single-token
weights move it (they are biased); the sampler draws from the mixture α p + (1 - α) q and records what
a full forward pass computes; training lowers the exact KL, deterministically; bad arguments get errors
that name them and leave the student as it was."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tiny import make_tiny_llama
from refimpl.distillation import minillm as mm
from refimpl.training import TrainConfig, next_token_loss

VOCAB, PROMPT_LEN, T = 6, 2, 3  # 6**3 = 216 responses of 3 tokens
EOS = 2  # LlamaConfig's default eos_token_id, in the tiny models' generation_config
PROMPTS = torch.tensor([[1, 3], [4, 0], [5, 5], [0, 2]])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(seed: int, layers: int, vocab_size: int = VOCAB) -> nn.Module:
    # a larger init scale than the default gives peaked, dissimilar next-token distributions
    return make_tiny_llama(seed, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3)


@pytest.fixture
def teacher():
    return _tiny(0, layers=2)


@pytest.fixture
def student():
    return _tiny(1, layers=1)


def _responses(length: int, eos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every response of ``length`` tokens ``[n, length]`` and its mask. With ``eos``, a response ends at
    its first ``eos`` and is padded with ``eos`` (as the sampler pads it), so each appears once."""
    ys = torch.tensor(list(itertools.product(range(VOCAB), repeat=length)))  # [V**length, length]
    if eos is None:
        return ys, torch.ones_like(ys, dtype=torch.bool)
    is_eos = ys == eos
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first eos
    keep = (~after | is_eos).all(dim=1)  # only eos after the first eos
    return ys[keep], ~after[keep]


def _scored(student, teacher, prompt, ys, mask, alpha):
    """The enumerated responses as SampledResponses, with log q(y|x) (with gradient), log p(y|x) and the
    log-probability of sampling them from the mixture, per response ``[n]``."""
    tokens = torch.cat([prompt.expand(len(ys), -1), ys], dim=1)  # [n, P + T]
    log_q = F.log_softmax(student(tokens).logits[:, PROMPT_LEN - 1:-1], -1).gather(-1, ys[..., None])[..., 0]
    with torch.no_grad():
        log_p = F.log_softmax(teacher(tokens).logits[:, PROMPT_LEN - 1:-1], -1).gather(-1, ys[..., None])[..., 0]
    log_mix = torch.logaddexp(math.log(alpha) + log_p, math.log1p(-alpha) + log_q) if alpha > 0 else log_q
    rho = torch.where(mask, (log_q - log_mix).exp(), 1.0).detach()
    samples = mm.SampledResponses(tokens, PROMPT_LEN, mask, log_q.detach(), log_p, rho, alpha)
    per_response = lambda x: (x * mask).sum(dim=1)  # noqa: E731
    return samples, per_response(log_q), per_response(log_p), per_response(log_mix).detach()


def _gradients(student, teacher, eos, alpha, **options):
    """(the gradient of the exact KL(q(y|x) || p(y|x)), the exact expectation of the estimate), flattened."""
    ys, mask = _responses(T, eos)
    samples, log_q, log_p, log_sampling = _scored(student, teacher, PROMPTS[:1], ys, mask, alpha)
    assert torch.allclose(log_q.exp().sum(), torch.tensor(1.0), atol=1e-5)  # every response once
    params = [p for p in student.parameters() if p.requires_grad]
    exact_kl = (log_q.exp() * (log_q - log_p)).sum()
    exact = torch.autograd.grad(exact_kl, params)
    surrogate = mm.minillm_loss(student, teacher, samples, reduction="none", **options)  # [n]
    expected = torch.autograd.grad((log_sampling.exp() * surrogate).sum(), params)  # sum_y p~(y) grad s(y)
    return torch.cat([g.flatten() for g in exact]), torch.cat([g.flatten() for g in expected])


def _relative_error(exact, expected):
    return ((expected - exact).abs().max() / exact.abs().max()).item()


# Both sides are float32 sums over 216 responses x 3 tokens of terms larger than the result (rewards of
# several nats times probabilities), so they agree to float32 rounding only: the measured relative
# errors (largest difference over the largest gradient entry) are 5.5e-7 to 6.5e-7 here, and 1e-5
# leaves a factor of 15 for another machine's summation order. The biased variants are off by 9e-2
# to 0.46, four orders of magnitude beyond it.
TOLERANCE = 1e-5
UNBIASED = dict(length_norm=False, clip_range=None, importance="prefix")


@pytest.mark.parametrize("eos", [None, EOS], ids=["fixed-length", "eos"])
@pytest.mark.parametrize("single_step", [False, True], ids=["plain", "single-step"])
@pytest.mark.parametrize("alpha", [0.0, 0.2], ids=["on-policy", "teacher-mixed"])
def test_the_estimate_is_the_gradient_of_the_sequence_level_kl_in_expectation(student, teacher, eos, single_step,
                                                                               alpha):
    exact, expected = _gradients(student, teacher, eos, alpha, single_step=single_step, **UNBIASED)
    assert exact.abs().max() > 1e-2  # a gradient worth comparing
    assert _relative_error(exact, expected) < TOLERANCE


@pytest.mark.parametrize("biased, alpha", [
    (dict(clip_range=0.2), 0.2),  # clipped importance weights
    (dict(importance="token"), 0.2),  # the paper's single-token weights
    (dict(length_norm=True), 0.0),  # R^Norm
    (dict(length_norm=True), 0.2),
], ids=["clipped", "token-weights", "length-norm", "length-norm-mixed"])
@pytest.mark.parametrize("single_step", [False, True], ids=["plain", "single-step"])
def test_clipping_token_weights_and_length_normalization_are_biased(student, teacher, biased, alpha, single_step):
    options = {**UNBIASED, **biased}
    if "clip_range" in biased:  # some weights lie outside [0.8, 1.2], so clipping changes something
        samples = _scored(student, teacher, PROMPTS[:1], *_responses(T, None), alpha)[0]
        weights = samples.importance_weights.cumprod(dim=1)
        assert ((weights < 0.8) | (weights > 1.2)).any()
    exact, expected = _gradients(student, teacher, None, alpha, single_step=single_step, **options)
    assert _relative_error(exact, expected) > 1e-2


def test_the_paper_defaults_point_downhill_in_expectation(student, teacher):
    """Biased, but still a descent direction: positive inner product with the exact gradient."""
    exact, expected = _gradients(student, teacher, EOS, 0.2)
    assert torch.dot(exact, expected) > 0.5 * exact.norm() * expected.norm()


def test_mean_reduction_averages_the_responses(student, teacher):
    samples = mm.sample_responses(student, teacher, PROMPTS, T, seed=3)
    per_response = mm.minillm_loss(student, teacher, samples, reduction="none")
    assert per_response.shape == (4,)
    assert torch.allclose(mm.minillm_loss(student, teacher, samples), per_response.mean())


# --- the sampler -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_sampled_frequencies_match_the_mixture(student, teacher, alpha):
    n, length = 20000, 2
    samples = mm.sample_responses(student, teacher, PROMPTS[:1].expand(n, -1), length, alpha=alpha, seed=0)
    ys, mask = _responses(length, EOS)  # the sampler pads after eos with eos: one row per response
    _, log_q, _, log_mixture = _scored(student, teacher, PROMPTS[:1], ys, mask, alpha)
    index = {tuple(y): i for i, y in enumerate(ys.tolist())}
    counts = torch.bincount(torch.tensor([index[tuple(y)] for y in samples.tokens[:, PROMPT_LEN:].tolist()]),
                            minlength=len(ys))
    frequency = counts / n

    def max_z(probability):  # the largest deviation in standard errors of a binomial frequency
        probability = probability.detach()
        return ((frequency - probability).abs() / (probability * (1 - probability) / n).sqrt().clamp(min=1e-4)).max()

    assert max_z(log_mixture.exp()) < 4.5  # 4.5 sigma over 26 responses: a false alarm below 1e-4
    if alpha > 0:  # the test can tell the mixture from the student alone
        assert max_z(log_q.exp()) > 10


def test_the_recorded_log_probs_and_weights_are_those_of_a_full_forward_pass(student, teacher):
    samples = mm.sample_responses(student, teacher, PROMPTS, 4, alpha=0.2, seed=1)
    ys, mask = samples.tokens[:, PROMPT_LEN:], samples.mask
    tokens = samples.tokens
    with torch.no_grad():
        log_q = F.log_softmax(student(tokens).logits[:, PROMPT_LEN - 1:-1], -1).gather(-1, ys[..., None])[..., 0]
        log_p = F.log_softmax(teacher(tokens).logits[:, PROMPT_LEN - 1:-1], -1).gather(-1, ys[..., None])[..., 0]
    rho = (log_q - torch.logaddexp(math.log(0.2) + log_p, math.log(0.8) + log_q)).exp()
    # the KV cache adds in another order than the full pass: float32 rounding only
    assert torch.allclose(samples.student_log_probs[mask], log_q[mask], atol=1e-5)
    assert torch.allclose(samples.teacher_log_probs[mask], log_p[mask], atol=1e-5)
    assert torch.allclose(samples.importance_weights[mask], rho[mask], atol=1e-5)
    assert (samples.importance_weights[~mask] == 1).all()


def test_responses_stop_at_eos_and_sampling_is_seeded(student, teacher):
    prompts = PROMPTS.repeat(16, 1)  # [64, 2]
    samples = mm.sample_responses(student, teacher, prompts, 5, seed=7)
    ys, mask = samples.tokens[:, PROMPT_LEN:], samples.mask
    is_eos = ys == EOS
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), 5)  # [64]
    assert is_eos.any() and not is_eos.all(1).all()
    assert torch.equal(mask, torch.arange(5)[None] <= first[:, None])  # up to and including the first eos
    assert (ys[~mask] == EOS).all()  # padding
    again = mm.sample_responses(student, teacher, prompts, 5, seed=7)
    assert torch.equal(again.tokens, samples.tokens)
    assert not torch.equal(mm.sample_responses(student, teacher, prompts, 5, seed=8).tokens, samples.tokens)
    no_eos = mm.sample_responses(student, teacher, prompts, 5, seed=7, stop_at_eos=False)
    assert no_eos.mask.all()


def test_the_loss_ignores_tokens_after_the_end_of_the_response(student, teacher):
    samples = mm.sample_responses(student, teacher, PROMPTS.repeat(4, 1), 4, seed=2)
    assert not samples.mask.all()
    changed_padding = samples.tokens.clone()
    changed_padding[:, PROMPT_LEN:][~samples.mask] = 0
    other = mm.SampledResponses(changed_padding, PROMPT_LEN, samples.mask, samples.student_log_probs + ~samples.mask,
                                samples.teacher_log_probs, samples.importance_weights, samples.alpha)
    assert torch.allclose(mm.minillm_loss(student, teacher, samples, reduction="none"),
                          mm.minillm_loss(student, teacher, other, reduction="none"), atol=1e-6)


# --- training ----------------------------------------------------------------------------------------


def _exact_kl(student, teacher) -> float:
    """KL(q(y|x) || p(y|x)) over all responses of T tokens ending at eos, averaged over PROMPTS."""
    ys, mask = _responses(T, EOS)
    with torch.no_grad():
        kls = []
        for prompt in PROMPTS:
            _, log_q, log_p, _ = _scored(student, teacher, prompt[None], ys, mask, 0.0)
            kls.append((log_q.exp() * (log_q - log_p)).sum())
    return torch.stack(kls).mean().item()


def test_training_lowers_the_sequence_level_kl_deterministically(teacher):
    config = TrainConfig(steps=30, lr=1e-2, seed=1)
    students = [_tiny(1, layers=1), _tiny(1, layers=1)]
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = _exact_kl(students[0], teacher)
    logs = [mm.minillm_train(s, teacher, PROMPTS, config, max_new_tokens=T, batch_size=4) for s in students]
    after = _exact_kl(students[0], teacher)
    assert after < 0.5 * before, (before, after)  # 4.59 -> 1.13 nats here
    assert logs[0].losses == logs[1].losses  # same seed: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(students[0].parameters(), students[1].parameters()))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not students[0].training and not teacher.training  # modes restored


def test_the_pt_loss_is_added_with_its_weight(teacher):
    pt_data = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(steps=1, lr=1e-3)
    runs = {}
    for weight in (0.0, 0.5):
        student = _tiny(1, layers=1)
        initial_pt_loss = next_token_loss(student.train(), pt_data).item()
        runs[weight] = mm.minillm_train(student.eval(), teacher, PROMPTS, config, T, pt_data=pt_data,
                                        pt_weight=weight).losses[0]
    assert runs[0.5] - runs[0.0] == pytest.approx(0.5 * initial_pt_loss, rel=1e-5)


# --- validation --------------------------------------------------------------------------------------


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()], \
        model.training


def _assert_unchanged(model, state):
    values, flags, training = state
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in values.items())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training == training
    assert all(p.grad is None for p in model.parameters())


BAD_TRAIN_ARGUMENTS = [
    (dict(alpha=1.0), ValueError, r"alpha must be a number in \[0, 1\)"),
    (dict(alpha=-0.1), ValueError, r"alpha must be a number in \[0, 1\)"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be a number in \[0, 1\)"),
    (dict(alpha=True), ValueError, r"alpha must be a number in \[0, 1\)"),
    (dict(max_new_tokens=0), ValueError, r"max_new_tokens must be a positive int"),
    (dict(config=TrainConfig(steps=0)), ValueError, r"steps must be a positive int"),
    (dict(config={"steps": 3}), TypeError, r"config must be a TrainConfig"),
    (dict(prompts=PROMPTS.index_fill(1, torch.tensor([1]), VOCAB)), ValueError,
     r"prompts must hold token ids in \[0, 6\), below the student's vocabulary size 6"),
    (dict(prompts=-PROMPTS - 1), ValueError, r"prompts must hold token ids in \[0, 6\)"),
    (dict(prompts=PROMPTS.float()), TypeError, r"prompts must be a LongTensor"),
    (dict(pt_data=torch.full((2, 4), VOCAB)), ValueError, r"pt_data must hold token ids in \[0, 6\)"),
    (dict(pt_weight=-1.0), ValueError, r"pt_weight must be a finite number >= 0"),
    (dict(pt_weight=float("inf")), ValueError, r"pt_weight must be a finite number >= 0"),
    (dict(clip_range=0.0), ValueError, r"clip_range must be None or a number in \(0, 1\)"),
    (dict(clip_range=1.5), ValueError, r"clip_range must be None or a number in \(0, 1\)"),
    (dict(importance="sequence"), ValueError, r"importance must be one of \['token', 'prefix'\]"),
    (dict(single_step=1), TypeError, r"single_step must be a bool"),
    (dict(length_norm=None), TypeError, r"length_norm must be a bool"),
    (dict(stop_at_eos="yes"), TypeError, r"stop_at_eos must be a bool"),
    (dict(batch_size=0), ValueError, r"batch_size must be a positive int"),
    (dict(teacher="vocabulary 7"), ValueError, r"student and teacher must share a vocabulary, got 6 and 7"),
    (dict(teacher="a Linear"), TypeError, r"teacher must be a Hugging Face causal LM"),
    (dict(teacher="the student"), ValueError, r"student and teacher must be different models"),
]
BAD_TEACHERS = {"vocabulary 7": lambda student: _tiny(0, layers=1, vocab_size=7),
                "a Linear": lambda student: nn.Linear(4, 4), "the student": lambda student: student}


@pytest.mark.parametrize("override, error, message", BAD_TRAIN_ARGUMENTS,
                         ids=[f"{next(iter(o))}-{i}" for i, (o, _, _) in enumerate(BAD_TRAIN_ARGUMENTS)])
def test_bad_training_arguments_are_refused_before_anything_changes(student, teacher, override, error, message):
    arguments = dict(student=student, teacher=teacher, prompts=PROMPTS, config=TrainConfig(steps=2, lr=1e-2),
                     max_new_tokens=T, pt_data=None)
    arguments.update(override)
    if isinstance(arguments["teacher"], str):
        arguments["teacher"] = BAD_TEACHERS[arguments["teacher"]](student)
    before = _state(student)
    with pytest.raises(error, match=message):
        mm.minillm_train(**arguments)
    _assert_unchanged(student, before)


def test_a_non_causal_lm_student_is_refused(teacher):
    with pytest.raises(TypeError, match="student must be a Hugging Face causal LM"):
        mm.minillm_train(nn.Linear(4, 4), teacher, PROMPTS, TrainConfig(steps=1), T)


def test_training_that_diverges_half_way_leaves_the_student_whole(student, teacher):
    before = _state(student)
    with pytest.raises((FloatingPointError, ValueError)):  # a non-finite loss, or NaN logits when sampling
        mm.minillm_train(student, teacher, PROMPTS, TrainConfig(steps=3, lr=1e30), T)
    _assert_unchanged(student, before)


@pytest.mark.parametrize("call, error, message", [
    (lambda s, t: mm.sample_responses(s, t, PROMPTS, T, alpha=1.0), ValueError, r"alpha must be a number in \[0, 1\)"),
    (lambda s, t: mm.sample_responses(s, t, PROMPTS, 0), ValueError, r"max_new_tokens must be a positive int"),
    (lambda s, t: mm.sample_responses(s, t, PROMPTS + VOCAB, T), ValueError,
     r"prompts must hold token ids in \[0, 6\)"),
    (lambda s, t: mm.sample_responses(s, t, PROMPTS, T, seed=-1), ValueError, r"seed must be a non-negative int"),
    (lambda s, t: mm.sample_responses(s, nn.Linear(2, 2), PROMPTS, T), TypeError,
     r"teacher must be a Hugging Face causal LM"),
    (lambda s, t: mm.minillm_loss(s, t, PROMPTS), TypeError, r"samples must be SampledResponses"),
    (lambda s, t: mm.minillm_loss(s, t, mm.sample_responses(s, t, PROMPTS, T), reduction="sum"), ValueError,
     r"reduction must be one of \['mean', 'none'\]"),
    (lambda s, t: mm.minillm_loss(s, t, mm.sample_responses(s, t, PROMPTS, T), importance="exact"), ValueError,
     r"importance must be one of"),
    (lambda s, t: mm.SampledResponses(PROMPTS, 2, torch.ones(4, 0, dtype=torch.bool), *[torch.zeros(4, 0)] * 3, 0.0),
     ValueError, r"prompt_len must be an int in \[1, 2\)"),
    (lambda s, t: mm.SampledResponses(PROMPTS, 1, torch.ones(4, 1), *[torch.zeros(4, 1)] * 3, 0.0), ValueError,
     r"mask must be a bool tensor of shape \(4, 1\)"),
    (lambda s, t: mm.SampledResponses(PROMPTS, 1, torch.ones(4, 1, dtype=torch.bool), torch.zeros(4, 2),
                                      *[torch.zeros(4, 1)] * 2, 0.0), ValueError,
     r"student_log_probs must be a floating-point tensor of shape \(4, 1\)"),
    (lambda s, t: mm.SampledResponses(PROMPTS, 1, torch.ones(4, 1, dtype=torch.bool), *[torch.zeros(4, 1)] * 3, 1),
     ValueError, r"alpha must be a number in \[0, 1\)"),
], ids=["alpha", "max_new_tokens", "prompts", "seed", "teacher", "samples", "reduction", "importance", "prompt_len",
        "mask", "student_log_probs", "samples-alpha"])
def test_the_sampler_and_the_loss_check_their_arguments(student, teacher, call, error, message):
    before = _state(student)
    with pytest.raises(error, match=message):
        call(student, teacher)
    _assert_unchanged(student, before)
