r"""The small training loop every chapter that trains shares: quantization-aware training and QLoRA
(chapter 04), recovery fine-tuning after pruning (05) and knowledge distillation (06).

What it does, and nothing more:

- **AdamW** (Loshchilov and Hutter 2019, "Decoupled Weight Decay Regularization", arXiv:1711.05101)
  on the parameters of the model that require gradients — a frozen base with adapters trains only the
  adapters;
- **gradient clipping** by the global norm over those parameters;
- a **learning rate** that rises linearly over ``warmup_steps`` and then follows a half cosine from
  ``lr`` towards ``min_lr_ratio * lr`` (:func:`learning_rate`; no step gets a zero rate);
- **seeded**, with the model in training mode while it runs (and its previous mode restored), a
  progress bar, and a log of the loss, learning rate and gradient norm of every step.

The loss is the caller's: ``loss_fn(model, batch)`` returns a scalar tensor — next-token cross-entropy
for fine-tuning, a KL divergence to a teacher's logits for distillation (:mod:`refimpl.distillation.losses`).
Step :math:`t` uses ``batches[t % len(batches)]``, so a fixed list of batches is cycled in order.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from refimpl._rollback import restores_on_error
from refimpl._validation import check_non_negative_int, check_positive_int, check_token_ids, vocabulary_size
from refimpl.runtime import progress


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train` (checked there)."""

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0


@dataclass
class TrainLog:
    """What :func:`train` measured: per step the loss, the learning rate used and the gradient norm
    before clipping; the wall-clock seconds of the whole run; and the optimizer (its state is the
    memory that training adds)."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    optimizer: torch.optim.Optimizer | None = None


def learning_rate(step: int, config: TrainConfig) -> float:
    r"""The learning rate of step ``step`` (0-based): :math:`\eta\,(t+1)/(w+1)` during the ``w`` warm-up
    steps, then :math:`\eta\,\big(r + (1 - r)\,\tfrac12(1 + \cos(\pi\,\tfrac{t - w}{T - w}))\big)` with
    :math:`r` = ``min_lr_ratio``: :math:`\eta` at the first step after warm-up, approaching
    :math:`r\eta` at the end (the schedule of the step after the last one), so every step trains."""
    check_non_negative_int("step", step)
    warmup, steps = config.warmup_steps, config.steps
    if step < warmup:
        return config.lr * (step + 1) / (warmup + 1)
    fraction = min(1.0, (step - warmup) / (steps - warmup))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * fraction)))


def check_config(config: TrainConfig) -> None:
    """Raise ``TypeError`` unless ``config`` is a :class:`TrainConfig`, ``ValueError`` naming the field
    unless its settings can train (what :func:`train` checks first; trainers built on it call it before
    they run anything else)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    check_positive_int("steps", config.steps)
    check_non_negative_int("warmup_steps", config.warmup_steps)
    check_non_negative_int("seed", config.seed)
    if config.warmup_steps >= config.steps:
        raise ValueError(f"warmup_steps ({config.warmup_steps}) must be smaller than steps ({config.steps})")
    numbers = {"lr": config.lr, "weight_decay": config.weight_decay, "min_lr_ratio": config.min_lr_ratio}
    for name, value in numbers.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if config.lr <= 0 or config.weight_decay < 0 or not 0 <= config.min_lr_ratio <= 1:
        raise ValueError(f"need lr > 0, weight_decay >= 0 and 0 <= min_lr_ratio <= 1, got lr={config.lr}, "
                         f"weight_decay={config.weight_decay}, min_lr_ratio={config.min_lr_ratio}")
    if config.grad_clip is not None and not (isinstance(config.grad_clip, (int, float)) and config.grad_clip > 0):
        raise ValueError(f"grad_clip must be None or a positive number, got {config.grad_clip!r}")


@restores_on_error("model")
def train(model: torch.nn.Module, batches: Sequence[Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
          config: TrainConfig, desc: str = "train") -> TrainLog:
    """Train the parameters of ``model`` that require gradients for ``config.steps`` steps, in place.

    Args:
        batches: a non-empty sequence; step ``t`` uses ``batches[t % len(batches)]``.
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss tensor to minimise.
        config: optimizer, schedule, clipping and seed (:class:`TrainConfig`).
        desc: the progress bar's label.

    Returns:
        a :class:`TrainLog`. A non-finite loss stops training with ``FloatingPointError`` naming the step;
        any error leaves ``model`` as it was (a copy of its tensors is held while training runs).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_config(config)
    if not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError("batches must be a non-empty sequence (a list of batches)")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(model, batch) -> scalar tensor")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("model has no parameter that requires a gradient: nothing to train")

    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    log = TrainLog(optimizer=optimizer)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        for step in progress(range(config.steps), desc=desc, total=config.steps):
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_fn(model, batches[step % len(batches)])
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError("loss_fn must return a scalar tensor")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = config.grad_clip if config.grad_clip is not None else math.inf
            try:  # the norm before clipping
                norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm, error_if_nonfinite=True)
            except RuntimeError:
                raise FloatingPointError(f"a gradient is NaN or Inf at step {step}") from None
            optimizer.step()
            log.losses.append(loss.item())
            log.lrs.append(lr)
            log.grad_norms.append(norm.item())
    finally:
        model.train(was_training)
        log.seconds = time.perf_counter() - start
    return log


@contextlib.contextmanager
def requires_grad_restored(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the ``requires_grad`` flags of ``model``'s parameters may be set at will (to
    train some of them); afterwards every parameter the model had before is back to its own flag."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The language-modelling loss of a Hugging Face causal LM on token ids ``batch [b, seq_len]``: the
    mean cross-entropy of predicting every token from the ones before it (fine-tuning, recovery); the
    batch is moved to the model's device."""
    check_token_ids("batch", batch, vocabulary_size(model))
    batch = batch.to(next(model.parameters()).device)
    return model(batch, labels=batch).loss


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (AdamW: two moments and a step count),
    measured on its state after at least one step."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))
