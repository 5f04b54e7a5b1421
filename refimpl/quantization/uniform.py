r"""Uniform affine quantization: the primitive every other quantization method builds on.

A real value :math:`x` is represented by an integer code :math:`q` on :math:`b` bits with a scale
:math:`s` and a zero-point :math:`z` (Jacob et al. 2018, Eq. 1; Gholami et al. 2021, Eq. 1-2):

.. math:: q = \mathrm{clamp}\big(\lfloor x / s \rceil + z,\; q_\min,\; q_\max\big), \qquad \hat x = s\,(q - z).

- **Symmetric** (absmax): :math:`z = 0` and :math:`s = \max|x| \,/\, \tfrac{q_\max - q_\min}{2}`, the
  grid centred on zero, on one of two code ranges:

  - the *narrow range* (``narrow_range=True``, the default; TensorFlow's name): codes
    :math:`[-(2^{b-1}-1),\, 2^{b-1}-1]`, :math:`2^b - 1` levels, so :math:`s = \max|x| / q_\max`
    (:math:`\max|x|/7` at 4 bits) and :math:`\pm\max|x|` are grid points. The most negative code of
    the two's-complement range is left unused so that the grid stays symmetric.
  - the *full range* (``narrow_range=False``): all :math:`2^b` codes :math:`[-2^{b-1},\, 2^{b-1}-1]`
    and :math:`s = \max|x| / \tfrac{2^b-1}{2}` (:math:`\max|x|/7.5` at 4 bits), as GPTQ's reference
    code (``sym=True``: :math:`s = 2\max|x|/(2^b-1)`, zero :math:`2^{b-1}` on codes :math:`[0, 2^b-1]`),
    AutoGPTQ and compressed-tensors (llmcompressor) quantize. Its step is
    :math:`\tfrac{2^{b-1}-1}{2^{b-1}-1/2}` of the narrow one (14/15 at 4 bits); :math:`+\max|x|` lies
    half a step beyond :math:`q_\max` and saturates there, :math:`-\max|x|` rounds to :math:`q_\min`
    (or to :math:`q_\min + 1` when the stored scale rounds up; at exactly :math:`2^{b-1} - 1/2` steps
    the tie goes to the even code, :math:`q_\min`, with :func:`torch.round` as in those libraries).
    One quirk of GPTQ's reference code is not reproduced: a group without negative values keeps its
    minimum 0 there and gets :math:`s = \max x/(2^b-1)`, so that its values above :math:`q_\max s`
    saturate.
- **Asymmetric** (zero-point): codes :math:`[0,\, 2^b-1]` (always the full range), :math:`s = (\max x -
  \min x)/(2^b - 1)` and :math:`z = \lfloor -\min x / s \rceil`, over a range widened to include 0 so
  that zero is exactly representable (padding, ReLU outputs and sparse weights stay exact).

**Granularity** — which values share one :math:`(s, z)`: the whole tensor, each output channel (row
of a weight ``[out, in]``), each group of ``group_size`` consecutive inputs of a row, or each token
(row of an activation ``[..., tokens, features]``). Finer granularity follows the data more closely
at the cost of storing more scales. A :class:`Grid` holds these choices — :math:`b`, symmetric or
not (and a symmetric grid's range of codes), which values share a scale — and every quantizer of
:mod:`refimpl.quantization` takes one.

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
from refimpl._validation import all_finite, check_choice, check_positive_int

#: What one scale covers in a grid without groups: the tensor, a row of a weight, a row of an activation.
PER = ("tensor", "channel", "token")
GRANULARITIES = ("tensor", "channel", "group", "token")
#: The granularities a weight ``[out, in]`` is quantized at (a token is a row of an activation).
WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
MIN_BITS, MAX_BITS = 2, 8
#: The dtype weight scales are stored in (:mod:`refimpl.quantization.packed`); weight quantizers round
#: their scales to it so that simulated and packed models compute the same values.
WEIGHT_SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class Grid:
    r"""The integer grid values are rounded to (Eq. 1): ``bits``, symmetric (absmax) or asymmetric
    (zero-point), and which values share one scale: groups of ``group_size`` consecutive inputs of a
    row, or when ``group_size`` is None one scale ``per`` ``"channel"`` (a row of a weight ``[out, in]``),
    ``"token"`` (a row of an activation) or ``"tensor"``.

    ``narrow_range`` chooses a symmetric grid's codes (module docstring): True (the default for a
    symmetric grid), :math:`2^b - 1` codes :math:`[-(2^{b-1}-1), 2^{b-1}-1]`; False, all :math:`2^b`
    codes :math:`[-2^{b-1}, 2^{b-1}-1]` with the step :math:`\max|x| / ((2^b-1)/2)` of GPTQ's reference
    code and of compressed-tensors. An asymmetric grid always uses all :math:`2^b` codes
    :math:`[0, 2^b-1]`: its ``narrow_range`` is False, and passing True raises ``ValueError`` (the
    narrow asymmetric range :math:`[1, 2^b-1]` is not implemented). Left at None, the field takes the
    grid's own value: ``Grid(4).narrow_range`` is True, ``Grid(4, symmetric=False).narrow_range``
    False."""

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    per: str = "channel"
    narrow_range: bool | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(self.symmetric).__name__}")
        check_choice("per", self.per, PER)
        if self.group_size is not None:
            check_positive_int("group_size", self.group_size)
            if self.per != "channel":
                raise ValueError(f"group_size groups the inputs of a row: it needs per='channel', "
                                 f"got per={self.per!r}")
        if self.narrow_range is None:  # the grid's own range: narrow if symmetric, full if asymmetric
            object.__setattr__(self, "narrow_range", self.symmetric)
        elif not isinstance(self.narrow_range, bool):
            raise TypeError(f"narrow_range must be a bool or None, got {type(self.narrow_range).__name__}")
        elif self.narrow_range and not self.symmetric:
            raise ValueError("narrow_range=True needs symmetric=True: an asymmetric grid uses all 2^bits codes "
                             "[0, 2^bits - 1] (narrow_range False or None)")

    @property
    def granularity(self) -> str:
        """``"group"`` when ``group_size`` is set, else ``per``."""
        return "group" if self.group_size is not None else self.per

    @property
    def qmin(self) -> int:
        """The smallest code: ``-(2^(b-1)-1)`` symmetric on the narrow range, ``-2^(b-1)`` symmetric on
        the full range, ``0`` asymmetric."""
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1) - 1) if self.narrow_range else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        """The largest code: ``2^(b-1)-1`` symmetric (either range), ``2^b-1`` asymmetric."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass(frozen=True)
class QParams:
    """Quantization parameters: ``scale`` and ``zero_point`` broadcastable against the grouped input
    (see :func:`grouped`), and the grid they were made for."""

    scale: torch.Tensor  # float32
    zero_point: torch.Tensor  # float32 (0 for symmetric), integer-valued
    grid: Grid


# --- primitives ---------------------------------------------------------------------------------


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
    if not all_finite(x):
        raise ValueError(f"{param} holds NaN or Inf values; quantization needs finite inputs")


def check_grid(param: str, grid: Grid, granularities: tuple[str, ...] = GRANULARITIES) -> None:
    """Raise ``TypeError`` unless ``grid`` (the argument named ``param``) is a :class:`Grid`, and
    ``ValueError`` unless its granularity is one of ``granularities``."""
    if not isinstance(grid, Grid):
        raise TypeError(f"{param} must be a uniform.Grid, got {type(grid).__name__}")
    if grid.granularity not in granularities:
        raise ValueError(f"{param} must have a granularity in {list(granularities)}, got {grid.granularity!r}")


def _check_fits(x: torch.Tensor, grid: Grid) -> None:
    if grid.group_size is not None and x.shape[-1] % grid.group_size:
        raise ValueError(f"group_size {grid.group_size} must divide the last dimension ({x.shape[-1]})")
    if grid.granularity in ("channel", "token") and x.dim() < 2:
        raise ValueError(f"granularity '{grid.granularity}' needs a tensor of at least 2 dimensions")


def grouped(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """View ``x`` so that the values sharing one scale of ``grid`` lie along the last dimension.

    tensor: ``[1, numel]``; channel and token: ``[rows, last]`` (every row of the last dimension —
    an output channel of a weight ``[out, in]``, a token of an activation ``[..., features]``);
    group: ``[rows, last / group_size, group_size]``.
    """
    if grid.granularity == "tensor":
        return x.reshape(1, -1)  # [1, numel]
    rows = x.reshape(-1, x.shape[-1])  # [rows, last]
    if grid.granularity == "group":
        return rows.reshape(rows.shape[0], -1, grid.group_size)  # [rows, last / g, g]
    return rows


def absmax_scale(absmax: torch.Tensor, grid: Grid) -> torch.Tensor:
    r"""The step :math:`s` of a symmetric ``grid`` for values of largest magnitude ``absmax``:
    :math:`s = \max|x| / \tfrac{q_\max - q_\min}{2}` — :math:`\max|x| / q_\max` on the narrow range,
    :math:`\max|x| / \tfrac{2^b - 1}{2}` on the full range (module docstring)."""
    if not grid.symmetric:
        raise ValueError("absmax_scale needs a symmetric grid (an asymmetric one takes its scale from min and max)")
    return absmax / ((grid.qmax - grid.qmin) / 2)  # (q_max - q_min) / 2: q_max (narrow) or 2^(b-1) - 1/2 (full)


def compute_qparams(x: torch.Tensor, grid: Grid, scale_dtype: torch.dtype = torch.float32) -> QParams:
    """Scales (and zero-points) of ``grid`` from the range of ``x`` — its absmax (symmetric,
    :func:`absmax_scale`: on the narrow or the full range of codes) or its min and max widened to
    include 0 (asymmetric) — per tensor, channel, group or token.

    ``scale_dtype`` rounds the scales to the precision they will be stored in (e.g. float16), so that
    codes computed here are the ones a packed layer reproduces.
    """
    check_input(x)
    check_grid("grid", grid)
    _check_fits(x, grid)
    qmin, qmax = grid.qmin, grid.qmax
    g = grouped(x.detach().float(), grid)  # values sharing a scale on the last dim
    # The smallest positive (subnormal) value of scale_dtype: only all-zero groups fall back on it, so
    # groups of small values keep the scale their range asks for.
    tiny = torch.nextafter(torch.zeros((), dtype=scale_dtype), torch.ones((), dtype=scale_dtype)).item()
    if grid.symmetric:
        absmax = g.abs().amax(dim=-1, keepdim=True)
        scale = absmax_scale(absmax, grid).clamp_min(tiny).to(scale_dtype).float()
        zero_point = torch.zeros_like(scale)
    else:
        low = g.amin(dim=-1, keepdim=True).clamp_max(0.0)
        high = g.amax(dim=-1, keepdim=True).clamp_min(0.0)
        scale = ((high - low) / (qmax - qmin)).clamp_min(tiny).to(scale_dtype).float()
        zero_point = (qmin - low / scale).round().clamp(qmin, qmax)
    return QParams(scale, zero_point, grid)


def quantize(x: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, q_min, q_max)`` of ``x`` (int32, in the shape of
    ``grouped(x)``). Values outside the range ``qparams`` were made for saturate (static ranges)."""
    check_input(x)
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be QParams, got {type(qparams).__name__}")
    _check_fits(x, qparams.grid)
    g = grouped(x.float(), qparams.grid)
    try:
        codes = torch.round(g / qparams.scale) + qparams.zero_point
    except RuntimeError as exc:
        raise ValueError(f"qparams do not fit x of shape {tuple(x.shape)}: {exc}") from None
    return codes.clamp(qparams.grid.qmin, qparams.grid.qmax).to(torch.int32)


def dequantize(codes: torch.Tensor, qparams: QParams, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Real values ``s (q - z)`` of ``codes``, reshaped to ``shape`` (the shape of the quantized input)."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point():
        raise TypeError("codes must be an integer tensor from quantize()")
    values = qparams.scale * (codes.float() - qparams.zero_point)
    return values.reshape(shape)


def fake_quantize(x: torch.Tensor, grid: Grid, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize(quantize(x))`` with parameters of ``grid`` computed from ``x`` itself (dynamic
    range): the values a quantized model computes with, in ``x``'s dtype. ``scale_dtype`` as in
    :func:`compute_qparams`."""
    qparams = compute_qparams(x, grid, scale_dtype)
    return dequantize(quantize(x, qparams), qparams, x.shape).to(x.dtype)


# --- a whole model ------------------------------------------------------------------------------


def check_model_grid(model: torch.nn.Module, grid: Grid, skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Check that ``grid`` is a weight grid, that its ``group_size`` divides the inputs of every linear
    layer to be quantized and that their weights are finite, so that a method can fail before it
    changes the first layer."""
    check_grid("grid", grid, WEIGHT_GRANULARITIES)
    for name, linear in anatomy.compressed_linears(model, skip).items():
        if grid.group_size is not None and linear.in_features % grid.group_size:
            raise ValueError(f"group_size {grid.group_size} must divide in_features of {name} ({linear.in_features})")
        if not all_finite(linear.weight):
            raise ValueError(f"the weight of {name} holds NaN or Inf values")


@torch.no_grad()
@restores_on_error("model")
def quantize_model_rtn(model: torch.nn.Module, grid: Grid, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Round-to-nearest weight quantization of every linear layer onto ``grid`` (per tensor, channel or
    group), in place (simulated: each weight is replaced by its dequantized values;
    :mod:`refimpl.quantization.packed` stores real codes).

    Scales are rounded to float16, the precision a packed layer stores (:data:`WEIGHT_SCALE_DTYPE`),
    so the simulated model computes exactly what the packed one does.

    All layers are checked before the first one changes, and any error leaves the model as it was (a
    copy of its tensors is held during the call).

    Returns:
        ``model``, modified in place.
    """
    linears = anatomy.compressed_linears(model, skip)
    check_grid("grid", grid, WEIGHT_GRANULARITIES)
    for name, linear in linears.items():
        check_input(linear.weight, f"weight of {name}")
        _check_fits(linear.weight, grid)
    for linear in linears.values():
        linear.weight.copy_(fake_quantize(linear.weight, grid, WEIGHT_SCALE_DTYPE))
    return model
