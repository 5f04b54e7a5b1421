"""refimpl.distillation.losses: forward and reverse KL against torch's kl_div and a hand computation,
temperature, masking, gradients, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from refimpl.distillation import losses


def _logits(seed, shape=(2, 5, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def test_forward_kl_matches_torch_kl_div():
    s, t = _logits(0), _logits(1)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(losses.forward_kl(s, t), expected)
    reverse = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(losses.reverse_kl(s, t), reverse)


def test_by_hand_on_two_tokens():
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    s, t = q.log()[None], p.log()[None]
    kl_pq = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_qp = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    assert math.isclose(losses.forward_kl(s, t).item(), kl_pq, rel_tol=1e-6)
    assert math.isclose(losses.reverse_kl(s, t).item(), kl_qp, rel_tol=1e-6)
    assert losses.forward_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kl", [losses.forward_kl, losses.reverse_kl])
def test_temperature_and_mask(kl):
    s, t = _logits(2), _logits(3)
    tau = 2.0
    expected = tau**2 * kl(s / tau, t / tau)
    torch.testing.assert_close(kl(s, t, temperature=tau), expected)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = True
    torch.testing.assert_close(kl(s, t, mask=mask), kl(s[mask][None], t[mask][None]))


def test_tokens_a_distribution_excludes_add_nothing():
    s, t = _logits(6), _logits(7)
    t[..., 0] = float("-inf")  # the teacher never predicts token 0
    value = losses.forward_kl(s, t)
    assert torch.isfinite(value)
    p = torch.softmax(t, -1)[..., 1:]
    expected = (p * (p.log() - torch.log_softmax(s, -1)[..., 1:])).sum(-1).mean()
    torch.testing.assert_close(value, expected)


def test_only_the_student_gets_gradients():
    s, t = _logits(4).requires_grad_(), _logits(5).requires_grad_()
    (losses.forward_kl(s, t) + losses.reverse_kl(s, t)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 and t.grad is None


def test_validation():
    s = _logits(0)
    with pytest.raises(ValueError, match="same shape"):
        losses.forward_kl(s, s[..., :5])
    with pytest.raises(ValueError, match="temperature"):
        losses.reverse_kl(s, s, temperature=0)
    with pytest.raises(ValueError, match="mask"):
        losses.forward_kl(s, s, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="no position"):
        losses.forward_kl(s, s, mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="student_logits"):
        losses.forward_kl(s.long(), s)
