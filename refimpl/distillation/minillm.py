r"""MiniLLM: sequence-level reverse-KL distillation on the student's own samples, by policy gradient.

Gu, Dong, Wei, Huang 2024, "MiniLLM: Knowledge Distillation of Large Language Models", arXiv:2306.08543,
§2.1–2.3. The student :math:`q_\theta` is trained to minimise the reverse KL between *sequence*
distributions, mode-seeking, so it does not spread mass over what the teacher :math:`p` finds unlikely
(Eq. 1):

.. math:: \mathcal{L}(\theta) = \mathrm{KL}\big(q_\theta(y|x) \,\Vert\, p(y|x)\big)
          = -\mathop{\mathbb{E}}_{x \sim p_x,\, y \sim q_\theta(\cdot|x)} \log \frac{p(y|x)}{q_\theta(y|x)}.

Its gradient is a policy gradient with per-token rewards
:math:`r_t = \log \frac{p(y_t|y_{<t},x)}{q_\theta(y_t|y_{<t},x)}` and returns
:math:`R_t = \sum_{t'=t}^{T} r_{t'}` (Eq. 2, the policy gradient theorem):

.. math:: \nabla\mathcal{L}(\theta) = -\mathop{\mathbb{E}}_{y \sim q_\theta}
          \sum_{t=1}^{T} (R_t - 1)\, \nabla \log q_\theta(y_t|y_{<t},x).

The paper's three ways to reduce its variance (§2.2), each a flag of :func:`minillm_loss`:

1. **Single-step decomposition** (Eq. 3): split :math:`R_t = r_t + R_{t+1}`; the step-:math:`t` part has
   the exact expectation over the vocabulary :math:`-\nabla\mathbb{E}_{y_t\sim q_\theta(t)}[r_t]
   = \nabla\mathrm{KL}(q_\theta(\cdot|y_{<t},x) \Vert p(\cdot|y_{<t},x))`, computed from the full
   distributions without sampling, so :math:`\nabla\mathcal{L} = (\nabla\mathcal{L})_\text{Single}
   + (\nabla\mathcal{L})_\text{Long}` with :math:`(\nabla\mathcal{L})_\text{Long}
   = -\mathbb{E}\sum_t R_{t+1}\nabla\log q_\theta(y_t|y_{<t},x)`.
2. **Teacher-mixed sampling**: sample from :math:`\tilde p(y_t|y_{<t},x) = \alpha\, p(y_t|y_{<t},x)
   + (1-\alpha)\, q_\theta(y_t|y_{<t},x)` (α = 0.2 in the paper) and weight every term by the importance
   weight :math:`w_t = \prod_{t'\le t} q_\theta(y_{t'}|\cdot)/\tilde p(y_{t'}|\cdot)`. The paper approximates
   it by the single-token ratio :math:`w_t \approx \rho_t = q_\theta(y_t|\cdot)/\tilde p(y_t|\cdot)`
   (``importance="token"``, biased, lower variance) and clips it (``clip_range``: clamped to
   :math:`[1-\epsilon, 1+\epsilon]`, ε = 0.2, biased). With ``importance="prefix"`` the products are kept and
   every reward :math:`r_{t'}` in a return is weighted by its own prefix weight :math:`w_{t'}`
   (per-decision importance sampling): unclipped, the estimate is then unbiased.
3. **Length normalization**: the long-term return becomes the mean of the rewards it sums,
   :math:`R^\text{Norm}_{t+1} = \frac{1}{T - t}\sum_{t'=t+1}^{T} r_{t'}` (biased), against the bias
   towards short responses that a sum of negative rewards creates.

The paper also adds the language-modelling loss on pre-training data, :math:`\mathcal{L}_\text{PT}`
(§2.3), which :func:`minillm_train` adds with a weight.

Where this differs from the authors' code (microsoft/LMOps, ``minillm/``), it follows the paper: their
policy term uses :math:`R_t` (step :math:`t` included) besides the single-step term, which they do not
importance-weight; they clip :math:`\rho\,w_t` inside PPO's pessimistic objective over several epochs
per rollout, discount rewards (γ = 0.95) and clip them. Here every step samples afresh and takes one
gradient step, and the loss is the per-response sum over tokens averaged over responses (theirs: a
mean over tokens), so that its expectation is the gradient of the sequence-level KL.

Pieces in the order the method uses them: :func:`sample_responses` (the student's samples, teacher-mixed,
with the recorded :math:`\log q_\theta`, :math:`\log p` and :math:`\rho_t`), :func:`minillm_loss` (a
surrogate whose gradient is the estimate), :func:`minillm_train` (the loop, on
:func:`refimpl.training.train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._rollback import restores_on_error
from refimpl._validation import (check_choice, check_logits, check_non_negative_int, check_positive_int,
                                 check_token_ids)
from refimpl.distillation.losses import token_kl
from refimpl.distillation.train import check_teacher_student, eos_ids
from refimpl.runtime import eval_mode, model_device
from refimpl.training import TrainConfig, TrainLog, check_config, next_token_loss, train

#: How :func:`minillm_loss` weights teacher-mixed samples: the paper's single-token ratio, or the exact products.
IMPORTANCE = ("token", "prefix")


@dataclass(frozen=True)
class SampledResponses:
    """Responses ``y`` to prompts ``x`` sampled by :func:`sample_responses`, with what was recorded then.

    ``tokens`` ``[B, P + N]`` (prompt, then response); ``mask`` ``[B, N]`` true at the response tokens up
    to and including the first end-of-sequence token; ``student_log_probs`` and ``teacher_log_probs``
    ``[B, N]`` are :math:`\\log q_\\theta(y_t|y_{<t},x)` and :math:`\\log p(y_t|y_{<t},x)`, and
    ``importance_weights`` ``[B, N]`` the per-token ratios :math:`\\rho_t = q_\\theta(y_t|\\cdot)/\\tilde
    p(y_t|\\cdot)` (1 when ``alpha`` is 0), all float32 without gradient.
    """

    tokens: torch.Tensor
    prompt_len: int
    mask: torch.Tensor
    student_log_probs: torch.Tensor
    teacher_log_probs: torch.Tensor
    importance_weights: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        check_token_ids("tokens", self.tokens)
        if not isinstance(self.prompt_len, int) or isinstance(self.prompt_len, bool) \
                or not 1 <= self.prompt_len < self.tokens.shape[1]:
            raise ValueError(f"prompt_len must be an int in [1, {self.tokens.shape[1]}), got {self.prompt_len!r}")
        shape = (self.tokens.shape[0], self.tokens.shape[1] - self.prompt_len)
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool or self.mask.shape != shape:
            raise ValueError(f"mask must be a bool tensor of shape {shape}")
        for name in ("student_log_probs", "teacher_log_probs", "importance_weights"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape != shape:
                raise ValueError(f"{name} must be a floating-point tensor of shape {shape}")
        _check_alpha(self.alpha)


def _check_alpha(alpha: Any) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha < 1:
        raise ValueError(f"alpha must be a number in [0, 1) (the teacher's share of the sampling mixture), "
                         f"got {alpha!r}")


def _check_flag(param: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{param} must be a bool, got {type(value).__name__}")


def _check_options(single_step: Any, length_norm: Any, clip_range: Any, importance: Any) -> None:
    """The estimator's options of :func:`minillm_loss`."""
    _check_flag("single_step", single_step)
    _check_flag("length_norm", length_norm)
    if clip_range is not None and (not isinstance(clip_range, (int, float)) or isinstance(clip_range, bool)
                                   or not 0 < clip_range < 1):
        raise ValueError(f"clip_range must be None or a number in (0, 1), got {clip_range!r}")
    check_choice("importance", importance, IMPORTANCE)


@torch.no_grad()
def sample_responses(student: nn.Module, teacher: nn.Module, prompts: torch.Tensor, max_new_tokens: int,
                     alpha: float = 0.2, seed: int = 0, stop_at_eos: bool = True) -> SampledResponses:
    r"""Sample one response of up to ``max_new_tokens`` tokens to every prompt from the teacher-mixed
    distribution :math:`\tilde p = \alpha\,p + (1-\alpha)\,q_\theta` (§2.2; ``alpha=0``: the student alone),
    token by token with both models' KV caches, at temperature 1 and without top-k/top-p: the objective
    is the KL of :math:`q_\theta` itself. Both models run in eval mode; neither changes.

    Args:
        prompts: ``LongTensor[B, P]``, all of one length (no padding).
        alpha: the teacher's share :math:`\alpha` of the mixture, in [0, 1).
        seed: seeds a generator of its own (the global random state is left alone).
        stop_at_eos: end a response at the student's end-of-sequence token (its ``generation_config``);
            the tokens after it are padding, false in ``mask``.

    Returns:
        the :class:`SampledResponses`, on the student's device.
    """
    check_teacher_student(student, teacher)
    check_token_ids("prompts", prompts, student.config.vocab_size, "student")
    check_positive_int("max_new_tokens", max_new_tokens)
    _check_alpha(alpha)
    check_non_negative_int("seed", seed)
    _check_flag("stop_at_eos", stop_at_eos)
    device = model_device(student)
    eos = torch.tensor(eos_ids(student) if stop_at_eos else [], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = prompts.to(device)  # [B, P], grows to [B, P + N]
    batch = len(tokens)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    mask, log_q_y, log_p_y, rho = [], [], [], []
    with eval_mode(student), eval_mode(teacher):
        out_q, out_p = student(tokens, use_cache=True), teacher(tokens.to(model_device(teacher)), use_cache=True)
        for t in range(max_new_tokens):
            check_logits("the logits of student", out_q.logits[:, -1])
            check_logits("the logits of teacher", out_p.logits[:, -1])
            log_q = F.log_softmax(out_q.logits[:, -1].float(), dim=-1)  # [B, V]
            log_p = F.log_softmax(out_p.logits[:, -1].float().to(device), dim=-1)  # [B, V]
            mixture = alpha * log_p.exp() + (1 - alpha) * log_q.exp()  # p~, [B, V]
            y = torch.multinomial(mixture, 1, generator=generator)  # [B, 1]
            y = torch.where(finished[:, None], eos[:1].expand(batch, 1), y) if len(eos) else y  # padding
            mask.append(~finished)
            log_q_y.append(log_q.gather(1, y)[:, 0])
            log_p_y.append(log_p.gather(1, y)[:, 0])
            rho.append((log_q_y[-1] - mixture.gather(1, y)[:, 0].log()).exp())  # q / p~
            tokens = torch.cat([tokens, y], dim=1)
            finished |= torch.isin(y[:, 0], eos)
            if t + 1 < max_new_tokens:
                out_q = student(y, past_key_values=out_q.past_key_values, use_cache=True)
                out_p = teacher(y.to(model_device(teacher)), past_key_values=out_p.past_key_values, use_cache=True)
    mask = torch.stack(mask, dim=1)  # [B, N]
    rho = torch.where(mask, torch.stack(rho, 1), 1.0) if alpha > 0 else torch.ones_like(mask, dtype=torch.float)
    return SampledResponses(tokens, prompts.shape[1], mask, torch.stack(log_q_y, 1), torch.stack(log_p_y, 1), rho,
                            float(alpha))


def _returns(rewards: torch.Tensor, mask: torch.Tensor, first: int, length_norm: bool) -> torch.Tensor:
    """:math:`\\sum_{t' \\ge t + \\text{first}} r_{t'}` at every ``t`` of ``rewards [B, N]`` (0 past the end),
    divided by its number of terms when ``length_norm``."""
    tail = rewards.flip(1).cumsum(1).flip(1)  # [B, N]: sum over t' >= t
    count = mask.float().flip(1).cumsum(1).flip(1)  # [B, N]: terms in that sum
    if first:
        tail, count = F.pad(tail[:, 1:], (0, 1)), F.pad(count[:, 1:], (0, 1))  # t' >= t + 1
    return tail / count.clamp(min=1) if length_norm else tail


def minillm_loss(student: nn.Module, teacher: nn.Module, samples: SampledResponses, single_step: bool = True,
                 length_norm: bool = True, clip_range: float | None = 0.2, importance: str = "token",
                 reduction: str = "mean") -> torch.Tensor:
    r"""A surrogate loss whose gradient with respect to the student's parameters is MiniLLM's estimate of
    :math:`\nabla\mathcal{L}(\theta)` on ``samples`` (module docstring), so ``loss.backward()`` gives it.
    Its value is not the KL. Rewards and weights are the ones recorded at sampling time (constants); the
    gradient flows through a fresh forward pass of the student; the teacher runs without gradients.

    Per response, with weights :math:`w_t` (1 for the student's own samples) and the return :math:`G_t`
    (:math:`w_t R_t` for ``"token"`` weights, :math:`\sum_{t'\ge t} w_{t'} r_{t'}` for ``"prefix"``):

    - ``single_step=False`` (Eq. 2): :math:`-\sum_t (G_t - w_t) \log q_\theta(y_t|y_{<t},x)`;
    - ``single_step=True`` (Eq. 3): :math:`\sum_t w_t\,\mathrm{KL}(q_\theta(\cdot|y_{<t},x) \Vert
      p(\cdot|y_{<t},x)) - \sum_t G_{t+1} \log q_\theta(y_t|y_{<t},x)`, with :math:`G_{t+1}` the weighted
      :math:`R_{t+1}` (:math:`w_t R_{t+1}` for ``"token"``).

    Args:
        samples: from :func:`sample_responses` with this student and teacher, before the student changed.
        single_step: the single-step decomposition.
        length_norm: divide each return by its number of rewards (:math:`R^\text{Norm}`).
        clip_range: clip the weights to :math:`[1-\epsilon, 1+\epsilon]` (ε = 0.2 as in the authors'
            code), or None.
        importance: ``"token"`` (the paper's :math:`w_t \approx \rho_t`) or ``"prefix"`` (exact products).
        reduction: ``"mean"`` over the responses of the per-response sums over tokens (the gradient of the
            sequence-level KL averaged over prompts) or ``"none"`` (``[B]``).
    """
    check_teacher_student(student, teacher)
    if not isinstance(samples, SampledResponses):
        raise TypeError(f"samples must be SampledResponses (from sample_responses), got {type(samples).__name__}")
    check_token_ids("samples.tokens", samples.tokens, student.config.vocab_size, "student")
    _check_options(single_step, length_norm, clip_range, importance)
    check_choice("reduction", reduction, ("mean", "none"))
    device, start = model_device(student), samples.prompt_len
    tokens, mask = samples.tokens.to(device), samples.mask.to(device)  # [B, P + N], [B, N]
    m = mask.float()
    log_q_all = F.log_softmax(student(tokens).logits[:, start - 1:-1].float(), dim=-1)  # [B, N, V], with gradient
    log_q = log_q_all.gather(-1, tokens[:, start:, None])[..., 0]  # log q(y_t | y_<t, x), [B, N]
    rewards = (samples.teacher_log_probs - samples.student_log_probs).to(device).float().detach() * m  # r_t, [B, N]
    rho = torch.where(mask, samples.importance_weights.to(device).float().detach(), 1.0)  # [B, N]
    weights = rho.cumprod(dim=1) if importance == "prefix" else rho  # w_t
    if clip_range is not None:
        weights = weights.clamp(1 - clip_range, 1 + clip_range)
    weights = weights * m
    first = 1 if single_step else 0  # R_{t+1} (Eq. 3) or R_t (Eq. 2)
    if importance == "prefix":  # every reward weighted by its own prefix weight
        returns = _returns(weights * rewards, mask, first, length_norm)
    else:  # the paper: w_t times the return
        returns = weights * _returns(rewards, mask, first, length_norm)
    if single_step:
        with torch.no_grad(), eval_mode(teacher):
            logits_p = teacher(tokens.to(model_device(teacher))).logits[:, start - 1:-1]  # [B, N, V]
        log_p_all = F.log_softmax(logits_p.float().to(device), dim=-1)
        single = token_kl(log_q_all, log_p_all)  # KL(q_t || p_t) over the vocabulary, [B, N]
        per_token = weights * single - returns * log_q  # (∇L)_Single + (∇L)_Long
    else:
        per_token = -(returns - weights) * log_q  # -(R_t - 1) log q, weighted
    per_response = (per_token * m).sum(dim=1)  # [B]
    return per_response.mean() if reduction == "mean" else per_response


@restores_on_error("student")
def minillm_train(student: nn.Module, teacher: nn.Module, prompts: torch.Tensor, config: TrainConfig,
                  max_new_tokens: int, alpha: float = 0.2, single_step: bool = True, length_norm: bool = True,
                  clip_range: float | None = 0.2, importance: str = "token", pt_data: torch.Tensor | None = None,
                  pt_weight: float = 1.0, batch_size: int = 8, stop_at_eos: bool = True,
                  desc: str = "MiniLLM") -> TrainLog:
    r"""Train ``student`` in place with MiniLLM (Algorithm 1 without PPO's epochs over a rollout: every step
    samples fresh responses and takes one gradient step), on the shared loop :func:`refimpl.training.train`
    (AdamW, schedule, clipping, progress bar, a log of every step's surrogate loss).

    Step :math:`s` samples responses to its batch of prompts (:func:`sample_responses`, seed drawn from
    ``config.seed``), and minimises :func:`minillm_loss` plus, when ``pt_data`` is given,
    ``pt_weight`` times the mean next-token cross-entropy on a batch of it (:math:`\mathcal{L}_\text{PT}`).

    Args:
        prompts: ``LongTensor[n, P]``, cut into slices of ``batch_size``; with ``pt_data`` also cut,
            step :math:`s` uses pair :math:`i = s \bmod \max(n_x, n_d)` of the :math:`n_x` prompt and
            :math:`n_d` PT slices: prompt slice :math:`i \bmod n_x` and PT slice :math:`i \bmod n_d`.
        config: steps, learning rate, schedule, gradient clipping and seed.
        max_new_tokens: the longest response :math:`T`.
        alpha, single_step, length_norm, clip_range, importance: as in :func:`sample_responses` and
            :func:`minillm_loss` (defaults: the paper's).
        pt_data: ``LongTensor[m, L]`` language-modelling data, or None (no PT loss).
        pt_weight: the PT loss's weight, >= 0.
        batch_size: prompts (and PT blocks) per step.

    Returns:
        the :class:`~refimpl.training.TrainLog`. Arguments are checked before anything runs; any error
        (a non-finite loss included) leaves the student as it was. The teacher is never trained.
    """
    check_teacher_student(student, teacher)
    check_token_ids("prompts", prompts, student.config.vocab_size, "student")
    check_config(config)
    check_positive_int("max_new_tokens", max_new_tokens)
    _check_alpha(alpha)
    check_positive_int("batch_size", batch_size)
    _check_flag("stop_at_eos", stop_at_eos)
    if pt_data is not None:
        check_token_ids("pt_data", pt_data, student.config.vocab_size, "student", min_len=2)
    if not isinstance(pt_weight, (int, float)) or isinstance(pt_weight, bool) or not math.isfinite(pt_weight) \
            or pt_weight < 0:
        raise ValueError(f"pt_weight must be a finite number >= 0, got {pt_weight!r}")
    _check_options(single_step, length_norm, clip_range, importance)
    options = dict(single_step=single_step, length_norm=length_norm, clip_range=clip_range, importance=importance)

    prompt_batches = list(prompts.split(batch_size))
    pt_batches = list(pt_data.split(batch_size)) if pt_data is not None else [None]
    n_batches = max(len(prompt_batches), len(pt_batches))
    batches = [(prompt_batches[i % len(prompt_batches)], pt_batches[i % len(pt_batches)]) for i in range(n_batches)]
    seeds = torch.Generator().manual_seed(config.seed)  # one sampling seed per step

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        prompt_batch, pt_batch = batch
        seed = int(torch.randint(2**31 - 1, (), generator=seeds))
        samples = sample_responses(model, teacher, prompt_batch, max_new_tokens, alpha, seed, stop_at_eos)
        loss = minillm_loss(model, teacher, samples, **options)
        if pt_batch is not None and pt_weight > 0:
            loss = loss + pt_weight * next_token_loss(model, pt_batch)  # L_PT
        return loss

    with eval_mode(teacher):
        return train(student, batches, loss_fn, config, desc=desc)
