r"""Token-level distillation losses between a teacher's and a student's next-token distributions.

With teacher logits :math:`z^T` and student logits :math:`z^S` over the vocabulary at every position,
and temperature :math:`\tau`, :math:`p = \mathrm{softmax}(z^T/\tau)` and :math:`q_\theta = \mathrm{softmax}(z^S/\tau)`:

- **forward KL** (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network",
  arXiv:1503.02531): :math:`\mathrm{KL}(p \,\Vert\, q_\theta) = \sum_v p_v (\log p_v - \log q_{\theta,v})`,
  *mean-seeking*: the student must cover everything the teacher gives mass to. Minimising it equals
  minimising the cross-entropy to the teacher's soft labels, as LLM-QAT does.
- **reverse KL** (MiniLLM, Gu et al. 2024, arXiv:2306.08543, token level):
  :math:`\mathrm{KL}(q_\theta \,\Vert\, p)`, *mode-seeking*: the student may drop modes of the teacher but
  is penalised for mass where the teacher has little.
- **generalized Jensen-Shannon divergence** JSD(β) (GKD, Agarwal et al. 2024, "On-Policy Distillation
  of Language Models: Learning from Self-Generated Mistakes", arXiv:2306.13649, §2), with the teacher
  as the first argument as in the paper, :math:`P = p` and :math:`Q = q_\theta`:

  .. math:: \mathrm{JSD}(\beta)(p \,\Vert\, q_\theta) = \beta\, \mathrm{KL}(p \,\Vert\, m)
            + (1-\beta)\, \mathrm{KL}(q_\theta \,\Vert\, m), \qquad m = \beta p + (1-\beta) q_\theta.

  Its limits are the two KLs *up to a vanishing scale*: as :math:`\beta \to 0`, :math:`m \to q_\theta`
  and :math:`\mathrm{JSD}(\beta) = \beta\,\mathrm{KL}(p \Vert q_\theta) + O(\beta^2)`, so
  :math:`\mathrm{JSD}(\beta)/\beta \to` forward KL; as :math:`\beta \to 1`,
  :math:`\mathrm{JSD}(\beta)/(1-\beta) \to` reverse KL. That is the sense of the paper's "behaves like
  forward KL for β near 0 and like reverse KL for β near 1". At :math:`\beta = 0` or :math:`1` the
  mixture equals one of the two distributions and the divergence is identically 0, so ``beta`` must lie
  strictly between 0 and 1; use ``forward_kl``/``reverse_kl`` for the endpoints (they are not the
  limits of the values, only of the values divided by the scale). :math:`\beta = 1/2` is the ordinary JSD.

Every loss is averaged over the positions where ``mask`` is true (all by default) and multiplied by
:math:`\tau^2`, which keeps gradient magnitudes comparable across temperatures (Hinton et al. §2).
:func:`distillation_loss` adds Hinton's mix with the cross-entropy on the hard labels,
:math:`\alpha\,\tau^2 D + (1-\alpha)\,\mathrm{CE}`, and ignores label positions equal to ``-100``.

**Sparse teacher (offline distillation).** A stored teacher keeps only its top-:math:`k` tokens per
position (:class:`SparseTeacher`). The full distribution is then unknown; here it is *coarsened*, not
renormalised: both distributions are compared on :math:`k + 1` outcomes, the teacher's top-:math:`k`
tokens and one **remainder bucket** holding all other tokens' mass (the teacher's stored exactly, the
student's summed over the same tokens). The divergence of coarsened distributions never exceeds the
full one (data-processing inequality), equals it when :math:`k` is the vocabulary size, and is finite
for all three kinds (a teacher renormalised over its top-:math:`k` would give every other token
probability 0 and make the reverse KL infinite). The student is still pushed to move its remainder mass
to the teacher's remainder, but not told how to spread it over the remaining tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from refimpl._validation import check_choice, check_fraction, check_logits, check_positive_int, check_positive_number

#: The divergences :func:`distillation_loss` knows.
KINDS = ("forward_kl", "reverse_kl", "jsd")
#: Label value of positions without a hard target (the Hugging Face convention).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher's next-token distributions reduced to their top-``k`` tokens, as offline distillation
    stores them once instead of running the teacher at every step.

    ``log_probs`` ``[..., k]`` (float16) are :math:`\\log p_v` of the ``k`` most likely tokens at
    temperature ``temperature``, in decreasing order; ``indices`` ``[..., k]`` (int32) are those tokens;
    ``rest_log_prob`` ``[...]`` (float32) is the log of the mass of all other tokens (``-inf`` when
    ``k`` is the vocabulary size). Index it like the positions (``targets[2:4]``) to get a batch.
    """

    log_probs: torch.Tensor
    indices: torch.Tensor
    rest_log_prob: torch.Tensor
    temperature: float

    def __post_init__(self) -> None:
        if not isinstance(self.log_probs, torch.Tensor) or self.log_probs.dtype != torch.float16:
            raise TypeError("log_probs must be a float16 tensor [..., k]")
        if not isinstance(self.indices, torch.Tensor) or self.indices.dtype != torch.int32:
            raise TypeError("indices must be an int32 tensor [..., k]")
        if not isinstance(self.rest_log_prob, torch.Tensor) or self.rest_log_prob.dtype != torch.float32:
            raise TypeError("rest_log_prob must be a float32 tensor [...]")
        if self.log_probs.dim() < 1 or self.indices.shape != self.log_probs.shape \
                or self.rest_log_prob.shape != self.log_probs.shape[:-1]:
            raise ValueError(f"log_probs {tuple(self.log_probs.shape)} and indices {tuple(self.indices.shape)} must "
                             f"have one shape [..., k], rest_log_prob {tuple(self.rest_log_prob.shape)} its [...]")
        check_positive_number("temperature", self.temperature)

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0) -> "SparseTeacher":
        """Keep the top-``k`` of ``softmax(logits / temperature)`` for logits ``[..., vocab]``."""
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
            raise ValueError("logits must be a floating-point tensor [..., vocab]")
        check_positive_int("k", k)
        if k > logits.shape[-1]:
            raise ValueError(f"k must be at most the vocabulary size {logits.shape[-1]}, got {k}")
        check_positive_number("temperature", temperature)
        check_logits("logits", logits)  # topk would keep a NaN first
        log_p = F.log_softmax(_widened(logits) / temperature, dim=-1)  # [..., vocab]
        top = log_p.topk(k, dim=-1)  # values and indices [..., k], decreasing
        rest = log_p.scatter(-1, top.indices, -math.inf).logsumexp(dim=-1)  # [...]
        return cls(top.values.half(), top.indices.int(), rest.float(), float(temperature))

    @property
    def k(self) -> int:
        return self.log_probs.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of the three stored tensors, measured on them."""
        return sum(t.numel() * t.element_size() for t in (self.log_probs, self.indices, self.rest_log_prob))

    def top(self, k: int) -> "SparseTeacher":
        """The top-``k`` of these top-``K`` targets (``k <= K``), as :meth:`from_logits` would store them
        with ``k``: the first ``k`` tokens, and the mass of the ``K - k`` dropped ones added to the
        remainder bucket (so one teacher pass serves several ``k``)."""
        check_positive_int("k", k)
        if k > self.k:
            raise ValueError(f"k must be at most the stored k={self.k}, got {k}")
        dropped = self.log_probs[..., k:].float().logsumexp(dim=-1)  # [...], -inf when k = K
        return SparseTeacher(self.log_probs[..., :k].contiguous(), self.indices[..., :k].contiguous(),
                             torch.logaddexp(self.rest_log_prob, dropped), self.temperature)

    def __getitem__(self, index: Any) -> "SparseTeacher":
        """The targets of some positions; ``index`` applies to the leading (position) dimensions."""
        if isinstance(index, tuple) and Ellipsis in index:
            raise IndexError("index the positions only, without Ellipsis")
        return SparseTeacher(self.log_probs[index], self.indices[index], self.rest_log_prob[index], self.temperature)

    def to(self, device: torch.device | str) -> "SparseTeacher":
        return SparseTeacher(self.log_probs.to(device), self.indices.to(device), self.rest_log_prob.to(device),
                             self.temperature)


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTeacher, temperature: float,
           mask: torch.Tensor | None) -> None:
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point() \
            or student_logits.dim() < 1:
        raise ValueError("student_logits must be a floating-point tensor [..., vocab]")
    check_positive_number("temperature", temperature)
    positions = student_logits.shape[:-1]
    if isinstance(teacher_logits, SparseTeacher):
        if teacher_logits.log_probs.shape[:-1] != positions:
            raise ValueError(f"the sparse teacher's positions {tuple(teacher_logits.log_probs.shape[:-1])} must "
                             f"match student_logits {tuple(positions)}")
        vocab = student_logits.shape[-1]
        if teacher_logits.k > vocab or teacher_logits.indices.min() < 0 or teacher_logits.indices.max() >= vocab:
            raise ValueError(f"the sparse teacher's indices must be token ids in [0, {vocab})")
        if teacher_logits.temperature != temperature:
            raise ValueError(f"temperature {temperature} must equal the temperature the sparse teacher was stored "
                             f"at ({teacher_logits.temperature}): its remainder mass cannot be re-tempered")
    elif not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise ValueError("teacher_logits must be a floating-point tensor [..., vocab] or a SparseTeacher")
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != positions:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(positions)}")
        if not mask.any():
            raise ValueError("mask selects no position")


def _widened(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 (softmax sums need it); float32 and float64 unchanged."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def target_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of ``logits [..., vocab]`` against ``labels [...]`` over the positions
    that have a target (a label other than :data:`IGNORE_INDEX`), in float32 at least: the hard loss
    of :func:`distillation_loss`, the loss of sequence-level KD and of distilling step-by-step's tasks."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        raise ValueError("logits must be a floating-point tensor [..., vocab]")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64) \
            or labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must be an integer tensor of shape {tuple(logits.shape[:-1])}")
    return F.cross_entropy(_widened(logits).flatten(0, -2), labels.flatten().long(), ignore_index=IGNORE_INDEX)


def _log_distributions(student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTeacher,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, log q)`` at temperature ``temperature``, both ``[..., n]``: over the vocabulary
    (``n = vocab``) for dense teacher logits, over the top-``k`` tokens and the remainder bucket
    (``n = k + 1``, or ``k`` when the top-``k`` is the whole vocabulary) for a :class:`SparseTeacher`."""
    log_q = F.log_softmax(_widened(student_logits) / temperature, dim=-1)  # [..., vocab]
    if isinstance(teacher_logits, torch.Tensor):
        return F.log_softmax(_widened(teacher_logits.detach()) / temperature, dim=-1), log_q
    indices = teacher_logits.indices.long()  # [..., k]
    log_q_top = log_q.gather(-1, indices)  # [..., k]
    log_p_top = teacher_logits.log_probs.to(log_q.dtype)  # [..., k]
    if teacher_logits.k == log_q.shape[-1]:  # no remainder: renormalise away the float16 rounding
        return F.log_softmax(log_p_top, dim=-1), log_q_top
    log_q_rest = log_q.scatter(-1, indices, -math.inf).logsumexp(dim=-1, keepdim=True)  # [..., 1]
    log_p_rest = teacher_logits.rest_log_prob.to(log_q.dtype).unsqueeze(-1)  # [..., 1]
    log_p = F.log_softmax(torch.cat([log_p_top, log_p_rest], dim=-1), dim=-1)  # [..., k + 1], sums to 1 again
    return log_p, torch.cat([log_q_top, log_q_rest], dim=-1)


def _check_log_distributions(log_p: Any, log_q: Any) -> None:
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (log_p, log_q)) \
            or log_p.shape != log_q.shape:
        raise ValueError("log_p and log_q must be floating-point tensors of one shape [..., vocab]")


def token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at every position, from log-probabilities ``[..., vocab]`` -> ``[...]``; tokens with
    :math:`p_v = 0` (e.g. logits of -inf) contribute nothing."""
    _check_log_distributions(log_p, log_q)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def token_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD(β)(p || q) at every position ``[..., vocab]`` -> ``[...]``, the mixture taken in log space;
    ``beta`` in the open interval (0, 1)."""
    _check_log_distributions(log_p, log_q)
    check_fraction("beta", beta, open_interval=True)
    log_m = torch.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)  # log(β p + (1 - β) q)
    return beta * token_kl(log_p, log_m) + (1 - beta) * token_kl(log_q, log_m)


def _token_divergence(kind: str, log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    if kind == "forward_kl":
        return token_kl(log_p, log_q)
    if kind == "reverse_kl":
        return token_kl(log_q, log_p)
    return token_jsd(log_p, log_q, beta)


def _mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return per_token.mean() if mask is None else per_token[mask].mean()


def _soft_loss(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTeacher,
               temperature: float, beta: float, mask: torch.Tensor | None) -> torch.Tensor:
    """:math:`\\tau^2` times the mean divergence ``kind`` over the (masked) positions; arguments checked."""
    log_p, log_q = _log_distributions(student_logits, teacher_logits, temperature)
    return temperature**2 * _mean(_token_divergence(kind, log_p, log_q, beta), mask)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTeacher, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`\\tau^2\\,\\mathrm{KL}(p_{teacher} \\Vert q_{student})`, the mean over the (masked) positions
    of logits ``[..., vocab]``. The teacher's logits are treated as constants (detached); a
    :class:`SparseTeacher` is compared on its top-``k`` and remainder bucket."""
    _check(student_logits, teacher_logits, temperature, mask)
    return _soft_loss("forward_kl", student_logits, teacher_logits, temperature, 0.5, mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTeacher, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`\\tau^2\\,\\mathrm{KL}(q_{student} \\Vert p_{teacher})`, as :func:`forward_kl` otherwise."""
    _check(student_logits, teacher_logits, temperature, mask)
    return _soft_loss("reverse_kl", student_logits, teacher_logits, temperature, 0.5, mask)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTeacher, beta: float = 0.5,
                    temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`\\tau^2\\,\\mathrm{JSD}(\\beta)(p_{teacher} \\Vert q_{student})` of GKD §2 with
    :math:`m = \\beta p + (1-\\beta) q`, ``beta`` in the open interval (0, 1); near 0 it is
    ``beta * forward_kl``, near 1 ``(1 - beta) * reverse_kl`` (module docstring). The student's
    gradient flows through both terms, the mixture included. As :func:`forward_kl` otherwise."""
    _check(student_logits, teacher_logits, temperature, mask)
    check_fraction("beta", beta, open_interval=True)
    return _soft_loss("jsd", student_logits, teacher_logits, temperature, beta, mask)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTeacher,
                      labels: torch.Tensor | None = None, kind: str = "forward_kl", alpha: float = 1.0,
                      temperature: float = 1.0, beta: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Hinton et al.'s (§2) weighted sum of a soft and a hard loss,
    :math:`\alpha\,\tau^2 D(p^\tau_{teacher}, q^\tau_{student})
    + (1-\alpha)\,\mathrm{CE}(\text{labels}, q^1_{student})`,
    with :math:`D` the divergence ``kind`` (:data:`KINDS`) at temperature :math:`\tau` and the
    cross-entropy at temperature 1, both averaged over the same positions.

    Args:
        student_logits: ``[..., vocab]``; gradients flow into them.
        teacher_logits: ``[..., vocab]`` (detached) or a :class:`SparseTeacher` for the same positions.
        labels: ``LongTensor[...]``, the hard target of every position, already aligned with the logits
            (``labels[..., t]`` is the token the logits at ``t`` predict); ``-100`` marks positions that
            count in neither term (padding, prompt). Needed when ``alpha < 1``.
        kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (JSD(β) with ``beta``).
        alpha: weight of the soft loss, in [0, 1]; 1 (default) is pure distillation, 0 pure cross-entropy.
        temperature: :math:`\tau > 0` of the soft loss.
        beta: JSD(β)'s mixture weight, in the open interval (0, 1); checked for every kind.
        mask: ``BoolTensor[...]``; positions where it is false count in neither term.

    Returns:
        the scalar loss.
    """
    _check(student_logits, teacher_logits, temperature, mask)
    check_choice("kind", kind, KINDS)
    check_fraction("alpha", alpha)
    check_fraction("beta", beta, open_interval=True)
    positions = mask
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64) \
                or labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"labels must be an integer tensor of shape {tuple(student_logits.shape[:-1])}")
        has_target = labels != IGNORE_INDEX
        if ((labels < 0) & has_target).any() or (labels >= student_logits.shape[-1]).any():
            raise ValueError(f"labels must be token ids in [0, {student_logits.shape[-1]}) or {IGNORE_INDEX}")
        positions = has_target if mask is None else has_target & mask
        if not positions.any():
            raise ValueError(f"no position is left: every label is {IGNORE_INDEX} or masked out")
    elif alpha < 1:
        raise ValueError("labels are needed when alpha < 1 (the cross-entropy term)")
    loss = alpha * _soft_loss(kind, student_logits, teacher_logits, temperature, beta, positions) if alpha > 0 else 0.0
    if alpha < 1:
        hard = target_cross_entropy(student_logits[positions], labels[positions])
        loss = loss + (1 - alpha) * hard
    return loss
