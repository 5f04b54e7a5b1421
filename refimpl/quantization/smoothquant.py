r"""SmoothQuant: migrating the quantization difficulty from activations to weights (Xiao et al. 2022).

In LLMs a few input *channels* of the linear layers carry activations up to 100x larger than the
rest, in every token (arXiv:2211.10438, §3). A per-tensor or per-token activation scale is set by
those channels, so all other channels land on a handful of codes; a per-channel activation scale
would fix it, but does not fit an integer GEMM (the scale would vary along the summed dimension, see
:mod:`~refimpl.quantization.activation`). Weights, by contrast, are flat and easy to quantize.
SmoothQuant moves the difficulty across with a per-input-channel factor :math:`s \in \mathbb{R}^{C_i}`
that leaves the product unchanged (§4, Eq. 2; :math:`W` is :math:`[C_i, C_o]` in the paper, ``[out,
in]`` in PyTorch):

.. math:: Y = \big(X \,\mathrm{diag}(s)^{-1}\big) \cdot \big(\mathrm{diag}(s)\, W\big) = \hat X \hat W .

The migration strength :math:`\alpha` splits the range between the two (Eq. 4):

.. math:: s_j = \max(|X_j|)^{\alpha} \,/\, \max(|W_j|)^{1-\alpha},

so that :math:`\max|\hat X_j| = \max|\hat W_j| = \sqrt{\max|X_j| \max|W_j|}` at :math:`\alpha = 0.5`;
:math:`\alpha = 1` gives every activation channel the range 1 (Eq. 3, :math:`s_j = \max|X_j|`), and
:math:`\alpha = 0` every weight column. :math:`\max|X_j|` is calibrated once, offline.

:func:`smooth_model` folds :math:`\mathrm{diag}(s)^{-1}` into the RMSNorm that produces :math:`X` and
:math:`\mathrm{diag}(s)` into the weights that read it, so the smoothed model is a model of the same
architecture that computes the same function; then quantize it with
:func:`~refimpl.quantization.activation.quantize_model_w8a8` (the paper's SmoothQuant-O1/O2/O3 are
weights per tensor and activations dynamic per token / dynamic per tensor / static per tensor).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from refimpl import anatomy, calibration
from refimpl._rollback import restores_on_error
from refimpl._validation import all_finite
from refimpl.quantization.activation import activation_absmax

# The authors' recipe for Llama-style decoders: the module producing an input -> the linear layers
# reading it. o_proj and down_proj are not smoothed there: no norm precedes them. down_proj's input is
# act(gate) * up, elementwise, so its factors can be folded exactly into up_proj's output rows
# (``smooth_down_proj=True``, not in the paper); o_proj's could go into v_proj's rows, but under GQA one
# v row feeds several query heads, which would then have to share factors — not done here.
SMOOTHED = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
DOWN_PROJ = {"mlp.up_proj": ("mlp.down_proj",)}


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (migration strength) must be a number in [0, 1], got {alpha!r}")


def smoothing_factors(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """:math:`s_j = \\max|X_j|^{\\alpha} / \\max|W_j|^{1-\\alpha}` (Eq. 4) for one input shared by
    several linear layers.

    Args:
        act_absmax: :math:`\\max_t |X_{t,j}|` per input channel, ``[C_i]`` (see
            :func:`~refimpl.quantization.activation.activation_absmax`).
        weights: the ``[out_k, C_i]`` weights of the layers reading that input; :math:`\\max|W_j|` is
            taken over all of them (they must share one :math:`s`, folded into one norm).
        alpha: migration strength :math:`\\alpha \\in [0, 1]`.

    Returns:
        ``s: float32[C_i]``. A channel that is all zero in the activations or in the weights gets
        :math:`s_j = 1` (nothing to balance, and Eq. 4 would give 0 or infinity there).
    """
    _check_alpha(alpha)
    if not isinstance(act_absmax, torch.Tensor) or act_absmax.dim() != 1 or act_absmax.numel() == 0:
        raise ValueError("act_absmax must be a non-empty 1-D tensor [C_i] of per-channel activation maxima")
    if not all_finite(act_absmax) or (act_absmax < 0).any():
        raise ValueError("act_absmax must hold finite values >= 0")
    if not weights or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        raise ValueError("weights must be a non-empty list of 2-D weights [out, in]")
    if any(w.shape[1] != act_absmax.numel() for w in weights):
        raise ValueError(f"every weight must have in_features = {act_absmax.numel()} (the length of act_absmax)")
    if not all(all_finite(w) for w in weights):
        raise ValueError("weights hold NaN or Inf values")
    x_max = act_absmax.detach().float()  # max|X_j|, [C_i]
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # max|W_j|, [C_i]
    degenerate = (x_max == 0) | (w_max == 0)
    s = x_max.pow(alpha) / w_max.pow(1.0 - alpha)
    s = torch.where(degenerate, torch.ones_like(s), s)
    if not all_finite(s) or (s == 0).any():
        raise ValueError("smoothing factors under- or overflow float32; the ranges are too extreme")
    return s


def _smoothing_targets(model: nn.Module, pairs: dict[str, tuple[str, ...]]) -> list[tuple[nn.Module, list[nn.Linear], str]]:
    """``(producer, linear layers reading its output, full name of the first reader)`` for every entry
    of ``pairs`` in every decoder layer; ``TypeError`` unless the model has that structure."""
    names = {id(m): n for n, m in model.named_modules()}
    targets = []
    for layer in anatomy.decoder_layers(model):
        modules = dict(layer.named_modules())
        for producer_name, linear_names in pairs.items():
            producer, linears = modules.get(producer_name), [modules.get(n) for n in linear_names]
            weight = getattr(producer, "weight", None)
            if not isinstance(weight, torch.Tensor) or not all(isinstance(m, nn.Linear) for m in linears):
                raise TypeError(f"smooth_model needs a Llama-style decoder: {producer_name} with a weight feeding "
                                f"nn.Linear layers {list(linear_names)} in every decoder layer")
            if any(m.in_features != weight.shape[0] for m in linears):
                raise TypeError(f"{producer_name} ({weight.shape[0]} outputs) does not match {list(linear_names)}")
            targets.append((producer, linears, names[id(linears[0])]))
    return targets


@torch.no_grad()
@restores_on_error("model")
def smooth_model(model: nn.Module, blocks: torch.Tensor | None, alpha: float = 0.5, batch_size: int = 8,
                 smooth_down_proj: bool = False,
                 statistics: dict[str, calibration.InputStatistics] | None = None) -> nn.Module:
    """Fold SmoothQuant's factors into a Llama-style decoder, in place.

    For each decoder layer: :math:`s` from the inputs of q/k/v (Eq. 4, over their three weights);
    ``input_layernorm.weight /= s`` and the q/k/v weights' columns ``*= s``; likewise
    ``post_attention_layernorm`` with gate/up. RMSNorm multiplies its normalised input elementwise by
    its weight, so dividing that weight by :math:`s` divides :math:`X` by :math:`s`: in exact
    arithmetic the model computes the same function (float rounding aside). o_proj and down_proj keep
    their inputs (see :data:`SMOOTHED`); ``smooth_down_proj=True`` also divides up_proj's output rows
    by the factors of down_proj's input — exact too, since that input is ``act(gate) * up``.

    All factors are computed from activations of the unmodified model before anything changes, so an
    error leaves the model untouched: either from a pass over the calibration token ``blocks``, or,
    with ``blocks=None``, from ``statistics`` captured on this unmodified model
    (:func:`refimpl.calibration.input_statistics`; their ``absmax``), which lets an
    :math:`\\alpha` sweep reuse one capture.

    Returns:
        ``model``, modified in place. Any error leaves it as it was (a copy of its tensors is held
        during the call).
    """
    _check_alpha(alpha)
    if not isinstance(smooth_down_proj, bool):
        raise TypeError(f"smooth_down_proj must be a bool, got {type(smooth_down_proj).__name__}")
    targets = _smoothing_targets(model, {**SMOOTHED, **(DOWN_PROJ if smooth_down_proj else {})})
    if (blocks is None) == (statistics is None):
        raise ValueError("pass exactly one of blocks (calibration tokens) and statistics (captured once)")
    if statistics is not None:
        missing = [first for _, _, first in targets if first not in statistics]
        if missing:
            raise ValueError(f"statistics has no entry for {missing[0]} (and {len(missing) - 1} more layers)")
        absmax = {first: statistics[first].absmax for _, _, first in targets}
    else:
        absmax = activation_absmax(model, blocks, batch_size)
    factors = [smoothing_factors(absmax[first], [m.weight for m in linears], alpha)
               for _, linears, first in targets]
    for (producer, linears, _), s in zip(targets, factors):  # s: [C_i]
        # X -> X diag(s)^-1, folded into what produces X: a norm's weight [C_i] or a linear's rows [C_i, in]
        producer.weight.div_(s.to(producer.weight).reshape(-1, *[1] * (producer.weight.dim() - 1)))
        if getattr(producer, "bias", None) is not None:  # a LayerNorm's shift or a linear's bias, [C_i]
            producer.bias.div_(s.to(producer.bias))
        for linear in linears:
            linear.weight.mul_(s.to(linear.weight))  # W [out, in] * s [in]: diag(s) W in the paper's layout
    return model
