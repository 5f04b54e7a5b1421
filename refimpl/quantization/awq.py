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
full-precision outputs).

The optional **clipping search** of the authors' code (``clip=True``) then shrinks the range of each
group of scaled weights to the fraction :math:`r` of its largest magnitude that minimises that group's
share of the output error — clipping a few large weights makes the grid finer for all others
(:func:`search_clipping`). As in the authors' code, ``q_proj`` and ``k_proj`` are not clipped (their
errors meet in the attention scores, which the per-layer objective does not see).
"""

from __future__ import annotations

import torch

from refimpl import anatomy, calibration
from refimpl._rollback import restores_on_error
from refimpl._validation import check_finite, check_positive_int
from refimpl.quantization import packed, uniform


def _clamp_groups(weight: torch.Tensor, max_abs: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``weight [out, in]`` clamped to ``[-m, m]`` with one ``m`` per output row and group of inputs
    (``max_abs [out, n_groups, 1]``; one group per row when ``group_size`` is None)."""
    grouped = weight.reshape(weight.shape[0], -1, group_size or weight.shape[1])  # [out, n_groups, g]
    return torch.maximum(torch.minimum(grouped, max_abs), -max_abs).reshape(weight.shape)


def _quantize_scaled(weight: torch.Tensor, scales: torch.Tensor, grid: uniform.Grid,
                     max_abs: torch.Tensor | None = None) -> tuple[torch.Tensor, uniform.QParams]:
    """:math:`Q(W \\mathrm{diag}(s))\\, \\mathrm{diag}(s)^{-1}` on ``grid``, and the parameters of
    :math:`Q` (float16 scales, as stored); with ``max_abs``, the scaled weights are clipped first."""
    scaled = weight * scales  # [out, in]: W diag(s)
    if max_abs is not None:
        scaled = _clamp_groups(scaled, max_abs, grid.group_size)
    qparams = uniform.compute_qparams(scaled, grid, uniform.WEIGHT_SCALE_DTYPE)
    return uniform.dequantize(uniform.quantize(scaled, qparams), qparams, scaled.shape) / scales, qparams


def _check_search(weights: list[torch.Tensor], stats: calibration.InputStatistics, grid: uniform.Grid,
                  n_grid: int) -> None:
    uniform.check_grid("grid", grid, ("channel", "group"))
    if not isinstance(stats, calibration.InputStatistics):
        raise TypeError(f"stats must be calibration.InputStatistics, got {type(stats).__name__}")
    n_in = stats.mean_abs.numel()
    if not weights or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        raise ValueError("weights must be a non-empty list of 2-D weights [out, in]")
    if any(w.shape[1] != n_in for w in weights):
        raise ValueError(f"every weight must have in_features = {n_in} (the width of the inputs in stats)")
    check_positive_int("n_grid", n_grid)
    check_finite("stats.mean_abs", stats.mean_abs)  # NaN errors would all lose: a silent alpha = 0 (RTN)
    check_finite("stats.gram", stats.gram)
    for i, w in enumerate(weights):
        check_finite(f"weights[{i}]", w)


def search_scales(
    weights: list[torch.Tensor],
    stats: calibration.InputStatistics,
    grid: uniform.Grid,
    n_grid: int = 20,
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid-search :math:`\\alpha` for linear layers that share one input (§3.2, Eq. 5): the scales
    :math:`s = s_X^\\alpha` whose :math:`Q(W \\mathrm{diag}(s))\\, \\mathrm{diag}(s)^{-1}` changes the layers'
    outputs least, summed over the layers.

    Args:
        weights: the ``[out_i, in]`` weights of the layers reading that input (one shared scale).
        stats: statistics of their calibration inputs ``X``
            (:class:`~refimpl.calibration.InputStatistics`): :math:`s_X` is its ``mean_abs``, and the
            output error :math:`\\lVert \\hat W X - W X \\rVert^2` is computed from its Gram matrix.
        grid: the uniform grid, per output channel or per group of ``grid.group_size`` inputs.
        n_grid: :math:`\\alpha` takes the values ``0, 1/n_grid, ..., (n_grid-1)/n_grid``.

    Returns:
        ``(scales [in], best_alpha, errors)``: the scales (float16-representable), the chosen
        exponent, and the summed output error for every :math:`\\alpha` of the grid.
    """
    _check_search(weights, stats, grid, n_grid)
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
            delta = _quantize_scaled(w, scales, grid)[0] - w  # [out, in]
            error += ((delta @ gram) * delta).sum().item()  # tr(dW X^T X dW^T) = ||dW X||^2
        errors.append(error)
        if error < best[0]:
            best = (error, alpha, scales)
    return best[2], best[1], errors


@torch.no_grad()
def search_clipping(
    weight: torch.Tensor,
    gram: torch.Tensor,
    grid: uniform.Grid,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """The clipping range of every group of ``weight [out, in]`` (already scaled, :math:`W\\mathrm{diag}(s)`)
    given the Gram matrix ``gram [in, in]`` of its inputs (:math:`X'^\\top X'`, for the scaled inputs
    :math:`X' = X \\mathrm{diag}(s)^{-1}`).

    For every ratio :math:`r \\in \\{1, 1 - 1/n, \\dots\\}` down to ``1 - max_shrink`` (exclusive), the
    group's weights are clamped to :math:`\\pm r \\max|w|` and quantized, and the error of the group's
    part of the output, :math:`\\delta_g^\\top (X'^\\top X')_{gg}\\, \\delta_g`, is computed from the
    diagonal block of the Gram matrix (cross-group terms are ignored, as in the authors' code); each
    group keeps the ratio with the smallest error (:math:`r = 1`, no clipping, is a candidate).

    Returns:
        ``max_abs [out, n_groups, 1]``: the clipping range of every group (``n_groups = 1`` per channel).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [out, in]")
    n_in = weight.shape[1]
    if not isinstance(gram, torch.Tensor) or gram.shape != (n_in, n_in):
        raise ValueError(f"gram must be a [{n_in}, {n_in}] tensor for a weight with {n_in} inputs")
    check_finite("weight", weight)
    check_finite("gram", gram)  # NaN errors never win: a group would silently keep r = 1
    check_positive_int("n_grid", n_grid)
    uniform.check_grid("grid", grid, ("channel", "group"))
    if grid.group_size is not None and n_in % grid.group_size:
        raise ValueError(f"group_size {grid.group_size} must divide in_features ({n_in})")
    if not 0 < max_shrink < 1:
        raise ValueError(f"max_shrink must be in (0, 1), got {max_shrink!r}")
    size = grid.group_size or n_in
    weight, gram = weight.detach().float(), gram.detach().to(weight.device, torch.float32)
    grouped = weight.reshape(weight.shape[0], -1, size)  # [out, n_groups, g]
    n_groups = grouped.shape[1]
    blocks = torch.stack([gram[k * size:(k + 1) * size, k * size:(k + 1) * size] for k in range(n_groups)])  # [n_groups, g, g]
    original = grouped.abs().amax(dim=-1, keepdim=True)  # [out, n_groups, 1]
    best_error = original.new_full(original.shape[:2], float("inf"))
    best = original.clone()
    for step in range(max(1, int(max_shrink * n_grid))):
        max_abs = original * (1 - step / n_grid)
        delta = _quantize_scaled(weight, weight.new_ones(n_in), grid, max_abs)[0] - weight
        delta = delta.reshape(grouped.shape)  # [out, n_groups, g]
        error = torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)  # [out, n_groups]
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better[..., None], max_abs, best)
    return best


# The authors do not clip the query and key projections.
_NOT_CLIPPED = ("q_proj", "k_proj")


@torch.no_grad()
@restores_on_error("model")
def quantize_model_awq(
    model: torch.nn.Module,
    blocks: torch.Tensor | None,
    grid: uniform.Grid,
    n_grid: int = 20,
    batch_size: int = 8,
    pack: bool = False,
    statistics: dict[str, calibration.InputStatistics] | None = None,
    alphas: dict[str, float] | None = None,
    clip: bool = False,
) -> torch.nn.Module:
    """AWQ every linear layer of the decoder layers, in place; layers that read the same input share
    one scale. The output layer is left alone. Calibration as in
    :func:`refimpl.quantization.gptq.quantize_model_gptq`: layer by layer from token ``blocks``, or
    from ``statistics`` captured once (``blocks=None``).

    Simulated (weights hold :math:`Q(W\\mathrm{diag}(s))\\mathrm{diag}(s)^{-1}`), or with ``pack=True``
    every layer replaced by a :class:`~refimpl.quantization.packed.QuantizedLinear` storing the codes
    of :math:`Q(W\\mathrm{diag}(s))` and :math:`s` as its ``input_scale``.

    Args:
        grid: the uniform grid, per output channel or per group of ``grid.group_size`` inputs.
        alphas: if a dict is given, it receives the chosen :math:`\\alpha` of every set of layers that
            share a scale, by the full name of its first layer (``"model.layers.3.self_attn.q_proj"``).
        clip: after the scale search, search a clipping range for every group of weights
            (:func:`search_clipping`, 10 ratios from 1 down to 0.55) except in q_proj and k_proj.

    Returns:
        ``model``, modified in place. An error — also one in a later layer, such as activations that
        overflow — leaves it as it was (a copy of its tensors is held during the call).
    """
    uniform.check_grid("grid", grid, ("channel", "group"))
    uniform.check_model_grid(model, grid)  # fail before changing anything
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {type(clip).__name__}")
    for index, layer, linears, stats in calibration.statistics_by_layer(model, blocks, statistics, batch_size):
        for members in calibration.shared_input_sets(stats):  # layers reading one input share one scale
            scales, alpha, _ = search_scales([linears[n].weight for n in members], stats[members[0]], grid, n_grid)
            for name in members:
                linear = linears[name]
                max_abs = None
                if clip and not name.endswith(_NOT_CLIPPED):
                    gram = stats[name].gram / scales[:, None] / scales[None, :]  # X'^T X' for X' = X diag(s)^-1
                    max_abs = search_clipping(linear.weight.float() * scales, gram, grid)
                quantized, qparams = _quantize_scaled(linear.weight.float(), scales, grid, max_abs)
                linear.weight.copy_(quantized.to(linear.weight.dtype))
                if pack:
                    anatomy.swap_linears(layer, {name: packed.QuantizedLinear.from_linear(
                        linear, grid, qparams=qparams, input_scale=scales, weight=quantized)})
            if alphas is not None:
                alphas[anatomy.layer_name(index, members[0])] = alpha
    return model
