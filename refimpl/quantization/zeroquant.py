r"""ZeroQuant: fine-grained, hardware-friendly W8A8 / W4A8 quantization (Yao et al. 2022).

ZeroQuant (arXiv:2206.01861) quantizes weights *and* activations of a Transformer after training with
the uniform quantizer of :mod:`~refimpl.quantization.uniform` — a scale :math:`S` and a zero point
:math:`Z` (:math:`Z = 0` symmetric) per group of values (§3, Eq. 1) — and makes it accurate by choosing
finer, but still GEMM-compatible, granularities for :math:`S` (§4.1):

- **group-wise weight quantization**: each row of a weight matrix is split into groups, each with its
  own :math:`S` (from Q-BERT), so that a few large weights only coarsen their own group;
- **token-wise dynamic activation quantization**: each token (row of :math:`X`) gets its own
  :math:`S`, computed on the fly from its range, so no calibration is needed and a token with large
  activations does not coarsen the others. (It does not help with *channel* outliers, which every
  token has — that is SmoothQuant's point, :mod:`~refimpl.quantization.smoothquant`.)

Both scales lie along the outer dimensions of the GEMM, so the integer matmul stays one kernel with a
rescale of its output. :func:`quantize_model_zeroquant` is this configuration of
:func:`~refimpl.quantization.activation.quantize_model_w8a8`.

Its second component, **layer-by-layer knowledge distillation** (LKD, §4.2), trains the quantized
model one layer at a time to reproduce the float one: :mod:`refimpl.quantization.lkd`, on QAT's
fake-quantized layers (``qat.prepare_qat(model, weight_grid, a_bits=8)`` is this scheme, trainable).
"""

from __future__ import annotations

from torch import nn

from refimpl.quantization import uniform
from refimpl.quantization.activation import quantize_model_w8a8


def quantize_model_zeroquant(model: nn.Module, weight_grid: uniform.Grid = uniform.Grid(8, group_size=64),
                             act_grid: uniform.Grid | None = uniform.Grid(8, per="token"),
                             skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """ZeroQuant's scheme, in place: group-wise weights on ``weight_grid`` (symmetric, ``group_size``
    inputs per scale by default; per channel: one group per row) and dynamic per-token activations on
    ``act_grid`` (``None``: weight-only).

    Returns:
        ``model``, modified in place (its linear layers become
        :class:`~refimpl.quantization.activation.ActivationQuantizedLinear`); an error leaves it as it
        was (see :func:`~refimpl.quantization.activation.quantize_model_w8a8`).
    """
    uniform.check_grid("weight_grid", weight_grid, ("channel", "group"))
    if act_grid is not None:
        uniform.check_grid("act_grid", act_grid, ("token",))
    return quantize_model_w8a8(model, None, weight_grid, act_grid, static=False, skip=skip)
