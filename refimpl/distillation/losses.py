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

Both are averaged over the positions where ``mask`` is true (all by default) and multiplied by
:math:`\tau^2`, which keeps gradient magnitudes comparable across temperatures (Hinton et al. §2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
           mask: torch.Tensor | None) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1:
            raise ValueError(f"{name} must be a floating-point tensor [..., vocab]")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(student_logits.shape[:-1])}")
        if not mask.any():
            raise ValueError("mask selects no position")


def _token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at every position, from log-probabilities ``[..., vocab]`` -> ``[...]``; tokens with
    :math:`p_v = 0` (e.g. logits of -inf) contribute nothing."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def _mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return per_token.mean() if mask is None else per_token[mask].mean()


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`\\tau^2\\,\\mathrm{KL}(p_{teacher} \\Vert q_{student})`, the mean over the (masked) positions
    of logits ``[..., vocab]``. The teacher's logits are treated as constants (detached)."""
    _check(student_logits, teacher_logits, temperature, mask)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * _mean(_token_kl(log_p, log_q), mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`\\tau^2\\,\\mathrm{KL}(q_{student} \\Vert p_{teacher})`, as :func:`forward_kl` otherwise."""
    _check(student_logits, teacher_logits, temperature, mask)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * _mean(_token_kl(log_q, log_p), mask)
