r"""AWQ: activation-aware weight quantization (Lin et al. 2023).

Not all weights matter equally: those multiplying input channels with large activations ("salient"
channels, about 1%) dominate the error of a layer's output. AWQ protects them without mixed
precision by scaling. For a per-input-channel scale :math:`s > 0` (§3.2, Eq. 4-5),

.. math:: Q(W)\,x \;\to\; Q(W \,\mathrm{diag}(s))\,\big(\mathrm{diag}(s)^{-1} x\big),

which is the same product in full precision, but scales up the salient columns before rounding, so
their relative rounding error shrinks. AWQ chooses :math:`s = s_X^{\alpha}` from the mean activation
magnitude per input channel :math:`s_X`, with the single exponent :math:`\alpha \in [0, 1]` found by a
grid search that minimises the layer's output error on calibration inputs (Eq. 5):

.. math:: \alpha^* = \arg\min_\alpha \big\lVert Q(W \mathrm{diag}(s_X^\alpha))\,\mathrm{diag}(s_X^\alpha)^{-1} X - W X \big\rVert^2 .

:math:`\alpha = 0` is plain round-to-nearest, so the search can only improve the objective. In a
deployed model :math:`\mathrm{diag}(s)^{-1}` is folded into the operation that produces :math:`x`
(the preceding RMSNorm or linear layer); layers that read the same input (q, k, v; gate, up) must then
share one :math:`s`, and :func:`quantize_model_awq` searches one scale for each such set. Here the
folding is simulated: each weight is replaced by :math:`Q(W \mathrm{diag}(s))\,\mathrm{diag}(s)^{-1}`,
which computes what a folded model computes. Not every scale can be folded: ``o_proj``'s would go into
the rows of ``v_proj``, which under grouped-query attention feed several query heads at once (the
authors skip that pair then). This implementation scales ``o_proj`` and ``down_proj`` anyway; a packed
layer (:class:`~refimpl.quantization.packed.QuantizedLinear`) stores such a scale as its
``input_scale``, two bytes per input feature. Calibrated layer by layer from token blocks, each layer
sees the outputs of the already quantized layers before it (as GPTQ does; the authors search on
full-precision outputs), and the optional clipping search of the paper is not implemented.
"""

from __future__ import annotations

import torch

from refimpl import calibration
from refimpl._validation import check_positive_int
from refimpl.quantization import packed, uniform


def _quantize_scaled(weight: torch.Tensor, scales: torch.Tensor, bits: int, symmetric: bool,
                     group_size: int | None) -> tuple[torch.Tensor, uniform.QParams]:
    """:math:`Q(W \\mathrm{diag}(s))\\, \\mathrm{diag}(s)^{-1}` with the uniform grid, and the grid of
    :math:`Q` (float16 scales, as stored)."""
    granularity = "channel" if group_size is None else "group"
    scaled = weight * scales  # [out, in]: W diag(s)
    grid = uniform.compute_qparams(scaled, bits, symmetric, granularity, group_size, uniform.WEIGHT_SCALE_DTYPE)
    return uniform.dequantize(uniform.quantize(scaled, grid), grid, scaled.shape) / scales, grid


def search_scales(
    weights: list[torch.Tensor],
    stats: calibration.InputStatistics,
    bits: int,
    symmetric: bool = False,
    group_size: int | None = 64,
    n_grid: int = 20,
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid-search :math:`\\alpha` for linear layers that share one input.

    Args:
        weights: the ``[out_i, in]`` weights of the layers reading that input (one shared scale).
        stats: statistics of their calibration inputs ``X``
            (:class:`~refimpl.calibration.InputStatistics`): :math:`s_X` is its ``mean_abs``, and the
            output error :math:`\\lVert \\hat W X - W X \\rVert^2` is computed from its Gram matrix.
        bits, symmetric, group_size: the uniform grid (``group_size=None``: per output channel).
        n_grid: :math:`\\alpha` takes the values ``0, 1/n_grid, ..., (n_grid-1)/n_grid``.

    Returns:
        ``(scales [in], best_alpha, errors)``: the scales (float16-representable), the chosen
        exponent, and the summed output error for every :math:`\\alpha` of the grid.
    """
    if not isinstance(stats, calibration.InputStatistics):
        raise TypeError(f"stats must be calibration.InputStatistics, got {type(stats).__name__}")
    n_in = stats.mean_abs.numel()
    if not weights or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        raise ValueError("weights must be a non-empty list of 2-D weights [out, in]")
    if any(w.shape[1] != n_in for w in weights):
        raise ValueError(f"every weight must have in_features = {n_in} (the width of the inputs in stats)")
    check_positive_int("n_grid", n_grid)
    activation_scale = stats.mean_abs.clamp_min(1e-8)  # s_X: mean |x| per input channel, [in]
    gram = stats.gram  # X^T X [in, in]
    weights = [w.detach().float() for w in weights]
    errors, best = [], (float("inf"), 0.0, torch.ones_like(activation_scale))
    for step in range(n_grid):
        alpha = step / n_grid
        scales = activation_scale.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centre the scales around 1
        scales = scales.to(uniform.WEIGHT_SCALE_DTYPE).float()  # as a packed layer stores them
        error = 0.0
        for w in weights:
            delta = _quantize_scaled(w, scales, bits, symmetric, group_size)[0] - w  # [out, in]
            error += ((delta @ gram) * delta).sum().item()  # tr(dW X^T X dW^T) = ||dW X||^2
        errors.append(error)
        if error < best[0]:
            best = (error, alpha, scales)
    return best[2], best[1], errors


@torch.no_grad()
def quantize_model_awq(
    model: torch.nn.Module,
    blocks: torch.Tensor | None,
    bits: int,
    symmetric: bool = False,
    group_size: int | None = 64,
    n_grid: int = 20,
    batch_size: int = 8,
    pack: bool = False,
    statistics: dict[str, calibration.InputStatistics] | None = None,
    alphas: dict[str, float] | None = None,
) -> torch.nn.Module:
    """AWQ every linear layer of the decoder layers, in place; layers that read the same input share
    one scale. The output layer is left alone. Calibration as in
    :func:`refimpl.quantization.gptq.quantize_model_gptq`: layer by layer from token ``blocks``, or
    from ``statistics`` captured once (``blocks=None``).

    Simulated (weights hold :math:`Q(W\\mathrm{diag}(s))\\mathrm{diag}(s)^{-1}`), or with ``pack=True``
    every layer replaced by a :class:`~refimpl.quantization.packed.QuantizedLinear` storing the codes
    of :math:`Q(W\\mathrm{diag}(s))` and :math:`s` as its ``input_scale``.

    Args:
        alphas: if a dict is given, it receives the chosen :math:`\\alpha` of every set of layers that
            share a scale, by the full name of its first layer (``"model.layers.3.self_attn.q_proj"``).

    Returns:
        ``model``, modified in place.
    """
    uniform.check_model_grid(model, bits, group_size)  # fail before changing anything
    granularity = "channel" if group_size is None else "group"
    for index, layer, linears, stats in calibration.statistics_by_layer(model, blocks, statistics, batch_size):
        for members in calibration.shared_input_sets(stats):  # layers reading one input share one scale
            scales, alpha, _ = search_scales([linears[n].weight for n in members], stats[members[0]], bits,
                                             symmetric, group_size, n_grid)
            for name in members:
                linear = linears[name]
                quantized, grid = _quantize_scaled(linear.weight.float(), scales, bits, symmetric, group_size)
                linear.weight.copy_(quantized.to(linear.weight.dtype))
                if pack:
                    packed.swap_linears(layer, {name: packed.QuantizedLinear.from_linear(
                        linear, bits, symmetric, granularity, group_size, qparams=grid, input_scale=scales,
                        weight=quantized)})
            if alphas is not None:
                alphas[f"model.layers.{index}.{members[0]}"] = alpha
    return model
