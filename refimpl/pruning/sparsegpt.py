r"""SparseGPT: one-shot pruning with second-order weight reconstruction (Frantar and Alistarh 2023).

"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (arXiv:2301.00774) treats
pruning like GPTQ treats quantization: minimise the layer-wise reconstruction error (Eq. 1)

.. math:: \arg\min_{M, \hat W} \lVert W X - (M \odot \hat W) X \rVert_2^2

by visiting the columns of :math:`W` in order and, after zeroing the pruned weights of a column,
updating the columns not yet visited with the Optimal Brain Surgeon compensation
(:mod:`refimpl.obs`, the loop GPTQ uses; SparseGPT Alg. 1). Which weights to prune is decided on the
way (§3.2, "adaptive mask selection"): at the start of every block of ``block_size`` columns, the
weights of the block are scored by the OBS error of removing each one,

.. math:: \varepsilon_{ij} = \frac{w_{ij}^2}{[H_F^{-1}]_{jj}} = \frac{w_{ij}^2}{U_{jj}^2}

(the weights as updated so far; :math:`U` the upper Cholesky factor of the dampened :math:`H^{-1}`,
:math:`H = 2XX^\top`), and the fraction ``sparsity`` with the lowest error is pruned within the block
— compared over all rows of the block, as in the authors' code, so rows may end with different
sparsities while every block, and so the layer, has the requested one. For N:M sparsity the choice
is made every M columns, row by row: the N of the M with the highest error are kept (§3.3).

Pruned weights are exactly zero: the compensation only reaches columns after the current one, and a
column is final once visited.
"""

from __future__ import annotations

from typing import Sequence

import torch

from refimpl import calibration, obs
from refimpl._validation import check_positive_int
from refimpl.pruning import masks


def _check_loop(nm: tuple[int, int] | None, block_size: int, damp: float) -> None:
    check_positive_int("block_size", block_size)
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block_size ({block_size}) must be a multiple of M ({nm[1]})")
    obs.check_damp(damp)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian_matrix: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, block_size: int = 128, damp: float = 0.01,
                    segments: Sequence[int] | None = None) -> torch.Tensor:
    """Prune ``weight [out, in]`` with SparseGPT given the Hessian ``H [in, in]`` of its inputs.

    Args:
        weight: the layer's weight; not modified.
        hessian_matrix: :math:`2XX^\\top/n` (:meth:`refimpl.calibration.InputStatistics.hessian`).
        sparsity: fraction of weights removed, in [0, 1) (ignored with ``nm``).
        nm: ``(N, M)``: keep N of every M consecutive weights of a row; M must divide ``block_size``.
        block_size: columns per lazy update and per mask selection (Alg. 1's :math:`B = B_s`).
        damp: dampening :math:`\\lambda` in (0, 1), as a fraction of the mean diagonal of :math:`H`.
        segments: row counts of layers stacked in ``weight`` that share ``H`` (e.g. q, k, v): each
            segment's rows are compared only among themselves, so each layer gets ``sparsity``.

    Returns:
        the pruned and reconstructed weight ``[out, in]`` (float32); its zeros are the mask.
    """
    obs.check_weight_and_hessian(weight, hessian_matrix)
    n_out, n_in = weight.shape
    masks.check_sparsity(sparsity)
    masks.check_pattern(nm, n_in)
    _check_loop(nm, block_size, damp)
    segments = [n_out] if segments is None else list(segments)
    if any(not isinstance(s, int) or s < 1 for s in segments) or sum(segments) != n_out:
        raise ValueError(f"segments must be positive row counts summing to out_features ({n_out}), got {segments}")

    W, H = obs.prepare(weight, hessian_matrix)  # float32 [out, in], [in, in]
    U = obs.upper_cholesky_of_inverse(obs.dampen(H, damp))  # H^-1 = U^T U
    u_diagonal = U.diagonal()  # [in]
    WT = W.T.contiguous()  # [in, out]
    keep_t = torch.ones_like(WT, dtype=torch.bool)  # [in, out], the mask, transposed like WT
    group = nm[1] if nm is not None else block_size  # columns chosen together

    def prune_column(i: int, w: torch.Tensor, out: torch.Tensor) -> None:
        if i % group == 0:  # adaptive mask selection for columns i .. i + group, as updated so far
            columns = slice(i, min(i + group, n_in))
            error = WT[columns] ** 2 / u_diagonal[columns, None] ** 2  # OBS error eps, [group, out]
            if nm is not None:  # per row of W: the N of the M with the largest error kept
                keep_t[columns] = masks.keep_highest(error.T, nm[1] - nm[0]).T
            else:
                keep_t[columns] = torch.cat([masks.unstructured_mask(part, sparsity, scope="layer")
                                             for part in error.split(segments, dim=1)], dim=1)
        torch.mul(w, keep_t[i], out=out)

    QT = obs.compensate_columns(WT, U, block_size, prune_column)  # [in, out]
    return QT.T.contiguous()


@torch.no_grad()
def prune_model_sparsegpt(model: torch.nn.Module, blocks: torch.Tensor | None, sparsity: float,
                          nm: tuple[int, int] | None = None, block_size: int = 128, damp: float = 0.01,
                          batch_size: int = 8, statistics: dict[str, calibration.InputStatistics] | None = None,
                          ) -> torch.nn.Module:
    """SparseGPT every linear layer of the decoder layers, in place.

    Calibration as in :func:`refimpl.calibration.statistics_by_layer`: from ``blocks``, layer by layer
    on the outputs of the already pruned layers (the paper's procedure), or from ``statistics``
    captured once on the dense model (``blocks=None``). Layers that read the same input (q, k, v;
    gate, up) share its Hessian and are pruned in one column loop, each to its own ``sparsity``.

    Returns:
        ``model``, its pruned weights zero and the remaining ones reconstructed. Arguments are checked
        before the first layer changes; only a numerical failure (a Hessian that dampening cannot make
        positive definite, ``ValueError``) could stop it half-way.
    """
    masks.check_model(model, sparsity, nm)
    _check_loop(nm, block_size, damp)
    for _, _, linears, stats in calibration.statistics_by_layer(model, blocks, statistics, batch_size):
        for members in calibration.shared_input_sets(stats):
            weights = [linears[name].weight for name in members]
            pruned = sparsegpt_prune(torch.cat(weights), stats[members[0]].hessian(), sparsity, nm, block_size,
                                     damp, segments=[w.shape[0] for w in weights])
            for w, part in zip(weights, pruned.split([w.shape[0] for w in weights])):
                w.copy_(part.to(w.dtype))
    return model
