r"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter 2024).

"A Simple and Effective Pruning Approach for Large Language Models" (arXiv:2306.11695) observes that
a few input features of an LLM's layers carry activations far larger than the rest (the outliers of
LLM.int8()), so a small weight on such a feature can matter more than a large weight elsewhere. Its
score of weight :math:`W_{ij}` (Eq. 1) is the weight's magnitude times the norm of its input feature
over the calibration tokens,

.. math:: S_{ij} = |W_{ij}| \cdot \lVert X_j \rVert_2 ,

and the weights are compared **per output** (§3): every row of :math:`W` loses the same fraction of
its weights, which the paper finds better for LLMs than comparing over the whole layer. There is no
weight update and no second-order information: one forward pass for the norms, then a sort.
:math:`\lVert X_j \rVert_2^2` is the diagonal of the Gram matrix :math:`X^\top X` that
:class:`refimpl.calibration.InputStatistics` already holds. ``nm=(N, M)`` keeps the N highest scores
of every M consecutive inputs of a row (the paper's 2:4 and 4:8 results).
"""

from __future__ import annotations

import torch

from refimpl import calibration
from refimpl._rollback import restores_on_error
from refimpl._validation import check_choice
from refimpl.pruning import masks


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """:math:`|W_{ij}| \\cdot \\lVert X_j \\rVert_2` for ``weight [out, in]`` and ``input_norm [in]``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [out_features, in_features]")
    if not isinstance(input_norm, torch.Tensor) or input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm must be a tensor [{weight.shape[1]}], one norm per input feature")
    return weight.detach().abs().float() * input_norm.float()  # [out, in] * [in] broadcast over rows


def _check_mask_args(weight: torch.Tensor, stats: calibration.InputStatistics, sparsity: float,
                     nm: tuple[int, int] | None, scope: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [out_features, in_features]")
    if not isinstance(stats, calibration.InputStatistics):
        raise TypeError(f"stats must be calibration.InputStatistics, got {type(stats).__name__}")
    masks.check_sparsity(sparsity)
    masks.check_pattern(nm, weight.shape[1])
    check_choice("scope", scope, ("row", "layer"))


def wanda_mask(weight: torch.Tensor, stats: calibration.InputStatistics, sparsity: float,
               nm: tuple[int, int] | None = None, scope: str = "row") -> torch.Tensor:
    """Wanda's mask for ``weight [out, in]`` given the statistics of its calibration inputs :math:`X`:
    the scores :math:`S_{ij}` (Eq. 1, :func:`wanda_scores`) with :math:`\\lVert X_j \\rVert_2` the
    square root of the diagonal of :math:`X^\\top X`, the lowest fraction ``sparsity`` of every output
    row removed (§3; of the whole layer with ``scope="layer"``), or with ``nm = (N, M)`` the N highest of
    every M consecutive inputs of a row kept.

    Returns:
        ``BoolTensor [out, in]``, true for the weights kept.
    """
    _check_mask_args(weight, stats, sparsity, nm, scope)
    input_norm = stats.gram.diagonal().sqrt()  # ||X_j||_2 over the calibration tokens, [in]
    return masks.mask(wanda_scores(weight, input_norm), sparsity, nm, scope)


@torch.no_grad()
@restores_on_error("model")
def prune_model_wanda(model: torch.nn.Module, blocks: torch.Tensor | None, sparsity: float,
                      nm: tuple[int, int] | None = None, scope: str = "row", batch_size: int = 8,
                      statistics: dict[str, calibration.InputStatistics] | None = None) -> torch.nn.Module:
    """Wanda-prune the linear layers of the decoder layers, in place.

    Calibration as in :func:`refimpl.calibration.statistics_by_layer`: from ``blocks``, layer by layer on
    the outputs of the already pruned layers (the paper's procedure), or from ``statistics`` captured
    once on the dense model (``blocks=None``).

    Args:
        sparsity: fraction of weights removed, in [0, 1) (ignored with ``nm``).
        nm: ``(N, M)`` for N:M sparsity.
        scope: compare scores per output ``"row"`` (the paper) or over the whole ``"layer"``.

    Returns:
        ``model``, its pruned weights set to zero. An error — also one in a later layer, such as
        activations that overflow — leaves it as it was (a copy of its tensors is held during the call).
    """
    masks.check_model(model, sparsity, nm)
    check_choice("scope", scope, ("row", "layer"))
    for _, _, linears, stats in calibration.statistics_by_layer(model, blocks, statistics, batch_size):
        for name, linear in linears.items():
            linear.weight.mul_(wanda_mask(linear.weight, stats[name], sparsity, nm, scope))
    return model
