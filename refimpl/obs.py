r"""The Optimal Brain Surgeon column loop shared by GPTQ (quantization) and SparseGPT (pruning).

Both methods compress a weight matrix :math:`W \in \mathbb{R}^{d_\text{out} \times d_\text{in}}` one
input column at a time and minimise the layer-wise reconstruction error
:math:`\lVert W X - \hat W X \rVert_2^2` on calibration inputs :math:`X`, whose Hessian with respect
to every row of :math:`W` is :math:`H = 2 X X^\top`. After column :math:`q` is compressed (rounded by
GPTQ, partly zeroed by SparseGPT) with error :math:`w_q - \hat w_q`, the Optimal Brain Surgeon update
(Hassibi and Stork 1993; Frantar et al. 2022, "Optimal Brain Compression", arXiv:2208.11580)

.. math:: \delta_F = -\frac{w_q - \hat w_q}{[H_F^{-1}]_{qq}} \, (H_F^{-1})_{:,q}

moves the columns :math:`F` not yet compressed to compensate it. Both papers make this fast the same
way (GPTQ §4, SparseGPT §3.2 and Alg. 1): one column order for all rows, so that everything the update
needs comes from the upper Cholesky factor :math:`U` of :math:`H^{-1}` — for the set :math:`F` of
columns from :math:`q` on, :math:`(H_F^{-1})_{:,q} / [H_F^{-1}]_{qq} = U_{q,:} / U_{qq}` and
:math:`[H_F^{-1}]_{qq} = U_{qq}^2`; and *lazy batch updates*: the errors of a block of ``block_size``
columns reach the columns after the block in one matrix product.

:func:`compensate_columns` is that loop. What happens to a column — rounding to a grid, zeroing the
weights a mask removes — is the caller's ``compress`` function.
"""

from __future__ import annotations

from typing import Callable

import torch

from refimpl._validation import all_finite, check_positive_int


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    r"""The upper triangular :math:`U` with :math:`H^{-1} = U^\top U`, without forming :math:`H^{-1}`.

    With :math:`J` the order-reversing permutation, :math:`JHJ = LL^\top` (Cholesky) gives
    :math:`H = RR^\top` with :math:`R = JLJ` upper triangular, so :math:`H^{-1} = (R^{-1})^\top R^{-1}`
    and :math:`U = R^{-1}` (one factorisation and one triangular inverse; the papers' code takes the
    Cholesky factor of :math:`H^{-1}` computed by a second factorisation). Raises ``ValueError`` if
    :math:`H` is not positive definite (dampen it more, or calibrate on more tokens)."""
    try:
        R = torch.linalg.cholesky(H.flip(0, 1)).flip(0, 1)  # [in, in], upper triangular, H = R R^T
    except torch.linalg.LinAlgError:
        raise ValueError("the dampened Hessian is not positive definite: increase damp or the calibration "
                         "tokens") from None
    identity = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(R, identity, upper=True)


def check_damp(damp: float) -> None:
    """The dampening fraction must lie in (0, 1): without it, a Hessian from fewer calibration tokens
    than inputs is singular and cannot be factorised."""
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0 < damp < 1:
        raise ValueError(f"damp must be in (0, 1), got {damp!r}")


def check_weight_and_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    """``weight`` must be a finite 2-D float tensor ``[out, in]`` and ``hessian`` a finite ``[in, in]`` one."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a 2-D floating-point tensor [out_features, in_features]")
    if not all_finite(weight):
        raise ValueError("weight holds NaN or Inf values")
    n_in = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (n_in, n_in):
        raise ValueError(f"hessian_matrix must be a [{n_in}, {n_in}] tensor for a weight with {n_in} inputs")
    if not all_finite(hessian):
        raise ValueError("hessian_matrix holds NaN or Inf values")


def prepare(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Float32 copies of ``weight [out, in]`` and the Hessian ``[in, in]``, made safe to factorise:
    inputs that were always zero (:math:`H_{qq} = 0`) cannot matter, so their weights are set to zero
    and their diagonal entry to 1. (The caller may reorder the columns before :func:`dampen`.)"""
    W = weight.detach().float().clone()  # [out, in]
    H = hessian.detach().float().clone()  # [in, in]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def dampen(H: torch.Tensor, damp: float) -> torch.Tensor:
    r""":math:`H + \lambda \cdot \mathrm{mean}(\mathrm{diag}\,H)\, I` with :math:`\lambda` = ``damp``, in
    place (GPTQ Step 3, SparseGPT §3.2): keeps the Cholesky factorisation stable; returns ``H``."""
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H


def _check_loop(WT: torch.Tensor, U: torch.Tensor, block_size: int) -> None:
    check_positive_int("block_size", block_size)
    if not isinstance(WT, torch.Tensor) or WT.dim() != 2 or not isinstance(U, torch.Tensor) \
            or U.shape != (WT.shape[0], WT.shape[0]):
        raise ValueError(f"WT must be [in, out] and U [in, in] for the same in, got {tuple(WT.shape)} and "
                         f"{tuple(U.shape)}")


def compensate_columns(WT: torch.Tensor, U: torch.Tensor, block_size: int,
                       compress: Callable[[int, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    r"""Compress the columns of :math:`W` in order, compensating each error on the columns after it.

    The loop reads and writes one column of :math:`W` per step, so it works on :math:`W^\top`, where a
    column is a contiguous row, with in-place operations.

    Args:
        WT: :math:`W^\top` ``[in, out]``, float32; updated in place (it ends as the compensated weights
            before compression, which callers do not need).
        U: the upper Cholesky factor of the dampened :math:`H^{-1}` (:func:`upper_cholesky_of_inverse`).
        block_size: columns per lazy batch update (Alg. 1's :math:`B`).
        compress: ``compress(i, w, out)`` writes the compressed column ``i`` into ``out [out]`` given its
            current values ``w [out]``; it may read ``WT[i:]`` (e.g. to choose a group's scale or a mask
            from the columns not yet compressed, as they are now).

    Returns:
        :math:`\hat W^\top` ``[in, out]``, the compressed columns.
    """
    _check_loop(WT, U, block_size)
    n_in = WT.shape[0]
    QT = torch.empty_like(WT)  # [in, out], the compressed columns
    columns, compressed, u_rows = WT.unbind(0), QT.unbind(0), U.unbind(0)  # n_in views of [out], [out], [in]
    u_diagonal = U.diagonal().tolist()
    for start in range(0, n_in, block_size):  # lazy batch updates (Alg. 1)
        end = min(start + block_size, n_in)
        errors = torch.empty(end - start, WT.shape[1], dtype=WT.dtype, device=WT.device)  # [B, out]
        for i, error in zip(range(start, end), errors.unbind(0)):
            compress(i, columns[i], compressed[i])
            torch.sub(columns[i], compressed[i], out=error).div_(u_diagonal[i])  # (w_q - ŵ_q) / U_qq, [out]
            WT[i + 1 : end].addr_(u_rows[i][i + 1 : end], error, alpha=-1)  # within the block, now
        WT[end:].addmm_(U[start:end, end:].T, errors, alpha=-1)  # the rest of the matrix, once per block
    return QT
