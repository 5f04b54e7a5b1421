"""Argument checks shared by refimpl's public functions: each error names the parameter."""

from __future__ import annotations

import math
from collections.abc import Sequence, Set as AbstractSet
from typing import Any


def check_positive_int(param: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (bools are not ints here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{param} must be a positive int, got {value!r}")


def check_non_negative_int(param: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 0 (bools are not ints here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{param} must be a non-negative int, got {value!r}")


def check_positive_number(param: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite int or float > 0 (a temperature, a scale)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{param} must be a positive finite number, got {value!r}")


def check_fraction(param: str, value: Any, open_interval: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in [0, 1] (in (0, 1) with ``open_interval``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not (0 < value < 1 if open_interval else 0 <= value <= 1):
        interval = "the open interval (0, 1)" if open_interval else "[0, 1]"
        raise ValueError(f"{param} must be a number in {interval}, got {value!r}")


def check_choice(param: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{param} must be one of {list(allowed)}, got {value!r}")


def check_causal_lm(param: str, model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` looks like a Hugging Face causal LM: an ``nn.Module`` with a
    ``config`` and at least one parameter."""
    from torch import nn

    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not list(model.parameters()):
        raise TypeError(f"{param} must be a Hugging Face causal LM (an nn.Module with a config), "
                        f"got {type(model).__name__}")


def as_device(param: str, value: Any):
    """``value`` (a str like ``"cpu"``/``"cuda:1"`` or a ``torch.device``) as a ``torch.device``."""
    import torch

    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{param} must be a str or torch.device, got {type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"{param} {value!r} is not a device: {exc}") from None


def check_layer_indices(keep: Sequence[int], n_layers: int | None = None, param: str = "keep") -> tuple[int, ...]:
    """``keep`` (the argument named ``param``) as a tuple after checking that it is a non-empty,
    strictly increasing sequence of layer indices in ``[0, n_layers)`` (non-negative when ``n_layers``
    is None)."""
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence) or len(keep) == 0:
        raise ValueError(f"{param} must be a non-empty sequence of layer indices, got {keep!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        raise ValueError(f"{param} must hold ints, got {list(keep)!r}")
    if min(keep) < 0 or (n_layers is not None and max(keep) >= n_layers):
        bound = "" if n_layers is None else f", below the model's {n_layers} layers"
        raise ValueError(f"{param} must hold non-negative layer indices{bound}, got {list(keep)}")
    if any(a >= b for a, b in zip(keep, keep[1:])):
        raise ValueError(f"{param} must be strictly increasing (sorted, no duplicates), got {list(keep)}")
    return tuple(keep)


def check_layer_set(param: str, skip: Any, n_layers: int) -> tuple[int, ...]:
    """``skip`` (the argument named ``param``: a sequence or set of layers, e.g. layers to skip) as a
    sorted tuple, after checking that it holds distinct int layer indices in ``[0, n_layers)`` (it may
    be empty)."""
    if isinstance(skip, (str, bytes)) or not isinstance(skip, (Sequence, AbstractSet)):
        raise ValueError(f"{param} must be a sequence or set of layer indices, got {skip!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in skip):
        raise ValueError(f"{param} must hold ints, got {list(skip)!r}")
    if any(not 0 <= i < n_layers for i in skip):
        raise ValueError(f"{param} must hold layer indices in [0, {n_layers}), got {sorted(skip)}")
    if len(set(skip)) != len(skip):
        raise ValueError(f"{param} must not repeat a layer index, got {list(skip)}")
    return tuple(sorted(skip))


def all_finite(values: Any) -> bool:
    """Whether the tensor ``values`` holds no NaN and no infinity. A NaN or an infinity makes the sum
    non-finite, so a finite sum settles it with one reduction (about 30 times faster on a CPU than
    ``isfinite(values).all()``, which writes a mask of the whole tensor); only a non-finite sum — also
    finite values whose sum overflows — is looked at element by element."""
    import torch

    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


def check_finite(param: str, values: Any) -> None:
    """Raise ``ValueError`` if the tensor ``values`` holds a NaN or an infinity: a ranking would put a
    NaN first (``argsort``, ``argmax``) and keep what it scores."""
    if not all_finite(values):
        raise ValueError(f"{param} must be finite, got NaN or Inf values")


def check_logits(param: str, logits: Any) -> None:
    """Raise ``ValueError`` if ``logits`` hold a NaN or +Inf: ``argmax`` and ``topk`` would pick it
    first, and a softmax over it is NaN. (-Inf is a valid logit: a token that is ruled out.)"""
    import torch

    if bool((torch.isnan(logits) | torch.isposinf(logits)).any()):
        raise ValueError(f"{param} must not hold NaN or +Inf values")


def check_linear_input(param: str, x: Any, in_features: int) -> None:
    """The input of a linear layer: ``TypeError`` unless ``x`` is a floating-point tensor (integer
    token ids or a bool mask would be cast, or multiplied as integers, into garbage), ``ValueError``
    unless its last dimension is ``in_features``. Every custom layer's ``forward`` calls it, as
    ``nn.Linear`` itself refuses such inputs."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{param} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{param} must be a floating-point tensor of activations, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{param} must be a tensor [..., {in_features}], got shape {tuple(x.shape)}")


def vocabulary_size(model: Any) -> int | None:
    """``model.config.vocab_size`` (a Hugging Face causal LM), or ``None`` if the model has none."""
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_token_ids(param: str, ids: Any, vocab_size: int | None = None, model_param: str = "model",
                    min_len: int = 1) -> None:
    """Token ids must be a non-empty ``LongTensor [n_sequences, seq_len]`` with at least ``min_len``
    tokens per sequence (``TypeError`` for another type or dtype, ``ValueError`` for another shape),
    every id in ``[0, vocab_size)`` — the vocabulary of the model named ``model_param`` — or at least
    non-negative when ``vocab_size`` is None (``ValueError``). An id outside the vocabulary would
    otherwise fail deep inside the embedding lookup (on a GPU as a device-side assert, after which the
    CUDA context is unusable)."""
    import torch

    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{param} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype != torch.long:
        raise TypeError(f"{param} must be a LongTensor of token ids (torch.long), got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{param} must have shape [n_sequences, seq_len], got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{param} is empty: it must hold at least one sequence of token ids")
    if ids.shape[1] < min_len:
        raise ValueError(f"{param} must hold at least {min_len} tokens per sequence, got {ids.shape[1]}")
    outside = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
    if bool(outside.any()):  # one pass and one device sync when the ids are valid
        allowed = "non-negative token ids" if vocab_size is None else \
            f"token ids in [0, {vocab_size}), below the {model_param}'s vocabulary size {vocab_size}"
        raise ValueError(f"{param} must hold {allowed}, got ids in [{ids.min().item()}, {ids.max().item()}]")
