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
    config = TrainConfig(steps=12, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [training.learning_rate(t, config) for t in range(12)]
    assert math.isclose(lrs[0], 1 / 3) and math.isclose(lrs[1], 2 / 3) and lrs[2] == 1.0
    assert math.isclose(lrs[7], 0.55)  # halfway through the decay: (1 + r) / 2
    assert math.isclose(lrs[-1], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))  # the last step still trains
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and min(lrs) > 0.1
    assert training.learning_rate(0, TrainConfig(steps=1, lr=0.3)) == 0.3
    assert all(training.learning_rate(t, TrainConfig(steps=4)) > 0 for t in range(4))  # min_lr_ratio 0 too


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
    for clip in (1e-3, 1e-3, None):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        config = TrainConfig(steps=10, lr=0.01, grad_clip=clip, seed=3)
        log = training.train(model, _regression(), _mse, config)
        runs.append((log.losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    # clipping rescales each step's gradient by a different factor, which changes Adam's moments
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[2][1]))


def test_adamw_state_is_two_moments_per_trained_parameter():
    model = nn.Linear(10, 3)
    log = training.train(model, _regression_like(), lambda m, b: m(b).pow(2).mean(), TrainConfig(steps=1))
    n = sum(p.numel() for p in model.parameters())
    assert training.optimizer_state_bytes(log.optimizer) == 2 * 4 * n + 2 * 4  # exp_avg, exp_avg_sq, 2 steps


def _regression_like():
    return [torch.randn(4, 10, generator=torch.Generator().manual_seed(0))]


def test_a_non_finite_loss_or_gradient_stops_with_the_step():
    model = nn.Linear(2, 1)
    with pytest.raises(FloatingPointError, match="loss is -?inf at step 0"):
        training.train(model, [torch.ones(1, 2)], lambda m, b: m(b).sum() * float("inf"), TrainConfig(steps=3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="gradient is NaN or Inf at step 0"):
        # sqrt at 0: a finite loss (0) with an infinite gradient
        training.train(model, [torch.ones(1, 2)], lambda m, b: (m.weight - m.weight.detach()).sqrt().sum(),
                       TrainConfig(steps=3))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(steps=3, warmup_steps=3), "warmup_steps"), (dict(steps=3, lr=0.0), "lr"),
    (dict(steps=3, lr=float("nan")), "lr"), (dict(steps=3, min_lr_ratio=2.0), "min_lr_ratio"),
    (dict(steps=3, grad_clip=0.0), "grad_clip"), (dict(steps=3, weight_decay=-1.0), "weight_decay"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        training.check_config(TrainConfig(**kwargs))  # what trainers built on the loop check first
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


def test_requires_grad_flags_are_restored_even_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    try:
        with training.requires_grad_restored(model):
            for p in model.parameters():
                p.requires_grad_(not p.requires_grad)
            raise RuntimeError("half-way")
    except RuntimeError:
        pass
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True]
