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
which computes exactly what the folded model computes.
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
    x: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    group_size: int | None = 64,
    n_grid: int = 20,
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid-search :math:`\\alpha` for linear layers that share the input ``x [n_tokens, in]``.

    Args:
        weights: the ``[out_i, in]`` weights of the layers reading ``x`` (one shared scale).
        x: their calibration inputs.
        bits, symmetric, group_size: the uniform grid (``group_size=None``: per output channel).
        n_grid: :math:`\\alpha` takes the values ``0, 1/n_grid, ..., (n_grid-1)/n_grid``.

    Returns:
        ``(scales [in], best_alpha, errors)``: the scales, the chosen exponent, and the summed output
        error :math:`\\lVert \\hat W X - W X \\rVert^2` for every :math:`\\alpha` of the grid.
    """
    if not weights or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        raise ValueError("weights must be a non-empty list of 2-D weights [out, in]")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty [n_tokens, in_features] tensor of layer inputs")
    if any(w.shape[1] != x.shape[1] for w in weights):
        raise ValueError(f"every weight must have in_features = {x.shape[1]} (the width of x)")
    check_positive_int("n_grid", n_grid)
    x = x.float()
    activation_scale = x.abs().mean(dim=0).clamp_min(1e-8)  # s_X: mean |x| per input channel, [in]
    references = [x @ w.detach().float().T for w in weights]  # W X for each layer
    errors, best = [], (float("inf"), 0.0, torch.ones_like(activation_scale))
    for step in range(n_grid):
        alpha = step / n_grid
        scales = activation_scale.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centre the scales around 1
        scales = scales.to(uniform.WEIGHT_SCALE_DTYPE).float()  # as a packed layer stores them
        error = sum(((x @ _quantize_scaled(w.detach().float(), scales, bits, symmetric, group_size)[0].T - ref) ** 2)
                    .sum().item() for w, ref in zip(weights, references))
        errors.append(error)
        if error < best[0]:
            best = (error, alpha, scales)
    return best[2], best[1], errors


@torch.no_grad()
def quantize_model_awq(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    group_size: int | None = 64,
    n_grid: int = 20,
    batch_size: int = 8,
    pack: bool = False,
) -> dict[str, float]:
    """AWQ every linear layer of the decoder layers, in place, one decoder layer at a time on the
    calibration token ``blocks``; layers that read the same input share one scale. The output layer
    is left alone. Simulated (weights hold :math:`Q(W\\mathrm{diag}(s))\\mathrm{diag}(s)^{-1}`), or
    with ``pack=True`` every layer replaced by a :class:`~refimpl.quantization.packed.QuantizedLinear`
    storing the codes of :math:`Q(W\\mathrm{diag}(s))` and :math:`s` as its ``input_scale``.

    Returns:
        The chosen :math:`\\alpha` of every set of layers, by the name of its first layer.
    """
    uniform.check_model_grid(model, bits, group_size)  # fail before changing anything
    alphas = {}
    for capture in calibration.layerwise(model, blocks, batch_size):
        # Layers that read the same tensor (q, k, v; gate, up) form one set with one shared scale.
        sets: list[list[str]] = []
        for name in capture.linears:
            for members in sets:
                if torch.equal(capture.inputs[members[0]], capture.inputs[name]):
                    members.append(name)
                    break
            else:
                sets.append([name])
        for members in sets:
            linears = [capture.linears[n] for n in members]
            scales, alpha, _ = search_scales([m.weight for m in linears], capture.inputs[members[0]], bits,
                                             symmetric, group_size, n_grid)
            for name, linear in zip(members, linears):
                quantized, grid = _quantize_scaled(linear.weight.float(), scales, bits, symmetric, group_size)
                linear.weight.copy_(quantized.to(linear.weight.dtype))
                if pack:
                    packed.swap_linears(capture.layer, {name: packed.QuantizedLinear.from_linear(
                        linear, bits, symmetric, "channel" if group_size is None else "group", group_size,
                        qparams=grid, input_scale=scales)})
            alphas[f"layers.{capture.index}.{members[0]}"] = alpha
    return alphas
