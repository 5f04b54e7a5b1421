r"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2022, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv:2106.09685).

A frozen weight :math:`W_0 \in \mathbb{R}^{d_\text{out} \times d_\text{in}}` is adapted by a product of
two small trained matrices, :math:`B \in \mathbb{R}^{d_\text{out} \times r}` and
:math:`A \in \mathbb{R}^{r \times d_\text{in}}` with :math:`r \ll \min(d_\text{in}, d_\text{out})` (§4.1, Eq. 3):

.. math:: h = W_0 x + \frac{\alpha}{r} B A x .

:math:`A` starts random (Kaiming-uniform, as in the reference implementation) and :math:`B` at zero,
so training starts from the unchanged model; only :math:`A` and :math:`B` train. After training,
:math:`\frac{\alpha}{r} BA` can be **merged** into the weight, leaving no extra cost at inference, and
unmerged again. The frozen base may be any layer that computes :math:`W_0 x` — a float ``nn.Linear``,
or a quantized one (:class:`~refimpl.quantization.packed.QuantizedLinear`,
:class:`~refimpl.quantization.packed.CodeBookLinear`: QLoRA, :mod:`refimpl.quantization.qlora`).
Merging into a quantized base yields a float ``nn.Linear`` holding its dequantized weight plus the
update (the merged weight is generally not on the quantization grid).

Chapters 04 (QLoRA), 05 (recovery after pruning) and 06 (distillation) share this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refimpl import anatomy
from refimpl._rollback import restores_on_error
from refimpl._validation import check_linear_input, check_positive_int

# The attention and MLP projections of a Llama-style decoder layer.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_adapter(base: nn.Module, r: int, alpha: float) -> None:
    """The checks of one adapter on ``base``, before anything is built."""
    if not isinstance(base, nn.Linear) and not hasattr(base, "dequantized_weight"):
        raise TypeError(f"base must be an nn.Linear or a quantized linear layer, got {type(base).__name__}")
    check_positive_int("r", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if r > min(base.in_features, base.out_features):
        raise ValueError(f"r ({r}) must not exceed min(in_features, out_features) = "
                         f"{min(base.in_features, base.out_features)}")


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The float weight ``[out, in]`` a base layer computes with (dequantized for quantized layers)."""
    if isinstance(base, nn.Linear):
        return base.weight.detach()
    return base.dequantized_weight()


class LoRALinear(nn.Module):
    """A frozen ``base`` layer plus a trainable low-rank update :math:`\\frac{\\alpha}{r} BA`."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0):
        super().__init__()
        _check_adapter(base, r, alpha)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base, self.r, self.alpha, self.scaling = base, r, float(alpha), float(alpha) / r
        for p in base.parameters():
            p.requires_grad_(False)
        device = next(iter(list(base.parameters()) + list(base.buffers()))).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """:math:`\\frac{\\alpha}{r} BA`, ``[out, in]``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input("x", x, self.in_features)
        out = self.base(x)
        if self.merged:
            return out
        # x [..., in] -> [..., r] -> [..., out]
        return out + self.scaling * F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into a float base's weight (``nn.Linear`` only; see :func:`merge_lora`)."""
        if not isinstance(self.base, nn.Linear):
            raise TypeError("merge() needs a float nn.Linear base; merge_lora() replaces a quantized one")
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (float rounding aside, the original weight)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


@restores_on_error("model")
def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = DEFAULT_TARGETS) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each layer whose name ends with one of ``targets``
    in a :class:`LoRALinear`, in place; only the adapters then require gradients. Every adapter is
    built before the first is swapped in, and any error leaves the model as it was (a copy of its
    tensors is held during the call).

    Returns:
        ``model``.
    """
    layers = check_lora_arguments(model, r, alpha, targets)
    adapters = {name: LoRALinear(m, r, alpha) for name, m in layers.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    anatomy.swap_linears(model, adapters)
    for adapter in adapters.values():
        adapter.lora_A.requires_grad_(True)
        adapter.lora_B.requires_grad_(True)
    return model


def check_lora_arguments(model: nn.Module, r: int, alpha: float, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """Check every adapter :func:`add_lora` would build (``ValueError``/``TypeError`` naming the
    problem) without changing ``model``; return the layers it would wrap, by name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(targets, tuple) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"targets must be a non-empty tuple of layer-name endings, got {targets!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA adapters (merge_lora first to add new ones)")
    layers = {name: m for name, m in model.named_modules() if name.split(".")[-1] in targets}
    if not layers:
        raise ValueError(f"model has no layer named {list(targets)}")
    for name, m in layers.items():
        try:
            _check_adapter(m, r, alpha)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"layer {name}: {exc}") from None
    return layers


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (:math:`A` and :math:`B` of every :class:`LoRALinear`)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


@torch.no_grad()
@restores_on_error("model")
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by one float ``nn.Linear`` with weight
    :math:`W_0 + \\frac{\\alpha}{r}BA` (:math:`W_0` dequantized for a quantized base), in place.

    Returns:
        ``model``. An error leaves it as it was (a copy of its tensors is held during the call).
    """
    replacements = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            weight = _base_weight(m.base).float() + (0 if m.merged else m.delta_weight().float())
            bias = getattr(m.base, "bias", None)
            dtype = m.base.weight.dtype if isinstance(m.base, nn.Linear) else torch.float32
            replacements[name] = anatomy.linear_from_weight(weight, bias, dtype)
    if not replacements:
        raise ValueError("model has no LoRALinear layer to merge")
    return anatomy.swap_linears(model, replacements)
