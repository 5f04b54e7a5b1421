r"""Weight-and-activation quantization (W8A8): integer inputs *and* integer weights for every matmul.

Weight-only quantization (W8A16, W4A16) shrinks the bytes a model stores, but each matmul still runs
in floating point. Quantizing the *inputs* of the linear layers too lets the matmul itself run on
integer units: with per-token input scales :math:`\Delta_X \in \mathbb{R}^{T}` and per-output-channel
weight scales :math:`\Delta_W \in \mathbb{R}^{C_o}`,

.. math:: Y \approx \mathrm{diag}(\Delta_X)\,\big(\bar X^{\mathrm{INT8}}\, \bar W^{\mathrm{INT8}\top}\big)\,\mathrm{diag}(\Delta_W),

one integer GEMM followed by a rescale of its int32 output (Xiao et al. 2022, SmoothQuant §2, Eq. 1:
:math:`\bar X^{\mathrm{INT8}} = \lceil X / \Delta \rfloor`, :math:`\Delta = \max|X| / (2^{N-1}-1)`).
A scale may vary along the *outer* dimensions of the GEMM (tokens of :math:`X`, output channels of
:math:`W`) but not along the inner one (input channels), which is summed over — so activations get one
scale per tensor or per token, never per input channel. The activation range is either **static**
(one scale calibrated beforehand from the absmax of calibration activations; later values beyond it
saturate) or **dynamic** (computed from each input at run time: per tensor or per token).

This module simulates that ("fake" quantization, on the shared grid of
:mod:`refimpl.quantization.uniform`): :class:`ActivationQuantizedLinear` holds the dequantized weight and
rounds its input to the activation grid in ``forward``; :func:`quantize_model_w8a8` swaps it in for
the linear layers of a model. SmoothQuant (:mod:`~refimpl.quantization.smoothquant`) and ZeroQuant
(:mod:`~refimpl.quantization.zeroquant`) are configurations of it; ``act_grid=None`` gives weight-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refimpl import anatomy, calibration
from refimpl._rollback import restores_on_error
from refimpl._validation import check_linear_input
from refimpl.quantization import uniform

#: The granularities of an activation ``[..., in]``: a scale may not vary along the input channels.
ACT_GRANULARITIES = ("tensor", "token")


def _check_grids(weight_grid: uniform.Grid | None, act_grid: uniform.Grid | None) -> None:
    if weight_grid is not None:
        uniform.check_grid("weight_grid", weight_grid, uniform.WEIGHT_GRANULARITIES)
    if act_grid is not None:
        uniform.check_grid("act_grid", act_grid, ACT_GRANULARITIES)
    if weight_grid is None and act_grid is None:
        raise ValueError("weight_grid and act_grid are both None: nothing to quantize")


class _StraightThrough(torch.autograd.Function):
    """Forward: the rounded value; backward: the gradient of the identity (Bengio et al. 2013)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return x_hat.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``x_hat`` (the quantized ``x``) in the forward pass, with the gradient passed to ``x`` unchanged:
    the straight-through estimator that makes rounding trainable."""
    return _StraightThrough.apply(x, x_hat.detach())


class ActivationQuantizedLinear(nn.Module):
    """A linear layer computing with a quantized weight and quantized inputs (simulated).

    The weight is fake-quantized once, here, on ``weight_grid`` (per tensor, channel or group); each
    input is fake-quantized in :meth:`forward` on ``act_grid``: per token or per tensor from its own
    range (dynamic), or, when ``static_absmax`` is given, per tensor with that calibrated range
    (static). ``weight_grid=None`` keeps the weight in full precision; ``act_grid=None`` keeps the
    input (weight-only).

    Rounding has no useful gradient; when the input requires one, :meth:`forward` passes it straight
    through the activation quantizer (straight-through estimator), so the module can be trained.
    """

    def __init__(self, linear: nn.Linear, weight_grid: uniform.Grid | None = uniform.Grid(8),
                 act_grid: uniform.Grid | None = uniform.Grid(8, per="token"),
                 static_absmax: float | torch.Tensor | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_grids(weight_grid, act_grid)
        if static_absmax is not None and (act_grid is None or act_grid.granularity != "tensor"
                                          or not act_grid.symmetric):
            raise ValueError("static_absmax (a static range) needs a symmetric act_grid per tensor")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_grid, self.act_grid = weight_grid, act_grid
        weight = self.quantize_weight(linear.weight.detach())
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)  # dequantized W, [out, in]
        self.bias = linear.bias  # shared with the original layer, not quantized (added to the int32 output)
        input_scale = None
        if static_absmax is not None:  # Eq. 1 with a calibrated range: Delta = max|X| / (2^(N-1) - 1)
            absmax = torch.as_tensor(static_absmax, dtype=torch.float32).detach().reshape(1, 1)  # [1, 1]
            if not torch.isfinite(absmax).all() or absmax.item() < 0:
                raise ValueError(f"static_absmax must be a finite number >= 0, got {absmax.item()!r}")
            # max|X| / q_max on act_grid's narrow range, max|X| / ((2^N - 1) / 2) on its full range
            input_scale = uniform.absmax_scale(absmax, act_grid).clamp_min(torch.finfo(torch.float32).tiny)
        self.register_buffer("input_scale", input_scale)  # static per-tensor scale, or None: dynamic

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight [out, in]`` on this layer's weight grid (dequantized); unchanged if ``weight_grid`` is None."""
        if self.weight_grid is None:
            return weight
        # scales as a packed layer stores them
        return uniform.fake_quantize(weight, self.weight_grid, uniform.WEIGHT_SCALE_DTYPE)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the integer GEMM sees it (dequantized), ``x [..., in_features]``."""
        if self.act_grid is None:
            return x
        if self.input_scale is not None:  # static: the calibrated scale, values beyond it saturate
            qparams = uniform.QParams(self.input_scale, torch.zeros_like(self.input_scale), self.act_grid)
            x_hat = uniform.dequantize(uniform.quantize(x, qparams), qparams, x.shape).to(x.dtype)
        else:  # dynamic: the range of this very input, per tensor or per token
            x_hat = uniform.fake_quantize(x, self.act_grid)
        return straight_through(x, x_hat) if x.requires_grad and torch.is_grad_enabled() else x_hat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input("x", x, self.in_features)
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        w, a = self.weight_grid, self.act_grid
        weight = "fp" if w is None else f"int{w.bits} per {w.granularity}" + (
            f" of {w.group_size}" if w.group_size else "")
        act = "fp" if a is None else (
            f"int{a.bits} per {a.granularity} {'static' if self.input_scale is not None else 'dynamic'}")
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={weight}, input={act}"


def activation_absmax(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
                      skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """:math:`\\max_t |X_{t,j}|` for every input channel :math:`j` of every linear layer inside the
    decoder blocks, on the calibration token ``blocks``: ``{full module name: float32[in_features]}``.

    Static activation ranges (:func:`quantize_model_w8a8`) and SmoothQuant's smoothing factors both
    start from it. The model is not changed, so every layer sees full-precision inputs.
    """
    return {name: stats.absmax for name, stats in calibration.input_statistics(model, blocks, batch_size, skip).items()}


@torch.no_grad()
@restores_on_error("model")
def quantize_model_w8a8(
    model: nn.Module,
    blocks: torch.Tensor | None = None,
    weight_grid: uniform.Grid | None = uniform.Grid(8),
    act_grid: uniform.Grid | None = uniform.Grid(8, per="token"),
    static: bool = False,
    skip: tuple[str, ...] = ("lm_head",),
    batch_size: int = 8,
) -> nn.Module:
    """Replace every linear layer of ``model`` (except those named in ``skip``) by an
    :class:`ActivationQuantizedLinear`, in place.

    ``static=True`` calibrates one per-tensor input range per layer on ``blocks`` (the absmax of its
    inputs over all calibration tokens, :func:`activation_absmax`) and needs a symmetric ``act_grid``
    per tensor; otherwise ranges are dynamic and ``blocks`` is not used. ``act_grid=None`` is weight-only
    quantization (W8A16 with the default ``weight_grid``, 8 bits per channel).

    Every replacement is built before the first one is swapped in, and any error (bad argument, a layer
    whose weight holds NaN) leaves the model as it was (a copy of its tensors is held during the call).

    Returns:
        ``model``, modified in place.
    """
    if not isinstance(static, bool):
        raise TypeError(f"static must be a bool, got {type(static).__name__}")
    _check_grids(weight_grid, act_grid)  # the cheap checks come before the calibration pass
    linears = anatomy.compressed_linears(model, skip)
    if weight_grid is not None and weight_grid.group_size is not None:
        uniform.check_model_grid(model, weight_grid, skip)
    absmax: dict[str, torch.Tensor] = {}
    if static:
        if act_grid is None or act_grid.granularity != "tensor":
            raise ValueError("static=True calibrates one range per tensor: use an act_grid with per='tensor'")
        if blocks is None:
            raise ValueError("blocks (calibration token ids) are needed when static=True")
        absmax = activation_absmax(model, blocks, batch_size)
        missing = [name for name in linears if name not in absmax]
        if missing:
            raise ValueError(f"no calibrated range for {missing}: static ranges are calibrated inside the "
                             f"decoder blocks only; add these layers to skip")
    replacements = {}
    for name, linear in linears.items():
        try:
            replacements[name] = ActivationQuantizedLinear(linear, weight_grid, act_grid,
                                                           absmax[name].max() if static else None)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return anatomy.swap_linears(model, replacements)
