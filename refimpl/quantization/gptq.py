r"""GPTQ: post-training quantization with second-order error compensation (Frantar et al. 2022).

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the columns of a weight matrix
:math:`W \in \mathbb{R}^{d_\text{out} \times d_\text{in}}` one at a time and, after each, updates the
columns not yet quantized so that the layer's output on calibration inputs :math:`X` changes as
little as possible. It minimises the layer-wise reconstruction error (Eq. 1)

.. math:: \arg\min_{\hat W} \lVert W X - \hat W X \rVert_2^2,

whose Hessian with respect to each row of :math:`W` is :math:`H = 2 X X^\top` — shared by all rows.
Following Optimal Brain Quantization, quantizing column :math:`q` with error
:math:`w_q - \mathrm{quant}(w_q)` is best compensated by (Eq. 2-3)

.. math:: \delta_F = -\frac{w_q - \mathrm{quant}(w_q)}{[H_F^{-1}]_{qq}} \, (H_F^{-1})_{:,q},

and GPTQ's three steps make this fast and stable (§4): quantize columns in a fixed order for all
rows at once; apply updates lazily in blocks of ``block_size`` columns (Alg. 1); and take the rows
needed from the upper Cholesky factor of :math:`H^{-1}`, after dampening :math:`H` by
:math:`\lambda \cdot \mathrm{mean}(\mathrm{diag}\,H)` (Step 3). That loop is shared with SparseGPT
(:mod:`refimpl.obs`); what GPTQ adds is the rounding of each column to its grid
(:func:`quantize_columns`). The *act-order* heuristic of the authors' code (``--act-order``, used
for their LLaMA results and the default of AutoGPTQ's ``desc_act``) quantizes columns in order of
decreasing :math:`H_{qq}` (largest activations first); it is on by default here
(``act_order=True``).

The quantization grid is :mod:`refimpl.quantization.uniform`'s: per output channel, or per group of
``group_size`` input columns. The authors' symmetric grid (``--sym``; AutoGPTQ's default ``sym=True``)
uses all :math:`2^b` codes, :math:`s = 2\max|w| / (2^b - 1)`: ``uniform.Grid(bits, narrow_range=False)``.
Without ``--sym`` the authors' grid is asymmetric (``symmetric=False``).

Without act-order a group's scale is computed when the column loop reaches the group, from the
weights as updated so far: with ``block_size`` a multiple of ``group_size`` (the defaults, 128 and 64)
every compensation of the earlier columns has reached them. (The paper's code reads them before the
compensations of the current block of columns — a small difference for the groups that start inside
a block.) With act-order the group scales are fixed from the original weights first ("static groups",
the authors' ``--static-groups``), because the columns of a group are then not visited together;
without that option their code forms groups of consecutive columns in the permuted order instead
(which a deployed model must undo with a per-column group index).
"""

from __future__ import annotations

import dataclasses

import torch

from refimpl import anatomy, calibration, obs
from refimpl._rollback import restores_on_error
from refimpl._validation import check_positive_int
from refimpl.quantization import packed, uniform


def hessian(x: torch.Tensor) -> torch.Tensor:
    """:math:`H = 2 X X^\\top / n` from layer inputs ``x: [n_tokens, in_features]``;
    the average over tokens keeps the scale independent of the calibration set's size."""
    return calibration.InputStatistics.from_inputs(x).hessian()  # [in, in]


def _check_columns(WT: torch.Tensor, order: list[int], grid: uniform.Grid,
                   qparams: dict[int, uniform.QParams]) -> None:
    uniform.check_grid("grid", grid, ("channel", "group"))
    if not isinstance(WT, torch.Tensor) or WT.dim() != 2 or not WT.is_floating_point():
        raise ValueError("WT must be a 2-D floating-point tensor [in_features, out_features]")
    n_in = WT.shape[0]
    if not isinstance(order, list) or sorted(order) != list(range(n_in)):
        raise ValueError(f"order must be a list holding every column index 0 .. {n_in - 1} once")
    if not isinstance(qparams, dict):
        raise TypeError(f"qparams must be a dict of uniform.QParams by group, got {type(qparams).__name__}")
    if grid.group_size is None:
        if 0 not in qparams:
            raise ValueError("qparams must hold the per-channel parameters under key 0 when grid.group_size is None")
        return
    if n_in % grid.group_size:
        raise ValueError(f"group_size {grid.group_size} must divide in_features ({n_in})")
    missing = [g for g in range(0, n_in, grid.group_size) if g not in qparams]
    if missing and order != list(range(n_in)):
        raise ValueError(f"qparams must hold every group's parameters when order is not 0, 1, 2, ... (a group's "
                         f"are computed on the way only when its columns come together), missing {missing[:5]}")


@torch.no_grad()
def quantize_columns(WT: torch.Tensor, U: torch.Tensor, order: list[int], grid: uniform.Grid,
                     qparams: dict[int, uniform.QParams],
                     block_size: int = 128) -> tuple[torch.Tensor, dict[int, uniform.QParams]]:
    r"""GPTQ's column loop (Alg. 1): round every column of :math:`W` to its grid, one at a time, and
    compensate each rounding error :math:`w_q - \mathrm{quant}(w_q)` on the columns not yet quantized
    (Eq. 2-3, in :func:`refimpl.obs.compensate_columns`).

    Args:
        WT: :math:`W^\top` ``[in, out]``, float32, its rows in the order the columns are quantized;
            updated in place.
        U: the upper Cholesky factor of the dampened :math:`H^{-1}`, in the same order
            (:func:`refimpl.obs.upper_cholesky_of_inverse`).
        order: ``order[i]``, the column of the original weight that row ``i`` of ``WT`` holds.
        grid: the uniform grid (2-8 bits; absmax or zero-point), one scale per output channel or per
            group of ``grid.group_size`` consecutive original columns.
        qparams: scales fixed beforehand, one per output channel of a group's columns, by the first
            original column of their group (``0`` per channel); not modified. A group missing here gets
            its scales when the loop reaches its first column, from the weights as updated so far (this
            needs ``order`` to be ``0, 1, 2, ...``).
        block_size: columns per lazy batch update (Alg. 1's :math:`B`).

    Returns:
        ``(QT, qparams)``: :math:`\mathrm{quant}(W)^\top` ``[in, out]`` (dequantized values) and the
        scales of every group, the given ones and those computed on the way.
    """
    _check_columns(WT, order, grid, qparams)
    qparams = dict(qparams)
    group_size, qmin, qmax = grid.group_size, grid.qmin, grid.qmax
    per_channel = dataclasses.replace(grid, group_size=None)  # a group's own grid: one scale per row

    def quantize_column(i: int, w: torch.Tensor, q: torch.Tensor) -> None:
        group = 0 if group_size is None else order[i] - order[i] % group_size  # by its first original column
        if group not in qparams:  # entering a new group: its scale from the updated weights, one per row
            qparams[group] = uniform.compute_qparams(WT[i : i + group_size].T, per_channel, uniform.WEIGHT_SCALE_DTYPE)
        scale, zero = qparams[group].scale[:, 0], qparams[group].zero_point[:, 0]  # [out]
        torch.div(w, scale, out=q).round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)  # nearest grid point

    return obs.compensate_columns(WT, U, block_size, quantize_column), qparams  # [in, out]


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian_matrix: torch.Tensor,
    grid: uniform.Grid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> tuple[torch.Tensor, uniform.QParams]:
    """Quantize ``weight [out, in]`` with GPTQ given the Hessian ``H [in, in]`` of its inputs.

    Args:
        weight: the layer's weight; not modified.
        hessian_matrix: :math:`2XX^\\top/n` (:func:`hessian`).
        grid: the uniform grid (2-8 bits; absmax or zero-point), one scale per output channel or per
            group of ``grid.group_size`` inputs.
        block_size: columns per lazy batch update (Alg. 1's :math:`B`).
        damp: dampening :math:`\\lambda` in (0, 1), as a fraction of the mean diagonal of :math:`H`.
        act_order: quantize columns by decreasing :math:`H_{qq}` (the default), with the group scales
            fixed from the original weight (static groups); False quantizes them in their natural order
            0, 1, 2, ... (the paper's Algorithm 1), each group's scales taken when the loop reaches it.

    Returns:
        ``(weight, qparams)``: the dequantized GPTQ weight ``[out, in]`` (float32; the values a
        quantized model computes with) and the scales of ``grid`` it lies on (float16-representable),
        from which :meth:`refimpl.quantization.packed.QuantizedLinear.from_linear` reads off its codes.
    """
    obs.check_weight_and_hessian(weight, hessian_matrix)
    uniform.check_grid("grid", grid, ("channel", "group"))
    n_in, group_size = weight.shape[1], grid.group_size
    if group_size is not None and n_in % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features ({n_in})")
    check_positive_int("block_size", block_size)
    obs.check_damp(damp)

    W, H = obs.prepare(weight, hessian_matrix)  # float32 [out, in], [in, in], as in the paper's code
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n_in, device=W.device)

    per_channel = dataclasses.replace(grid, group_size=None)

    def params_for(columns: torch.Tensor) -> uniform.QParams:  # one scale per row of these columns
        return uniform.compute_qparams(columns, per_channel, uniform.WEIGHT_SCALE_DTYPE)

    # Grid parameters: per channel from the whole original weight; per group either from the original
    # weight (act-order: static groups) or later, from the updated weight, when the loop reaches them.
    if group_size is None:
        fixed = {0: params_for(W)}
    elif act_order:
        fixed = {g: params_for(W[:, g : g + group_size]) for g in range(0, n_in, group_size)}
    else:
        fixed = {}

    if act_order:
        W, H = W[:, perm], H[perm][:, perm]  # columns in the order they are quantized
    U = obs.upper_cholesky_of_inverse(obs.dampen(H, damp))  # H^-1 = U^T U: row q of U holds the update coefficients
    QT, by_group = quantize_columns(W.T.contiguous(), U, perm.tolist(), grid, fixed, block_size)
    Q = QT.T.contiguous()  # [out, in]
    if group_size is None:
        qparams = by_group[0]
    else:  # one [out, 1] scale per group -> [out, n_groups, 1], the shape of uniform.grouped
        groups = [by_group[g] for g in range(0, n_in, group_size)]
        qparams = uniform.QParams(torch.stack([p.scale for p in groups], dim=1),
                                  torch.stack([p.zero_point for p in groups], dim=1), grid)
    return (Q[:, torch.argsort(perm)] if act_order else Q).to(torch.float32), qparams  # original column order


@torch.no_grad()
@restores_on_error("model")
def quantize_model_gptq(
    model: torch.nn.Module,
    blocks: torch.Tensor | None,
    grid: uniform.Grid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    batch_size: int = 8,
    pack: bool = False,
    statistics: dict[str, calibration.InputStatistics] | None = None,
    errors: dict[str, tuple[float, float]] | None = None,
    first_token_weight: float = 1.0,
) -> torch.nn.Module:
    """GPTQ every linear layer of the decoder layers, in place; the output layer is left alone.

    Calibration (:func:`refimpl.calibration.statistics_by_layer`), one of two:

    - token ``blocks`` — **the paper's procedure**: sequential, one decoder layer at a time, each
      calibrated on the outputs of the already quantized layers before it, so that a layer's Hessian
      comes from the inputs it will see in the quantized model. (Inside a decoder layer, every linear layer
      reads the inputs of the layer's unquantized forward pass, as in the authors' default; their
      ``--true-sequential`` option quantizes q/k/v, then o, then gate/up, then down within the layer.)
    - ``statistics`` captured once on the *float* model (:func:`refimpl.calibration.input_statistics`)
      with ``blocks=None`` — a **departure** from the paper, for sweeps: one capture serves every grid
      and setting, but each layer is calibrated on float inputs, not on those the quantized model
      gives it.

    Args:
        grid: the uniform grid, per output channel or per group of ``grid.group_size`` inputs (the
            authors' symmetric grid is ``narrow_range=False``, module docstring).
        act_order: quantize columns by decreasing :math:`H_{qq}` (the default; :func:`gptq_quantize`);
            False for the natural order of the paper's Algorithm 1.
        pack: replace every layer by a :class:`~refimpl.quantization.packed.QuantizedLinear` holding
            GPTQ's codes and scales (the same values, really stored in ``grid.bits`` bits).
        first_token_weight: weight of the first token of every calibration block in the Hessian
            (:meth:`refimpl.calibration.InputStatistics.hessian`); 1 is the paper's GPTQ.
        errors: if a dict is given, it receives for every layer (full name) the output error
            :math:`\\lVert \\Delta W X \\rVert^2` on its calibration inputs of round-to-nearest and of GPTQ.

    Returns:
        ``model``, modified in place (simulated quantization unless ``pack``). An error — also one in a
        later layer, such as activations that overflow — leaves it as it was (a copy of its tensors is
        held during the call).
    """
    uniform.check_grid("grid", grid, ("channel", "group"))
    uniform.check_model_grid(model, grid)  # fail before changing anything
    if not first_token_weight >= 0:
        raise ValueError(f"first_token_weight must be >= 0, got {first_token_weight!r}")
    for index, layer, linears, stats in calibration.statistics_by_layer(model, blocks, statistics, batch_size):
        # Layers that read one input share its Hessian, and GPTQ treats every output row on its own:
        # their weights are stacked row-wise and quantized in one column loop ([sum of out, in]).
        for members in calibration.shared_input_sets(stats):
            originals = [linears[name].weight.detach().float().clone() for name in members]
            stacked, qparams = gptq_quantize(torch.cat(originals), stats[members[0]].hessian(first_token_weight), grid,
                                             block_size, damp, act_order)
            start = 0
            for name, original in zip(members, originals):
                rows = slice(start, start + original.shape[0])
                start = rows.stop
                quantized, linear = stacked[rows], linears[name]
                if errors is not None:
                    rtn = uniform.fake_quantize(original, grid, uniform.WEIGHT_SCALE_DTYPE)
                    errors[anatomy.layer_name(index, name)] = (
                        stats[name].output_error(rtn - original), stats[name].output_error(quantized - original))
                linear.weight.copy_(quantized.to(linear.weight.dtype))
                if pack:
                    own = uniform.QParams(qparams.scale[rows], qparams.zero_point[rows], grid)
                    anatomy.swap_linears(layer, {name: packed.QuantizedLinear.from_linear(
                        linear, grid, qparams=own, weight=quantized)})
    return model
