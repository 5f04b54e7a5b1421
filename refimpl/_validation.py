"""Argument checks shared by refimpl's public functions: each error names the parameter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_positive_int(param: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (bools are not ints here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{param} must be a positive int, got {value!r}")


def check_non_negative_int(param: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 0 (bools are not ints here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{param} must be a non-negative int, got {value!r}")


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
