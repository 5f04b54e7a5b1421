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
    # float32: terms of 0.30 and -0.17, each rounded to ~3e-8, cancel to 0.13 (measured 5.5e-7 relative)
    assert math.isclose(losses.forward_kl(s, t).item(), kl_pq, rel_tol=1e-5)
    assert math.isclose(losses.reverse_kl(s, t).item(), kl_qp, rel_tol=1e-5)
    assert losses.forward_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_token_level_divergences_per_position():
    log_p, log_q = F.log_softmax(_logits(0), -1), F.log_softmax(_logits(1), -1)  # [2, 5, 11]
    kl = losses.token_kl(log_p, log_q)  # [2, 5]
    torch.testing.assert_close(kl, F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1))
    beta = 0.3
    m = beta * log_p.exp() + (1 - beta) * log_q.exp()
    jsd = beta * (log_p.exp() * (log_p - m.log())).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - m.log())).sum(-1)
    torch.testing.assert_close(losses.token_jsd(log_p, log_q, beta), jsd)
    with pytest.raises(ValueError, match="log_p and log_q must be floating-point tensors of one shape"):
        losses.token_kl(log_p, log_q[..., :5])
    with pytest.raises(ValueError, match="log_p and log_q must be floating-point tensors of one shape"):
        losses.token_jsd(log_p, log_q.argmax(-1), beta)
    for bad in (0.0, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="beta must be a number in the open interval"):
            losses.token_jsd(log_p, log_q, bad)


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


def _float64_logits(seed, shape=(2, 5, 11)):
    return _logits(seed, shape).double()


def test_jsd_matches_its_definition_and_is_symmetric_at_one_half():
    s, t = _float64_logits(8), _float64_logits(9)
    beta = 0.3
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    m = beta * p + (1 - beta) * q
    expected = (beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)).mean()
    torch.testing.assert_close(losses.generalized_jsd(s, t, beta=beta), expected)
    # with kl_div: beta KL(p || m) + (1 - beta) KL(q || m)
    via_torch = (beta * F.kl_div(m.log(), p, reduction="none").sum(-1)
                 + (1 - beta) * F.kl_div(m.log(), q, reduction="none").sum(-1)).mean()
    torch.testing.assert_close(losses.generalized_jsd(s, t, beta=beta), via_torch)
    torch.testing.assert_close(losses.generalized_jsd(s, t, beta=0.5), losses.generalized_jsd(t, s, beta=0.5))
    assert 0 < losses.generalized_jsd(s, t).item() <= math.log(2)  # JSD(1/2) is at most log 2 per token
    assert losses.generalized_jsd(s, s, beta=0.7).item() == pytest.approx(0.0, abs=1e-12)


def test_jsd_limits_are_the_kls_scaled_by_beta_and_one_minus_beta():
    """As documented: JSD(β)/β -> KL(p || q) (forward) as β -> 0, JSD(β)/(1-β) -> KL(q || p) (reverse) as
    β -> 1, in value and in gradient; the error shrinks with the distance to the endpoint."""
    t = _float64_logits(10)
    errors = []
    for eps in (1e-3, 1e-6):  # the error is O(eps * chi-square(p, q)), large for these peaked distributions
        s = _float64_logits(11).requires_grad_()
        near_zero = losses.generalized_jsd(s, t, beta=eps) / eps
        (grad_near_zero,) = torch.autograd.grad(near_zero, s)
        near_one = losses.generalized_jsd(s, t, beta=1 - eps) / eps
        (grad_near_one,) = torch.autograd.grad(near_one, s)
        forward, reverse = losses.forward_kl(s, t), losses.reverse_kl(s, t)
        (grad_forward,) = torch.autograd.grad(forward, s)
        (grad_reverse,) = torch.autograd.grad(reverse, s)
        errors.append([abs(near_zero.item() - forward.item()), abs(near_one.item() - reverse.item()),
                       (grad_near_zero - grad_forward).abs().max().item(),
                       (grad_near_one - grad_reverse).abs().max().item()])
        assert near_zero.item() < forward.item() and near_one.item() < reverse.item()  # from below
    assert all(small < 1e-3 and small < 0.05 * large for small, large in zip(errors[1], errors[0]))
    # the forward and reverse KL differ here, so each limit picks out one of them
    assert abs(losses.forward_kl(_float64_logits(11), t) - losses.reverse_kl(_float64_logits(11), t)) > 0.1


def test_jsd_temperature_mask_and_gradients():
    s, t = _logits(12).requires_grad_(), _logits(13)
    tau = 3.0
    torch.testing.assert_close(losses.generalized_jsd(s, t, 0.2, temperature=tau),
                               tau**2 * losses.generalized_jsd(s / tau, t / tau, 0.2))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, :3] = True
    torch.testing.assert_close(losses.generalized_jsd(s, t, 0.9, mask=mask),
                               losses.generalized_jsd(s[mask][None], t[mask][None], 0.9))
    losses.generalized_jsd(s * 50, t * 50, beta=0.1).backward()  # peaked distributions stay finite
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_distillation_loss_mixes_soft_and_hard_with_hinton_weights():
    s, t = _logits(14), _logits(15)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    labels[0, 0] = labels[1, 4] = losses.IGNORE_INDEX
    kept = labels != losses.IGNORE_INDEX
    tau, alpha = 2.0, 0.7
    soft = losses.forward_kl(s, t, temperature=tau, mask=kept)
    hard = F.cross_entropy(s.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    value = losses.distillation_loss(s, t, labels, "forward_kl", alpha=alpha, temperature=tau)
    torch.testing.assert_close(value, alpha * soft + (1 - alpha) * hard)
    torch.testing.assert_close(losses.distillation_loss(s, t, labels, alpha=0.0), hard)
    torch.testing.assert_close(losses.distillation_loss(s, t, labels, "reverse_kl"), losses.reverse_kl(s, t, mask=kept))
    torch.testing.assert_close(losses.distillation_loss(s, t, labels, "jsd", beta=0.25),
                               losses.generalized_jsd(s, t, 0.25, mask=kept))
    torch.testing.assert_close(losses.distillation_loss(s, t), losses.forward_kl(s, t))  # no labels: every position
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    torch.testing.assert_close(losses.distillation_loss(s, t, labels, alpha=0.0, mask=mask),
                               F.cross_entropy(s[kept & mask], labels[kept & mask]))


def test_changing_an_ignored_position_changes_nothing():
    s, t = _logits(16), _logits(17)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    labels[:, :2] = losses.IGNORE_INDEX  # e.g. the prompt
    value = losses.distillation_loss(s, t, labels, "jsd", alpha=0.5)
    s2, t2 = s.clone(), t.clone()
    s2[:, :2], t2[:, :2] = 100.0, -7.0
    torch.testing.assert_close(losses.distillation_loss(s2, t2, labels, "jsd", alpha=0.5), value)


def test_sparse_teacher_with_the_whole_vocabulary_is_the_dense_teacher():
    s, t = _logits(18).requires_grad_(), _logits(19)
    sparse = losses.SparseTeacher.from_logits(t, k=11, temperature=2.0)
    assert torch.isinf(sparse.rest_log_prob).all()
    for kind in losses.KINDS:
        dense_value = losses.distillation_loss(s, t, kind=kind, temperature=2.0)
        sparse_value = losses.distillation_loss(s, sparse, kind=kind, temperature=2.0)
        torch.testing.assert_close(sparse_value, dense_value, rtol=5e-3, atol=1e-4)  # float16 storage
        (dense_grad,) = torch.autograd.grad(dense_value, s)
        (sparse_grad,) = torch.autograd.grad(sparse_value, s)
        assert torch.isfinite(sparse_grad).all()
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-2, atol=1e-3)


def test_sparse_teacher_compares_the_top_k_and_a_remainder_bucket():
    s, t = _float64_logits(20).requires_grad_(), _float64_logits(21)
    k = 3
    sparse = losses.SparseTeacher.from_logits(t, k)
    assert sparse.log_probs.dtype == torch.float16 and sparse.indices.dtype == torch.int32
    assert sparse.nbytes == 2 * 5 * (k * 2 + k * 4 + 4) and sparse.k == k
    assert torch.equal(sparse.indices.long(), t.topk(k, -1).indices)
    # the coarsened distributions by hand: k tokens and the rest
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    idx = t.topk(k, -1).indices
    p_top, q_top = p.gather(-1, idx), q.gather(-1, idx)
    p_c = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_c = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    p_c = p_c.half().double()  # what is stored is float16 (renormalised over the k + 1 buckets)
    p_c = p_c / p_c.sum(-1, keepdim=True)
    forward = (p_c * (p_c / q_c).log()).sum(-1).mean()
    reverse = (q_c * (q_c / p_c).log()).sum(-1).mean()
    torch.testing.assert_close(losses.forward_kl(s, sparse), forward, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(losses.reverse_kl(s, sparse), reverse, rtol=2e-3, atol=1e-5)
    # coarsening never increases a divergence (data-processing inequality)
    for kind in losses.KINDS:
        assert losses.distillation_loss(s, sparse, kind=kind) < losses.distillation_loss(s, t, kind=kind)
    losses.reverse_kl(s, sparse).backward()
    assert torch.isfinite(s.grad).all()
    batch = sparse[1:]
    assert batch.log_probs.shape == (1, 5, k) and batch.temperature == sparse.temperature


def test_top_of_a_stored_top_k_is_what_from_logits_stores():
    t = _float64_logits(22)
    stored = losses.SparseTeacher.from_logits(t, 7, temperature=2.0)
    for k in (1, 3, 7):
        direct, truncated = losses.SparseTeacher.from_logits(t, k, temperature=2.0), stored.top(k)
        assert torch.equal(truncated.indices, direct.indices) and torch.equal(truncated.log_probs, direct.log_probs)
        assert truncated.nbytes == direct.nbytes and truncated.temperature == 2.0
        torch.testing.assert_close(truncated.rest_log_prob, direct.rest_log_prob, rtol=0, atol=2e-3)  # float16 sums
    with pytest.raises(ValueError, match="k must be at most the stored k=7"):
        stored.top(8)
    with pytest.raises(ValueError, match="k must be a positive int"):
        stored.top(0)


def test_distillation_loss_validation():
    s, t = _logits(0), _logits(1)
    labels = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="kind must be one of"):
        losses.distillation_loss(s, t, kind="kl")
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha must be a number in"):
            losses.distillation_loss(s, t, labels, alpha=alpha)
    for beta in (0, 1, -0.2, 2):
        with pytest.raises(ValueError, match="beta must be a number in the open interval"):
            losses.generalized_jsd(s, t, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            losses.distillation_loss(s, t, kind="jsd", beta=beta)
    for temperature in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            losses.distillation_loss(s, t, temperature=temperature)
    with pytest.raises(ValueError, match="labels are needed"):
        losses.distillation_loss(s, t, alpha=0.5)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        losses.distillation_loss(s, t, labels[:, :3])
    with pytest.raises(ValueError, match="labels must be token ids"):
        losses.distillation_loss(s, t, labels + 11)
    with pytest.raises(ValueError, match="no position is left"):
        losses.distillation_loss(s, t, torch.full((2, 5), -100))
    with pytest.raises(ValueError, match="k must be"):
        losses.SparseTeacher.from_logits(t, 0)
    with pytest.raises(ValueError, match="k must be at most"):
        losses.SparseTeacher.from_logits(t, 12)
    sparse = losses.SparseTeacher.from_logits(t, 4, temperature=2.0)
    with pytest.raises(ValueError, match="temperature 1.0 must equal"):
        losses.forward_kl(s, sparse)
    with pytest.raises(ValueError, match="positions"):
        losses.forward_kl(s[:1], sparse, temperature=2.0)
    with pytest.raises(ValueError, match="token ids"):
        losses.forward_kl(s[..., :5], sparse, temperature=2.0)
    with pytest.raises(TypeError, match="log_probs must be a float16"):
        losses.SparseTeacher(sparse.log_probs.float(), sparse.indices, sparse.rest_log_prob, 2.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.forward_kl(s, t.numpy())
