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

import copy
from typing import Sequence, Union

import torch

from refimpl import anatomy, calibration, obs
from refimpl._rollback import restores_on_error
from refimpl._validation import check_positive_int
from refimpl.pruning import masks


Pattern = Union[float, tuple[int, int]]
"""What to remove from a group of rows: a fraction of its weights (unstructured), or ``(N, M)``."""


def _check_block_size(patterns: Sequence[Pattern], block_size: int) -> None:
    check_positive_int("block_size", block_size)
    for pattern in patterns:
        if isinstance(pattern, tuple) and block_size % pattern[1]:
            raise ValueError(f"block_size ({block_size}) must be a multiple of M ({pattern[1]})")


def _check_loop(patterns: Sequence[Pattern], block_size: int, damp: float) -> None:
    _check_block_size(patterns, block_size)
    obs.check_damp(damp)


def _runs(patterns: Sequence[Pattern], segments: Sequence[int]) -> list[tuple[slice, Pattern, list[int]]]:
    """Consecutive segments with the same pattern, merged: ``(rows, pattern, segment sizes)``. A mask is
    chosen once per run and group of columns (per segment within it, for unstructured sparsity)."""
    runs: list[tuple[slice, Pattern, list[int]]] = []
    row = 0
    for pattern, size in zip(patterns, segments):
        if runs and runs[-1][1] == pattern:
            rows, _, sizes = runs[-1]
            runs[-1] = (slice(rows.start, row + size), pattern, sizes + [size])
        else:
            runs.append((slice(row, row + size), pattern, [size]))
        row += size
    return runs


def _check_segments(segments: Sequence[int], n_out: int) -> None:
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence) \
            or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in segments) or sum(segments) != n_out:
        raise ValueError(f"segments must be positive row counts summing to out_features ({n_out}), got {segments}")


def _check_columns(WT: torch.Tensor, patterns: Sequence[Pattern], segments: Sequence[int], block_size: int) -> None:
    if not isinstance(WT, torch.Tensor) or WT.dim() != 2 or not WT.is_floating_point():
        raise ValueError("WT must be a 2-D floating-point tensor [in_features, out_features]")
    _check_segments(segments, WT.shape[1])
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence) or len(patterns) != len(segments):
        raise ValueError(f"patterns must hold one pattern per segment ({len(segments)}), got {patterns!r}")
    for pattern in patterns:
        if isinstance(pattern, tuple):
            masks.check_pattern(pattern, WT.shape[0])
        else:
            masks.check_sparsity(pattern)
    _check_block_size(patterns, block_size)


@torch.no_grad()
def prune_columns(WT: torch.Tensor, U: torch.Tensor, patterns: Sequence[Pattern], segments: Sequence[int],
                  block_size: int = 128) -> torch.Tensor:
    r"""SparseGPT's column loop (Alg. 1): at the start of every group of columns, choose which of their
    weights to prune from the OBS error :math:`\varepsilon_{ij} = w_{ij}^2 / U_{jj}^2` of the weights as
    updated so far (adaptive mask selection, §3.2; every ``block_size`` columns, or every M for N:M,
    §3.3), then zero the pruned weights of each column and compensate on the columns after it
    (:func:`refimpl.obs.compensate_columns`).

    Args:
        WT: :math:`W^\top` ``[in, out]``, float32; updated in place.
        U: the upper Cholesky factor of the dampened :math:`H^{-1}`
            (:func:`refimpl.obs.upper_cholesky_of_inverse`).
        patterns, segments: the rows of :math:`W` (columns of ``WT``) in consecutive segments of
            ``segments[k]`` rows, pruned to ``patterns[k]``: a fraction of the weights, compared over the
            segment's rows (as in the authors' code), or ``(N, M)``, per row.
        block_size: columns per lazy update and per unstructured mask selection (:math:`B = B_s`).

    Returns:
        :math:`(M \odot \hat W)^\top` ``[in, out]``; its zeros are the mask.
    """
    _check_columns(WT, patterns, segments, block_size)
    n_in = WT.shape[0]
    u_diagonal = U.diagonal()  # [in]
    keep_t = torch.ones_like(WT, dtype=torch.bool)  # [in, out], the mask, transposed like WT
    runs = _runs(patterns, segments)

    def prune_column(i: int, w: torch.Tensor, out: torch.Tensor) -> None:
        for rows, pattern, sizes in runs:
            group = pattern[1] if isinstance(pattern, tuple) else block_size  # columns chosen together
            if i % group:
                continue
            # adaptive mask selection for columns i .. i + group, as updated so far
            columns = slice(i, min(i + group, n_in))
            error = WT[columns, rows] ** 2 / u_diagonal[columns, None] ** 2  # OBS error eps, [group, rows]
            if isinstance(pattern, tuple):  # per row of W: the N of the M with the largest error kept
                keep_t[columns, rows] = masks.keep_highest(error.T, pattern[1] - pattern[0]).T
            else:
                keep_t[columns, rows] = torch.cat([masks.unstructured_mask(part, pattern, scope="layer")
                                                   for part in error.split(sizes, dim=1)], dim=1)
        torch.mul(w, keep_t[i], out=out)

    return obs.compensate_columns(WT, U, block_size, prune_column)  # [in, out]


def _prune(weight: torch.Tensor, hessian_matrix: torch.Tensor, patterns: Sequence[Pattern], segments: Sequence[int],
           block_size: int, damp: float) -> torch.Tensor:
    """SparseGPT on ``weight [out, in]`` whose rows are ``segments`` (row counts) sharing ``H``, each
    segment pruned to its own pattern (:func:`prune_columns`)."""
    W, H = obs.prepare(weight, hessian_matrix)  # float32 [out, in], [in, in]
    U = obs.upper_cholesky_of_inverse(obs.dampen(H, damp))  # H^-1 = U^T U
    return prune_columns(W.T.contiguous(), U, patterns, segments, block_size).T.contiguous()  # [out, in]


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
    pattern = nm if nm is not None else float(sparsity)
    _check_loop([pattern], block_size, damp)
    segments = [n_out] if segments is None else list(segments)
    _check_segments(segments, n_out)
    return _prune(weight, hessian_matrix, [pattern] * len(segments), segments, block_size, damp)


def _prune_layer(linears: Sequence[dict[str, torch.nn.Linear]], patterns: Sequence[Pattern],
                 stats: dict[str, calibration.InputStatistics], block_size: int, damp: float) -> None:
    """Prune one decoder layer of one or more models (``linears[k]`` pruned to ``patterns[k]``), in place:
    the layers that read the same input, in every model, are stacked and pruned in one column loop."""
    for members in calibration.shared_input_sets(stats):
        weights = [layer[name].weight for layer in linears for name in members]  # model-major
        row_patterns = [pattern for pattern in patterns for _ in members]
        sizes = [w.shape[0] for w in weights]
        hessian_matrix = stats[members[0]].hessian()  # [in, in]
        obs.check_weight_and_hessian(weights[0], hessian_matrix)  # NaN errors would rank first in the masks
        pruned = _prune(torch.cat(weights), hessian_matrix, row_patterns, sizes, block_size, damp)
        for w, part in zip(weights, pruned.split(sizes)):
            w.copy_(part.to(w.dtype))


@torch.no_grad()
@restores_on_error("model")
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
        before the first layer changes; an error in a later layer (activations that overflow, a Hessian
        that dampening cannot make positive definite) leaves the model as it was (a copy of its tensors
        is held during the call).
    """
    masks.check_model(model, sparsity, nm)
    pattern = nm if nm is not None else float(sparsity)
    _check_loop([pattern], block_size, damp)
    for _, _, linears, stats in calibration.statistics_by_layer(model, blocks, statistics, batch_size):
        _prune_layer([linears], [pattern], stats, block_size, damp)
    return model


@torch.no_grad()
def sparsegpt_copies(model: torch.nn.Module, settings: Sequence[Pattern],
                     statistics: dict[str, calibration.InputStatistics], block_size: int = 128,
                     damp: float = 0.01) -> list[torch.nn.Module]:
    """SparseGPT copies of ``model``, one per setting (a sparsity, or ``(N, M)``), pruned together.

    The same as :func:`prune_model_sparsegpt` on a copy per setting with ``statistics`` captured once
    on the dense model, but faster for a sweep: the column loop updates every row of :math:`W` with
    the same factor :math:`U`, so the rows of all copies are stacked and pruned in one loop per
    layer — one Cholesky factorisation and one pass of per-column work instead of one per setting.
    (Calibrating layer by layer from blocks would give each copy different inputs, so this needs
    ``statistics``.)

    Returns:
        the pruned copies, in the order of ``settings``; ``model`` is not modified.
    """
    if isinstance(settings, (str, bytes)) or not isinstance(settings, Sequence) or not settings:
        raise ValueError(f"settings must be a non-empty sequence of sparsities or (N, M) tuples, got {settings!r}")
    for k, setting in enumerate(settings):
        try:
            if isinstance(setting, tuple):
                masks.check_model(model, 0.0, setting)
            else:
                masks.check_model(model, setting, None)
        except ValueError as error:
            raise ValueError(f"settings[{k}]: {error}") from None
    patterns = [setting if isinstance(setting, tuple) else float(setting) for setting in settings]
    _check_loop(patterns, block_size, damp)
    if not isinstance(statistics, dict):
        raise ValueError("statistics must be the dict of calibration.input_statistics(...) of the dense model")
    copies = [copy.deepcopy(model) for _ in settings]
    layers = [anatomy.decoder_layers(c) for c in copies]
    for i, _, _, stats in calibration.statistics_by_layer(model, None, statistics):
        linears = [anatomy.linears(copy_layers[i]) for copy_layers in layers]
        _prune_layer(linears, patterns, stats, block_size, damp)
    return copies
