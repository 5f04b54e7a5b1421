"""refimpl.training: the schedule's shape, the loop trains only what requires gradients and reduces
a loss, is deterministic, clips, restores the model's mode, and validates its settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from refimpl import training
from refimpl.training import TrainConfig


def test_learning_rate_warms_up_then_follows_a_half_cosine():
    config = TrainConfig(steps=11, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [training.learning_rate(t, config) for t in range(11)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and math.isclose(lrs[-1], 0.1)
    middle = 2 + (11 - 2 - 1) // 2  # halfway through the decay: (1 + r) / 2
    assert math.isclose(lrs[middle], 0.55)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert training.learning_rate(0, TrainConfig(steps=1, lr=0.3)) == 0.3


def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_train_reduces_the_loss_and_only_touches_trainable_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    model.eval()
    log = training.train(model, _regression(), _mse, TrainConfig(steps=60, lr=0.05, warmup_steps=5))
    assert len(log.losses) == len(log.lrs) == len(log.grad_norms) == 60
    assert log.losses[-1] < 0.2 * log.losses[0]
    assert torch.equal(model[0].weight, frozen)
    assert not model.training  # mode restored
    assert log.seconds > 0 and training.optimizer_state_bytes(log.optimizer) > 0


def test_train_is_deterministic_and_clips():
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        config = TrainConfig(steps=10, lr=0.01, grad_clip=1e-3, seed=3)
        log = training.train(model, _regression(), _mse, config)
        runs.append((log.losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    # with max norm 1e-3, AdamW's step is unchanged in size but the reported norms exceed the clip
    assert max(log.grad_norms) > 1e-3


def test_adamw_state_is_two_moments_per_trained_parameter():
    model = nn.Linear(10, 3)
    log = training.train(model, _regression_like(), lambda m, b: m(b).pow(2).mean(), TrainConfig(steps=1))
    n = sum(p.numel() for p in model.parameters())
    assert training.optimizer_state_bytes(log.optimizer) == 2 * 4 * n + 2 * 4  # exp_avg, exp_avg_sq, 2 steps


def _regression_like():
    return [torch.randn(4, 10, generator=torch.Generator().manual_seed(0))]


def test_a_non_finite_loss_stops_with_the_step():
    model = nn.Linear(2, 1)
    with pytest.raises(FloatingPointError, match="step 0"):
        training.train(model, [torch.ones(1, 2)], lambda m, b: m(b).sum() * float("inf"), TrainConfig(steps=3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(steps=3, warmup_steps=3), "warmup_steps"), (dict(steps=3, lr=0.0), "lr"),
    (dict(steps=3, lr=float("nan")), "lr"), (dict(steps=3, min_lr_ratio=2.0), "min_lr_ratio"),
    (dict(steps=3, grad_clip=0.0), "grad_clip"), (dict(steps=3, weight_decay=-1.0), "weight_decay"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        training.train(nn.Linear(2, 1), [torch.ones(1, 2)], lambda m, b: m(b).sum(), TrainConfig(**kwargs))


def test_bad_arguments_are_named():
    model = nn.Linear(2, 1)
    config = TrainConfig(steps=1)
    with pytest.raises(ValueError, match="batches"):
        training.train(model, [], lambda m, b: m(b).sum(), config)
    with pytest.raises(TypeError, match="loss_fn"):
        training.train(model, [torch.ones(1, 2)], None, config)
    with pytest.raises(TypeError, match="scalar"):
        training.train(model, [torch.ones(1, 2)], lambda m, b: m(b), TrainConfig(steps=1))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        training.train(model, [torch.ones(1, 2)], lambda m, b: m(b).sum(), config)
    with pytest.raises(TypeError, match="config"):
        training.train(nn.Linear(2, 1), [torch.ones(1, 2)], lambda m, b: m(b).sum(), {"steps": 1})
