r"""Knowledge distillation of a causal language model: four trainers on the shared loop, one per way
to use the teacher.

Each trains a student (e.g. :func:`refimpl.distillation.student.layer_subset_student`) in place with
:func:`refimpl.training.train`; only the loss and where its tokens come from differ:

- :func:`distill_online` — **white-box** distillation (Hinton, Vinyals, Dean 2015, arXiv:1503.02531, §2):
  the teacher runs on every batch (without gradients) and the student matches its next-token
  distribution at every position, :math:`\alpha\,\tau^2 D(p_T, q_\theta) + (1-\alpha)\,\mathrm{CE}`
  (:func:`refimpl.distillation.losses.distillation_loss`; :math:`D` is forward KL, reverse KL as in
  MiniLLM, Gu et al. 2024, arXiv:2306.08543, or GKD's JSD(β)).
- :func:`distill_offline_topk` — the same loss, but the teacher runs once before training and only its
  top-:math:`k` next-token probabilities are stored (:func:`teacher_topk`, float16 values and int32
  token ids, with its measured bytes), so that training no longer needs the teacher; the loss compares
  the top-:math:`k` tokens and one remainder bucket (:class:`~refimpl.distillation.losses.SparseTeacher`).
- :func:`distill_sequence_level` — **black-box**, sequence-level distillation (Kim and Rush 2016,
  "Sequence-Level Knowledge Distillation", arXiv:1606.07947, §3.2): only the teacher's *text* is used.
  The teacher continues every prompt once, greedily (beam search of width 1 approximating the mode
  :math:`\hat y \approx \arg\max_y p_T(y \mid x)`, ending at its end-of-sequence token), and the
  student is trained with ordinary next-token cross-entropy on :math:`\hat y`, i.e.
  :math:`-\log q_\theta(\hat y \mid x)`.
- :func:`distill_on_policy` — **GKD** (Agarwal et al. 2024, "On-Policy Distillation of Language Models",
  arXiv:2306.13649, Algorithm 1): at each step, with probability :math:`\lambda` (``student_fraction``)
  the student samples continuations of the batch's prompts and the teacher scores them token by token;
  otherwise the dataset's own continuations are used. The loss, JSD(β) by default, counts only the
  continuation tokens (the prompt is input), and no gradient flows through the sampling. Training on
  its own samples addresses the train/inference mismatch of the other trainers (exposure bias): the
  student learns what the teacher would do in the states the student itself reaches.

Every trainer checks all its arguments before the student changes, uses the ``t % n_batches``-th slice
of ``batch_size`` sequences at step ``t``, and returns the :class:`~refimpl.training.TrainLog`; a
non-finite loss stops training at its step (``FloatingPointError``), and any error leaves the student as
it was (:func:`refimpl.training.train` restores it). Trained students are kept in refimpl's cache by
:mod:`refimpl.distillation.cache`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._validation import (check_causal_lm, check_choice, check_fraction, check_non_negative_int,
                                 check_positive_int, check_positive_number, check_token_ids)
from refimpl.distillation import losses
from refimpl.distillation.losses import IGNORE_INDEX, SparseTeacher
from refimpl.runtime import eval_mode, model_device
from refimpl.training import TrainConfig, TrainLog, check_config, train


@torch.no_grad()
def teacher_topk(teacher: nn.Module, blocks: torch.Tensor, k: int, temperature: float = 1.0,
                 batch_size: int = 8) -> SparseTeacher:
    """Run the teacher once over ``blocks`` and keep, at every position, its ``k`` most likely next
    tokens at ``temperature`` (float16 log-probabilities, int32 ids) and the log of the remaining mass —
    what offline distillation stores instead of the full logits (``SparseTeacher.nbytes`` measures it;
    the full float32 logits would take ``4 * vocab`` bytes per position).

    Args:
        blocks: ``LongTensor[n, seq_len]``.
        k: tokens kept per position, from 1 to the vocabulary size.
        batch_size: sequences per teacher forward pass.

    Returns:
        a :class:`SparseTeacher` with tensors ``[n, seq_len, k]`` and ``[n, seq_len]``, on the CPU.
    """
    check_causal_lm("teacher", teacher)
    check_token_ids("blocks", blocks, teacher.config.vocab_size, "teacher")
    check_positive_int("k", k)
    check_positive_int("batch_size", batch_size)
    if k > teacher.config.vocab_size:
        raise ValueError(f"k must be at most the vocabulary size {teacher.config.vocab_size}, got {k}")
    device = model_device(teacher)
    parts = []
    with eval_mode(teacher):
        for batch in blocks.split(batch_size):
            logits = teacher(batch.to(device)).logits  # [b, seq_len, vocab]
            parts.append(SparseTeacher.from_logits(logits, k, temperature).to("cpu"))
    return SparseTeacher(torch.cat([p.log_probs for p in parts]), torch.cat([p.indices for p in parts]),
                         torch.cat([p.rest_log_prob for p in parts]), parts[0].temperature)


def check_teacher_student(student: Any, teacher: Any) -> None:
    """Both causal language models, two different objects, one vocabulary; else a clear error."""
    check_causal_lm("student", student)
    check_causal_lm("teacher", teacher)
    if teacher is student:
        raise ValueError("student and teacher must be different models")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"student and teacher must share a vocabulary, got {student.config.vocab_size} "
                         f"and {teacher.config.vocab_size} tokens")


def eos_ids(model: nn.Module) -> list[int]:
    """The end-of-sequence token ids of ``model``'s ``generation_config`` (none, one or several)."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def generate_continuations(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                           temperature: float = 1.0, seed: int = 0,
                           batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue every prompt with the model's Hugging Face ``generate`` (KV cache), greedily or by
    sampling from its full next-token distribution at ``temperature`` (top-k and top-p off).

    Sampling is seeded: the global PyTorch generator is forked (the caller's random state is left as it
    was), seeded with ``seed`` and used for all batches in order, so the same arguments give the same
    tokens. A sequence stops at an end-of-sequence token (the model's ``generation_config``); what
    follows is padding.

    Args:
        prompts: ``LongTensor[n, P]``, all of the same length (no padding).
        max_new_tokens: tokens appended to each prompt, ``N``.
        do_sample: sample (True) or pick the most likely token (False).
        temperature: sampling temperature, > 0 (unused when greedy).
        seed: seed of the sampling.
        batch_size: prompts per ``generate`` call.

    Returns:
        ``(sequences, generated)``: ``LongTensor[n, P + N]`` on the model's device, and
        ``BoolTensor[n, P + N]``, true at the generated tokens up to and including the first
        end-of-sequence token — the tokens a loss on the continuation counts.
    """
    check_causal_lm("model", model)
    check_token_ids("prompts", prompts, model.config.vocab_size)
    check_positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
    check_positive_number("temperature", temperature)
    check_non_negative_int("seed", seed)
    check_positive_int("batch_size", batch_size)
    from transformers import GenerationConfig

    device = model_device(model)
    eos = eos_ids(model)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else eos[0] if eos else 0
    sampling = dict(temperature=float(temperature), top_k=0, top_p=1.0) if do_sample else {}
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                                  eos_token_id=eos or None, **sampling)
    prompt_len, total = prompts.shape[1], prompts.shape[1] + max_new_tokens
    rng_devices = [device] if device.type == "cuda" else []
    sequences = []
    with eval_mode(model), torch.random.fork_rng(devices=rng_devices, device_type=device.type):
        torch.manual_seed(seed)
        for batch in prompts.split(batch_size):
            batch = batch.to(device)
            out = model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=generation)
            sequences.append(F.pad(out, (0, total - out.shape[1]), value=pad))  # all stopped early: pad to P + N
    sequences = torch.cat(sequences)  # [n, P + N]
    generated = torch.zeros_like(sequences, dtype=torch.bool)
    generated[:, prompt_len:] = True
    if eos:
        is_eos = torch.isin(sequences[:, prompt_len:], torch.tensor(eos, device=device))  # [n, N]
        after_first_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        generated[:, prompt_len:] &= ~after_first_eos
    return sequences, generated


def next_token_labels(tokens: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with the logits of ``tokens`` ``[B, T]``: ``labels[:, t] = tokens[:, t + 1]`` where
    that token is a target (``counted[:, t + 1]``, all by default), ``-100`` elsewhere and at the last
    position, which predicts beyond the sequence."""
    labels = torch.full_like(tokens, IGNORE_INDEX)  # [B, T]
    targets = tokens[:, 1:] if counted is None else torch.where(counted[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    labels[:, :-1] = targets
    return labels


# --- what every trainer shares -------------------------------------------------------------------


def _check_student_run(student: Any, param: str, tokens: Any, config: Any, batch_size: Any) -> None:
    """The student, its training tokens ``param``, the loop's settings and the batch size."""
    check_causal_lm("student", student)
    check_token_ids(param, tokens, student.config.vocab_size, "student")
    check_config(config)
    check_positive_int("batch_size", batch_size)


def _check_divergence(loss: Any, temperature: Any, beta: Any) -> None:
    """The soft loss: its divergence (one of :data:`~refimpl.distillation.losses.KINDS`), temperature and β."""
    check_choice("loss", loss, losses.KINDS)
    check_positive_number("temperature", temperature)
    check_fraction("beta", beta, open_interval=True)


def _slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of ``batch_size`` of ``n`` rows (the last may be shorter): the batches, in order."""
    return [slice(i, i + batch_size) for i in range(0, n, batch_size)]


# --- the four trainers ---------------------------------------------------------------------------


def distill_online(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor, config: TrainConfig, *,
                   loss: str = "forward_kl", alpha: float = 1.0, temperature: float = 1.0, beta: float = 0.5,
                   batch_size: int = 8, desc: str = "distil (online)") -> TrainLog:
    r"""White-box distillation with the teacher run on every batch (Hinton et al. 2015, §2): minimise
    :math:`\alpha\,\tau^2 D(p^\tau_T, q^\tau_\theta) + (1-\alpha)\,\mathrm{CE}(y, q_\theta)` at every
    position of ``blocks``, :math:`y` the next token of the block.

    Args:
        student: the Hugging Face causal LM to train; its parameters that require gradients train.
        teacher: a causal LM with the student's vocabulary, run in eval mode without gradients.
        blocks: ``LongTensor[n, T]`` token blocks.
        config: steps, learning rate, schedule, clipping and seed (:class:`~refimpl.training.TrainConfig`).
        loss: the divergence :math:`D`: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (JSD(β)).
        alpha: weight of the soft loss against cross-entropy on the next tokens, in [0, 1].
        temperature: :math:`\tau > 0` of the soft loss.
        beta: JSD(β)'s β, in (0, 1).
        batch_size: blocks per step.
        desc: progress-bar label.

    Returns:
        the :class:`~refimpl.training.TrainLog` (module docstring: checks, errors).
    """
    _check_divergence(loss, temperature, beta)
    check_fraction("alpha", alpha)
    check_teacher_student(student, teacher)
    _check_student_run(student, "blocks", blocks, config, batch_size)
    device = model_device(student)

    def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device)  # [B, T]
        with torch.no_grad():
            teacher_logits = teacher(tokens).logits  # [B, T, vocab]
        return losses.distillation_loss(model(tokens).logits, teacher_logits, next_token_labels(tokens), loss,
                                        alpha, temperature, beta)

    with eval_mode(teacher):
        return train(student, [blocks[s] for s in _slices(len(blocks), batch_size)], loss_fn, config, desc=desc)


def distill_offline_topk(student: nn.Module, teacher: nn.Module | SparseTeacher, blocks: torch.Tensor,
                         config: TrainConfig, *, top_k: int | None = None, loss: str = "forward_kl",
                         alpha: float = 1.0, temperature: float = 1.0, beta: float = 0.5, batch_size: int = 8,
                         desc: str = "distil (offline)") -> TrainLog:
    r"""Offline white-box distillation: the loss of :func:`distill_online` against the teacher's
    top-``k`` next-token probabilities and a remainder bucket, stored once before training
    (:func:`teacher_topk`), so that no step runs the teacher.

    Args:
        teacher: a causal LM with the student's vocabulary, run once here over ``blocks`` (``top_k``
            tokens kept per position, ``batch_size`` blocks per pass); or its stored
            :class:`~refimpl.distillation.losses.SparseTeacher` over ``blocks`` at ``temperature``.
        top_k: tokens kept per position, from 1 to the vocabulary size, when ``teacher`` is a model;
            None when it is a ``SparseTeacher``.

    The other arguments and the result are those of :func:`distill_online`.
    """
    _check_divergence(loss, temperature, beta)
    check_fraction("alpha", alpha)
    if isinstance(teacher, SparseTeacher):
        if top_k is not None:
            raise ValueError("top_k must be None when teacher is already a SparseTeacher")
        _check_student_run(student, "blocks", blocks, config, batch_size)
        if teacher.log_probs.shape[:2] != blocks.shape or teacher.temperature != temperature:
            raise ValueError(f"the SparseTeacher must cover blocks {tuple(blocks.shape)} at temperature "
                             f"{temperature}, got positions {tuple(teacher.log_probs.shape[:2])} at "
                             f"{teacher.temperature}")
    else:
        check_teacher_student(student, teacher)
        _check_student_run(student, "blocks", blocks, config, batch_size)
        if top_k is None:
            raise ValueError("top_k (tokens kept per position) is needed when teacher is a model, not a SparseTeacher")
        check_positive_int("top_k", top_k)
        if top_k > teacher.config.vocab_size:
            raise ValueError(f"top_k must be at most the vocabulary size {teacher.config.vocab_size}, got {top_k}")
    device = model_device(student)
    targets = teacher if isinstance(teacher, SparseTeacher) \
        else teacher_topk(teacher, blocks, top_k, temperature, batch_size)  # the teacher's only run

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, SparseTeacher]) -> torch.Tensor:
        tokens, sparse = batch[0].to(device), batch[1].to(device)  # [B, T], [B, T, k]
        return losses.distillation_loss(model(tokens).logits, sparse, next_token_labels(tokens), loss, alpha,
                                        temperature, beta)

    batches = [(blocks[s], targets[s]) for s in _slices(len(blocks), batch_size)]
    return train(student, batches, loss_fn, config, desc=desc)


def distill_sequence_level(student: nn.Module, teacher: nn.Module, prompts: torch.Tensor, config: TrainConfig, *,
                           max_new_tokens: int, batch_size: int = 8,
                           desc: str = "distil (sequence)") -> TrainLog:
    r"""Black-box, sequence-level distillation (Kim and Rush 2016, §3.2): the teacher continues every
    prompt once, greedily (:func:`generate_continuations`), and the student minimises the cross-entropy
    :math:`-\log q_\theta(\hat y \mid x)` of those continuations, prompt tokens not counted.

    Args:
        prompts: ``LongTensor[n, P]``, all of one length.
        max_new_tokens: tokens the teacher appends to every prompt (fewer where it ends the sequence).
        batch_size: sequences per step.

    The other arguments and the result are those of :func:`distill_online`.
    """
    check_teacher_student(student, teacher)
    _check_student_run(student, "prompts", prompts, config, batch_size)
    check_positive_int("max_new_tokens", max_new_tokens)
    device = model_device(student)
    sequences, generated = generate_continuations(teacher, prompts, max_new_tokens, do_sample=False)  # [n, P + N]
    labels = next_token_labels(sequences, generated)  # the continuation's tokens only

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, labels = batch[0].to(device), batch[1].to(device)  # [B, P + N] each
        logits = model(tokens).logits  # [B, P + N, vocab]
        return losses.target_cross_entropy(logits, labels)

    batches = [(sequences[s], labels[s]) for s in _slices(len(sequences), batch_size)]
    return train(student, batches, loss_fn, config, desc=desc)


def distill_on_policy(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor, config: TrainConfig, *,
                      prompt_len: int, loss: str = "jsd", student_fraction: float = 1.0,
                      sample_temperature: float = 1.0, temperature: float = 1.0, beta: float = 0.5,
                      batch_size: int = 8, desc: str = "distil (on_policy)") -> TrainLog:
    r"""On-policy distillation, GKD (Agarwal et al. 2024, Algorithm 1): at each step, with probability
    :math:`\lambda` the student continues the batch's prompts by sampling, else the dataset's
    continuations are kept; the teacher scores every continuation token and the student minimises
    :math:`\tau^2 D(p^\tau_T, q^\tau_\theta)` over them (no gradient through the sampling). The coin
    flips and the sampling seeds come from one generator seeded with ``config.seed``.

    Args:
        blocks: ``LongTensor[n, T]``: the first ``prompt_len`` tokens of every row are the prompt, the
            rest the dataset's continuation, whose length the student's samples take.
        prompt_len: the prompt's length, in [1, T).
        loss: the divergence :math:`D` (default GKD's JSD(β)), as in :func:`distill_online`.
        student_fraction: GKD's λ, in [0, 1] (default 1: purely on-policy).
        sample_temperature: the student's sampling temperature, > 0.

    The other arguments and the result are those of :func:`distill_online` (no ``alpha``: GKD's
    loss is the divergence alone).
    """
    _check_divergence(loss, temperature, beta)
    check_fraction("student_fraction", student_fraction)
    check_positive_number("sample_temperature", sample_temperature)
    check_teacher_student(student, teacher)
    _check_student_run(student, "blocks", blocks, config, batch_size)
    seq_len = blocks.shape[1]
    if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or not 1 <= prompt_len < seq_len:
        raise ValueError(f"prompt_len must be an int in [1, {seq_len}) (the blocks' length), got {prompt_len!r}")
    device = model_device(student)
    coin = torch.Generator().manual_seed(config.seed)  # λ draws and sampling seeds, one stream

    def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device)  # [B, T]: prompt, then the dataset's continuation
        if torch.rand((), generator=coin).item() < student_fraction:  # on-policy: the student's own samples
            seed = int(torch.randint(2**31 - 1, (), generator=coin))
            tokens, generated = generate_continuations(model, tokens[:, :prompt_len], seq_len - prompt_len,
                                                       do_sample=True, temperature=sample_temperature,
                                                       seed=seed, batch_size=len(tokens))
        else:  # the dataset's continuation
            generated = torch.zeros_like(tokens, dtype=torch.bool)
            generated[:, prompt_len:] = True
        with torch.no_grad():
            teacher_logits = teacher(tokens).logits  # [B, T, vocab]
        return losses.distillation_loss(model(tokens).logits, teacher_logits, next_token_labels(tokens, generated),
                                        loss, 1.0, temperature, beta)

    with eval_mode(teacher):
        return train(student, [blocks[s] for s in _slices(len(blocks), batch_size)], loss_fn, config, desc=desc)
