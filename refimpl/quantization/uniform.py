r"""Uniform affine quantization: the primitive every other quantization method builds on.

A real value :math:`x` is represented by an integer code :math:`q` on :math:`b` bits with a scale
:math:`s` and a zero-point :math:`z` (Jacob et al. 2018, Eq. 1; Gholami et al. 2021, Eq. 1-2):

.. math:: q = \mathrm{clamp}\big(\lfloor x / s \rceil + z,\; q_\min,\; q_\max\big), \qquad \hat x = s\,(q - z).

- **Symmetric** (absmax): :math:`z = 0`, codes :math:`[-(2^{b-1}-1),\, 2^{b-1}-1]`, and
  :math:`s = \max|x| / q_\max`. The grid is centred on zero; one code of the two's-complement range is
  left unused so that the grid stays symmetric.
- **Asymmetric** (zero-point): codes :math:`[0,\, 2^b-1]`, :math:`s = (\max x - \min x)/(2^b - 1)` and
  :math:`z = \lfloor -\min x / s \rceil`, over a range widened to include 0 so that zero is exactly
  representable (padding, ReLU outputs and sparse weights stay exact).

**Granularity** — which values share one :math:`(s, z)`: the whole tensor, each output channel (row
of a weight ``[out, in]``), each group of ``group_size`` consecutive inputs of a row, or each token
(row of an activation ``[..., tokens, features]``). Finer granularity follows the data more closely
at the cost of storing more scales.

**Static vs dynamic ranges** — :func:`compute_qparams` on calibration data once, then
:func:`quantize` every later input with those parameters (static: values outside the calibrated
range saturate at :math:`q_\min`/:math:`q_\max`); or compute the parameters from each input itself
(dynamic: :func:`fake_quantize`).

Round-to-nearest (RTN) weight quantization applies this to every linear layer of a model without any
data: :func:`quantize_model_rtn`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refimpl import anatomy
from refimpl._rollback import restores_on_error
from refimpl._validation import check_choice, check_positive_int

GRANULARITIES = ("tensor", "channel", "group", "token")
MIN_BITS, MAX_BITS = 2, 8
#: The dtype weight scales are stored in (:mod:`refimpl.quantization.packed`); weight quantizers round
#: their scales to it so that simulated and packed models compute the same values.
WEIGHT_SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class QParams:
    """Quantization parameters: ``scale`` and ``zero_point`` broadcastable against the grouped input
    (see :func:`grouped`), and the code range they were made for."""

    scale: torch.Tensor  # float32
    zero_point: torch.Tensor  # float32 (0 for symmetric), integer-valued
    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None

    @property
    def qmin(self) -> int:
        return code_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.bits, self.symmetric)[1]


# --- primitives ---------------------------------------------------------------------------------


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(q_min, q_max)``: ``[-(2^(b-1)-1), 2^(b-1)-1]`` symmetric, ``[0, 2^b-1]`` asymmetric."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def check_input(x: torch.Tensor, param: str = "x") -> None:
    """A value to quantize must be a non-empty floating-point tensor of finite values (``TypeError`` for
    another type or dtype, ``ValueError`` for an empty, 0-dimensional or non-finite one); ``param`` names it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{param} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{param} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{param} must be a non-empty tensor with at least one dimension")
    if not torch.isfinite(x).all():
        raise ValueError(f"{param} holds NaN or Inf values; quantization needs finite inputs")


def _check_granularity(x: torch.Tensor, granularity: str, group_size: int | None) -> None:
    check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "group":
        check_positive_int("group_size", group_size)
        if x.shape[-1] % group_size:
            raise ValueError(f"group_size {group_size} must divide the last dimension ({x.shape[-1]})")
    elif group_size is not None:
        raise ValueError(f"group_size is only used with granularity='group', got {group_size!r}")
    if granularity in ("channel", "token") and x.dim() < 2:
        raise ValueError(f"granularity '{granularity}' needs a tensor of at least 2 dimensions")


def grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View ``x`` so that the values sharing one scale lie along the last dimension.

    tensor: ``[1, numel]``; channel and token: ``[rows, last]`` (every row of the last dimension —
    an output channel of a weight ``[out, in]``, a token of an activation ``[..., features]``);
    group: ``[rows, last / group_size, group_size]``.
    """
    if granularity == "tensor":
        return x.reshape(1, -1)  # [1, numel]
    rows = x.reshape(-1, x.shape[-1])  # [rows, last]
    if granularity == "group":
        return rows.reshape(rows.shape[0], -1, group_size)  # [rows, last / g, g]
    return rows


def compute_qparams(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> QParams:
    """Scales (and zero-points) from the range of ``x`` — its absmax (symmetric) or its min and max
    widened to include 0 (asymmetric) — per tensor, channel, group or token.

    ``scale_dtype`` rounds the scales to the precision they will be stored in (e.g. float16), so that
    codes computed here are the ones a packed layer reproduces.
    """
    check_input(x)
    check_bits(bits)
    _check_granularity(x, granularity, group_size)
    qmin, qmax = code_range(bits, symmetric)
    g = grouped(x.detach().float(), granularity, group_size)  # values sharing a scale on the last dim
    # The smallest positive (subnormal) value of scale_dtype: only all-zero groups fall back on it, so
    # groups of small values keep the scale their range asks for.
    tiny = torch.nextafter(torch.zeros((), dtype=scale_dtype), torch.ones((), dtype=scale_dtype)).item()
    if symmetric:
        absmax = g.abs().amax(dim=-1, keepdim=True)
        scale = (absmax / qmax).clamp_min(tiny).to(scale_dtype).float()
        zero_point = torch.zeros_like(scale)
    else:
        low = g.amin(dim=-1, keepdim=True).clamp_max(0.0)
        high = g.amax(dim=-1, keepdim=True).clamp_min(0.0)
        scale = ((high - low) / (qmax - qmin)).clamp_min(tiny).to(scale_dtype).float()
        zero_point = (qmin - low / scale).round().clamp(qmin, qmax)
    return QParams(scale, zero_point, bits, symmetric, granularity, group_size)


def quantize(x: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, q_min, q_max)`` of ``x`` (int32, in the shape of
    ``grouped(x)``). Values outside the range ``qparams`` were made for saturate (static ranges)."""
    check_input(x)
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be QParams, got {type(qparams).__name__}")
    _check_granularity(x, qparams.granularity, qparams.group_size)
    g = grouped(x.float(), qparams.granularity, qparams.group_size)
    try:
        codes = torch.round(g / qparams.scale) + qparams.zero_point
    except RuntimeError as exc:
        raise ValueError(f"qparams do not fit x of shape {tuple(x.shape)}: {exc}") from None
    return codes.clamp(qparams.qmin, qparams.qmax).to(torch.int32)


def dequantize(codes: torch.Tensor, qparams: QParams, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Real values ``s (q - z)`` of ``codes``, reshaped to ``shape`` (the shape of the quantized input)."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point():
        raise TypeError("codes must be an integer tensor from quantize()")
    values = qparams.scale * (codes.float() - qparams.zero_point)
    return values.reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` with parameters computed from ``x`` itself (dynamic range): the
    values a quantized model computes with, in ``x``'s dtype. ``scale_dtype`` as in :func:`compute_qparams`."""
    qparams = compute_qparams(x, bits, symmetric, granularity, group_size, scale_dtype)
    return dequantize(quantize(x, qparams), qparams, x.shape).to(x.dtype)


# --- a whole model ------------------------------------------------------------------------------


def check_model_grid(model: torch.nn.Module, bits: int, group_size: int | None,
                     skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Check ``bits``, that ``group_size`` divides the inputs of every linear layer to be quantized and
    that their weights are finite, so that a method can fail before it changes the first layer."""
    check_bits(bits)
    for name, linear in anatomy.compressed_linears(model, skip).items():
        if group_size is not None and linear.in_features % group_size:
            raise ValueError(f"group_size {group_size} must divide in_features of {name} ({linear.in_features})")
        if not torch.isfinite(linear.weight).all():
            raise ValueError(f"the weight of {name} holds NaN or Inf values")


@torch.no_grad()
@restores_on_error("model")
def quantize_model_rtn(
    model: torch.nn.Module,
    bits: int,
    symmetric: bool = False,
    granularity: str = "group",
    group_size: int | None = 64,
    skip: tuple[str, ...] = ("lm_head",),
) -> torch.nn.Module:
    """Round-to-nearest weight quantization of every linear layer, in place (simulated: each weight
    is replaced by its dequantized values; :mod:`refimpl.quantization.packed` stores real codes).

    Scales are rounded to float16, the precision a packed layer stores (:data:`WEIGHT_SCALE_DTYPE`),
    so the simulated model computes exactly what the packed one does.

    All layers are checked before the first one changes, and any error leaves the model as it was (a
    copy of its tensors is held during the call).

    Returns:
        ``model``, modified in place.
    """
    linears = anatomy.compressed_linears(model, skip)
    check_bits(bits)
    check_choice("granularity", granularity, ("tensor", "channel", "group"))
    for name, linear in linears.items():
        check_input(linear.weight, f"weight of {name}")
        _check_granularity(linear.weight, granularity, group_size)
    for linear in linears.values():
        linear.weight.copy_(fake_quantize(linear.weight, bits, symmetric, granularity, group_size, WEIGHT_SCALE_DTYPE))
    return model
