r"""Distilling step-by-step: the teacher's rationales as a second task for the student.

Hsieh et al. 2023, "Distilling Step-by-Step! Outperforming Larger Language Models with Less Training Data
and Smaller Model Sizes", arXiv:2305.02301. A **black-box** method: only the teacher's text is used, but
more of it than in sequence-level distillation. The teacher is prompted with chain of thought (few-shot
CoT in the paper) and its output for an input :math:`x_i` is split into a *rationale* :math:`\hat r_i`
and a *label* :math:`\hat y_i` (:func:`parse_rationale`). The student :math:`f` then learns two tasks
with all its weights shared, told apart by a *task prefix* prepended to the same input: with the label
prefix it predicts :math:`\hat y_i`, with the rationale prefix it generates :math:`\hat r_i`. The
paper's multi-task objective:

.. math::
    \mathcal{L} = \mathcal{L}_\text{label} + \lambda\, \mathcal{L}_\text{rationale}, \qquad
    \mathcal{L}_\text{label} = \frac1N \sum_{i=1}^N \ell\big(f(x_i), \hat y_i\big), \qquad
    \mathcal{L}_\text{rationale} = \frac1N \sum_{i=1}^N \ell\big(f(x_i), \hat r_i\big),

with :math:`\ell` the cross-entropy of the target text. Here each task's :math:`\ell` is averaged over
that task's target tokens in the batch (the prompt and padding count in neither term), as the
authors' code does with its two Hugging Face losses (it writes the mix as
:math:`\alpha\,\mathcal{L}_\text{label} + (1-\alpha)\,\mathcal{L}_\text{rationale}` and uses the
prefixes ``"predict: "`` and ``"explain: "``). :math:`\lambda = 0` is ordinary label-only distillation
on the teacher's labels (:func:`step_by_step_loss` then skips the rationale pass altogether).

Unlike a student trained to write its rationale *before* the label (a CoT student), the rationale task
never runs at test time: inference asks for the label only, so the rationale costs training compute
(a second forward and backward pass per step) and nothing at inference. The rationale is supervision,
not input: whatever the student gains from it must reach the label task through the shared weights.

Pieces, in the order the method uses them: :func:`generate_texts` (the teacher's greedy outputs),
:func:`parse_rationale` / :func:`parse_rationales` (split them), :func:`task_batch` and
:func:`multitask_batches` (the two tasks' token batches, the loss counted on the target tokens only),
:func:`task_loss` and :func:`step_by_step_loss` (the objective above), :func:`distill_step_by_step`
(training with :func:`refimpl.training.train`, both task losses logged), :func:`greedy_matches` (the
label task's exact-match accuracy, for the evaluation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from refimpl._validation import check_causal_lm, check_positive_int, check_token_ids, vocabulary_size
from refimpl.distillation import losses
from refimpl.distillation.losses import IGNORE_INDEX
from refimpl.distillation.train import generate_continuations, next_token_labels
from refimpl.runtime import model_device
from refimpl.training import TrainConfig, TrainLog, train

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: The marker that ends a rationale and introduces the label in the teacher's output ("... Answer: Paris").
ANSWER_MARKER = "Answer:"
#: The task prefixes, in the paper's notation ``[label]`` and ``[rationale]``.
LABEL_PREFIX = "[label] "
RATIONALE_PREFIX = "[rationale] "


# ---------------------------------------------------------------------------------------------------
# The teacher's chain of thought: generate, then split into (rationale, label)
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: "PreTrainedTokenizerBase", prompts: Sequence[Sequence[int]],
                   max_new_tokens: int) -> list[str]:
    """The model's greedy continuation of every prompt, decoded without special tokens and stripped.

    Prompts of equal length are generated together (:func:`~refimpl.distillation.train.generate_continuations`
    takes unpadded prompts of one length), and each stops at the model's end-of-sequence token.

    Args:
        prompts: token ids of every prompt (lists of ints), of any lengths.
        max_new_tokens: the most tokens appended to a prompt.

    Returns:
        one string per prompt, in the order of ``prompts``.
    """
    check_causal_lm("model", model)
    check_positive_int("max_new_tokens", max_new_tokens)
    _check_token_lists("prompts", prompts)
    texts, by_length = [""] * len(prompts), {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    for indices in by_length.values():
        batch = torch.tensor([list(prompts[i]) for i in indices])  # [n, P]
        sequences, generated = generate_continuations(model, batch, max_new_tokens)  # [n, P + N] each
        for i, sequence, mask in zip(indices, sequences, generated):
            texts[i] = tokenizer.decode(sequence[mask], skip_special_tokens=True).strip()
    return texts


@dataclass(frozen=True)
class Rationale:
    """A teacher output split in two: the rationale :math:`\\hat r` and the label :math:`\\hat y`."""

    rationale: str
    label: str


def parse_rationale(text: str, marker: str = ANSWER_MARKER) -> Rationale:
    """Split a chain-of-thought output at the **last** ``marker`` (case-insensitive) into the rationale
    before it and the label after it.

    The label is the first line after the marker, stripped of spaces, quotes and a final full stop
    ("Answer: Paris." -> "Paris"); the rationale is everything before the marker, stripped. The last
    marker wins, so a rationale may quote the marker ("... the answer: not Sydney ... Answer: Canberra").

    Raises:
        ValueError: naming ``text`` when it has no marker, nothing before it (no rationale) or nothing
            after it (no label) — an output that cannot train both tasks.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(marker, str) or not marker.strip():
        raise ValueError(f"marker must be a non-empty str, got {marker!r}")
    found = list(re.finditer(re.escape(marker.strip()), text, flags=re.IGNORECASE))
    if not found:
        raise ValueError(f"text has no answer marker {marker.strip()!r}: {text[:80]!r}")
    last = found[-1]
    rationale = text[:last.start()].strip()
    lines = text[last.end():].strip().splitlines()
    label = lines[0].strip().strip("\"'*`").rstrip(".").strip() if lines else ""
    if not rationale:
        raise ValueError(f"text has no rationale before its answer marker: {text[:80]!r}")
    if not label:
        raise ValueError(f"text has no label after its answer marker: {text[:80]!r}")
    return Rationale(rationale, label)


def parse_rationales(texts: Sequence[str], marker: str = ANSWER_MARKER) -> list[Rationale | None]:
    """:func:`parse_rationale` of every text, ``None`` for an output that cannot be split (no marker,
    no rationale or no label): the teacher's unusable outputs, to be dropped or counted."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
    if not isinstance(marker, str) or not marker.strip():
        raise ValueError(f"marker must be a non-empty str, got {marker!r}")
    parsed = []
    for text in texts:
        try:
            parsed.append(parse_rationale(text, marker))
        except ValueError:
            parsed.append(None)
    return parsed


# ---------------------------------------------------------------------------------------------------
# The two tasks' token batches: prompt + target, the loss on the target tokens only
# ---------------------------------------------------------------------------------------------------

def _check_token_lists(param: str, rows: Any) -> None:
    if isinstance(rows, (str, torch.Tensor)) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise ValueError(f"{param} must be a non-empty sequence of token-id lists")
    for row in rows:
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) == 0 \
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in row):
            raise ValueError(f"{param} must hold non-empty lists of non-negative int token ids, got {row!r}")


@dataclass(frozen=True)
class TaskBatch:
    """One task's batch: ``tokens`` ``[B, T]`` (prompt, then target, then padding), ``target_mask``
    ``[B, T]`` (true exactly at the target tokens) and ``labels`` ``[B, T]``, the next-token targets
    aligned with the logits (:func:`~refimpl.distillation.train.next_token_labels`): the target token a
    position predicts, ``-100`` everywhere else."""

    tokens: torch.Tensor
    target_mask: torch.Tensor
    labels: torch.Tensor


def task_batch(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int) -> TaskBatch:
    """Rows ``prompt + target``, right-padded with ``pad_id`` to the longest row; only the target
    tokens are counted (the prompt is input, padding is nothing).

    Args:
        prompts: token ids of every input, task prefix included (non-empty lists of ints).
        targets: token ids of every target, one per prompt (non-empty: the label or the rationale, with
            its end token if the student should learn to stop).
        pad_id: the padding token id (never counted, so any id of the vocabulary works).
    """
    _check_token_lists("prompts", prompts)
    _check_token_lists("targets", targets)
    if len(prompts) != len(targets):
        raise ValueError(f"prompts and targets must have the same length, got {len(prompts)} and {len(targets)}")
    if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative int token id, got {pad_id!r}")
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, T]
    target_mask = torch.zeros(len(prompts), width, dtype=torch.bool)  # [B, T]
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        end = len(prompt) + len(target)
        tokens[row, :end] = torch.tensor(list(prompt) + list(target))
        target_mask[row, len(prompt):end] = True
    return TaskBatch(tokens, target_mask, next_token_labels(tokens, target_mask))


class MultiTaskBatch(NamedTuple):
    """The same examples as the two tasks of step-by-step distillation."""

    label: TaskBatch
    rationale: TaskBatch


def multitask_batches(inputs: Sequence[str], outputs: Sequence[Rationale], prompt: Callable[[str], list[int]],
                      target: Callable[[str], list[int]], pad_id: int, batch_size: int = 4,
                      label_prefix: str = LABEL_PREFIX,
                      rationale_prefix: str = RATIONALE_PREFIX) -> list[MultiTaskBatch]:
    """The training batches of step-by-step distillation: consecutive slices of ``batch_size``
    examples, each as the label task (``prompt(label_prefix + x)`` -> ``target(label)``) and the
    rationale task (``prompt(rationale_prefix + x)`` -> ``target(rationale)``).

    Args:
        inputs: the input texts :math:`x_i`.
        outputs: one :class:`Rationale` per input (the parsed teacher output; drop unusable ones first).
        prompt: text -> prompt token ids, e.g. the student's chat template with a generation prompt.
        target: text -> target token ids, e.g. the tokenizer's ids followed by the end-of-turn token.
        pad_id: padding token id.
        batch_size: examples per batch (the last batch may be smaller).
        label_prefix, rationale_prefix: the task prefixes; they must differ, or the student could not
            tell the tasks apart.
    """
    if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs \
            or not all(isinstance(x, str) for x in inputs):
        raise ValueError("inputs must be a non-empty sequence of str")
    if isinstance(outputs, str) or not isinstance(outputs, Sequence) or len(outputs) != len(inputs) \
            or not all(isinstance(o, Rationale) for o in outputs):
        raise ValueError(f"outputs must hold one Rationale per input ({len(inputs)}); drop unusable outputs "
                         "(None from parse_rationales) together with their inputs")
    if not callable(prompt) or not callable(target):
        raise TypeError("prompt and target must be callables: text -> list of token ids")
    check_positive_int("batch_size", batch_size)
    if not isinstance(label_prefix, str) or not isinstance(rationale_prefix, str) or label_prefix == rationale_prefix:
        raise ValueError(f"label_prefix and rationale_prefix must be two different str, got {label_prefix!r} "
                         f"and {rationale_prefix!r}")
    batches = []
    for start in range(0, len(inputs), batch_size):
        xs, ys = inputs[start:start + batch_size], outputs[start:start + batch_size]
        label = task_batch([prompt(label_prefix + x) for x in xs], [target(y.label) for y in ys], pad_id)
        rationale = task_batch([prompt(rationale_prefix + x) for x in xs], [target(y.rationale) for y in ys], pad_id)
        batches.append(MultiTaskBatch(label, rationale))
    return batches


# ---------------------------------------------------------------------------------------------------
# The objective and the training
# ---------------------------------------------------------------------------------------------------

def task_loss(model: nn.Module, batch: TaskBatch) -> torch.Tensor:
    r"""One task's :math:`\ell`: the mean next-token cross-entropy over the target tokens of ``batch``
    (all rows together), for a Hugging Face causal LM; the batch is moved to the model's device."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"batch must be a TaskBatch, got {type(batch).__name__}")
    check_token_ids("batch.tokens", batch.tokens, vocabulary_size(model))
    device = model_device(model)
    logits = model(batch.tokens.to(device)).logits  # [B, T, vocab]
    return losses.target_cross_entropy(logits, batch.labels.to(device))


@torch.no_grad()
def greedy_matches(model: nn.Module, batch: TaskBatch) -> torch.Tensor:
    """``BoolTensor[B]``: whether greedy decoding from each row's prompt writes exactly its target —
    the exact-match accuracy of a task (end token included, if the targets have one).

    One forward pass instead of generation: with the target fed in (teacher forcing), greedy decoding
    follows the target as long as the model's most likely next token is the target's next token, so it
    writes the target exactly when that holds at every target position."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"batch must be a TaskBatch, got {type(batch).__name__}")
    check_causal_lm("model", model)
    check_token_ids("batch.tokens", batch.tokens, model.config.vocab_size)
    labels = batch.labels.to(model_device(model))  # [B, T]
    predicted = model(batch.tokens.to(labels.device)).logits.argmax(dim=-1)  # [B, T]
    counted = labels != IGNORE_INDEX
    return ((predicted == labels) | ~counted).all(dim=1).cpu()


class StepByStepLoss(NamedTuple):
    """:math:`\\mathcal{L}` (``total``) and its two terms; ``rationale`` is ``None`` when
    :math:`\\lambda = 0` (not computed)."""

    total: torch.Tensor
    label: torch.Tensor
    rationale: torch.Tensor | None


def _check_rationale_weight(rationale_weight: Any) -> None:
    if not isinstance(rationale_weight, (int, float)) or isinstance(rationale_weight, bool) \
            or not math.isfinite(rationale_weight) or rationale_weight < 0:
        raise ValueError(f"rationale_weight (lambda) must be a finite number >= 0, got {rationale_weight!r}")


def step_by_step_loss(model: nn.Module, batch: MultiTaskBatch, rationale_weight: float = 1.0) -> StepByStepLoss:
    r""":math:`\mathcal{L} = \mathcal{L}_\text{label} + \lambda\,\mathcal{L}_\text{rationale}` on one
    batch (module docstring), :math:`\lambda` = ``rationale_weight`` :math:`\ge 0`. The two tasks run as
    two forward passes of the same model; with :math:`\lambda = 0` the rationale pass is skipped and the
    loss is exactly label-only training's."""
    if not isinstance(batch, MultiTaskBatch):
        raise TypeError(f"batch must be a MultiTaskBatch, got {type(batch).__name__}")
    _check_rationale_weight(rationale_weight)
    label = task_loss(model, batch.label)
    if rationale_weight == 0:
        return StepByStepLoss(label, label, None)
    rationale = task_loss(model, batch.rationale)
    return StepByStepLoss(label + rationale_weight * rationale, label, rationale)


@dataclass
class StepByStepLog:
    """What :func:`distill_step_by_step` measured: the :class:`~refimpl.training.TrainLog` of the run
    (total loss, learning rates, gradient norms, seconds) and both terms of every step's loss
    (``rationale_losses`` holds NaN when :math:`\\lambda = 0`)."""

    train: TrainLog
    label_losses: list[float] = field(default_factory=list)
    rationale_losses: list[float] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return self.train.losses

    @property
    def seconds(self) -> float:
        return self.train.seconds


def distill_step_by_step(student: nn.Module, batches: Sequence[MultiTaskBatch], config: TrainConfig,
                         rationale_weight: float = 1.0, desc: str | None = None) -> StepByStepLog:
    r"""Train ``student`` in place on :math:`\mathcal{L}_\text{label} + \lambda\,\mathcal{L}_\text{rationale}`
    with the shared loop :func:`refimpl.training.train` (AdamW, schedule, clipping, seeded: the same
    arguments give the same student); step :math:`t` uses ``batches[t % len(batches)]``.

    Args:
        student: a Hugging Face causal LM; its parameters that require gradients train.
        batches: from :func:`multitask_batches`.
        config: steps, learning rate, schedule and seed (:class:`~refimpl.training.TrainConfig`).
        rationale_weight: :math:`\lambda \ge 0`; 0 trains on the labels only (the baseline).
        desc: progress-bar label.

    Returns:
        a :class:`StepByStepLog`. An error leaves ``student`` as it was (:func:`refimpl.training.train`
        restores it).
    """
    check_causal_lm("student", student)
    if isinstance(batches, MultiTaskBatch) or not isinstance(batches, Sequence) or len(batches) == 0 \
            or not all(isinstance(b, MultiTaskBatch) for b in batches):
        raise ValueError("batches must be a non-empty sequence of MultiTaskBatch (from multitask_batches)")
    _check_rationale_weight(rationale_weight)
    for i, batch in enumerate(batches):
        for task, part in batch._asdict().items():
            check_token_ids(f"batches[{i}].{task}.tokens", part.tokens, student.config.vocab_size, "student")
    label_losses, rationale_losses = [], []

    def loss_fn(model: nn.Module, batch: MultiTaskBatch) -> torch.Tensor:
        loss = step_by_step_loss(model, batch, rationale_weight)
        label_losses.append(loss.label.item())
        rationale_losses.append(math.nan if loss.rationale is None else loss.rationale.item())
        return loss.total

    name = desc or ("label only" if rationale_weight == 0 else f"step-by-step (lambda={rationale_weight:g})")
    log = train(student, batches, loss_fn, config, desc=name)
    return StepByStepLog(log, label_losses, rationale_losses)
