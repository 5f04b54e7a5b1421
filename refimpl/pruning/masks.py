r"""Sparsity masks shared by the unstructured pruning methods: which weights to remove, given scores.

Every unstructured method (:mod:`~refimpl.pruning.magnitude`, :mod:`~refimpl.pruning.wanda`,
:mod:`~refimpl.pruning.sparsegpt`) scores the weights of a layer and removes the lowest-scoring ones;
they differ in the score and in *among which weights* the lowest are chosen:

- per **layer** (magnitude pruning's usual comparison group): the :math:`\lfloor p \cdot d_\text{out}
  d_\text{in} \rceil` lowest scores of the whole matrix;
- per **row** (Wanda, Sun et al. 2024, §3: "per output"): the :math:`\lfloor p \cdot d_\text{in} \rceil`
  lowest of every output row, so every output neuron keeps the same number of inputs;
- **N:M** (semi-structured; Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks",
  arXiv:2104.08378): in every group of :math:`M` consecutive weights of a row (along the input
  dimension), only the :math:`N` highest-scoring are kept — 2:4 is the pattern NVIDIA's sparse tensor
  cores accelerate, 50 % sparse by construction.

A mask here is a bool tensor shaped like the weight, ``True`` where the weight is **kept**. Ties are
broken by position (as a stable sort would), so masks are deterministic and remove exactly the
requested count — on SmolLM2, whose weights were stored on a 4-bit grid, equal magnitudes are common.
"""

from __future__ import annotations

import torch

from refimpl import anatomy
from refimpl._validation import all_finite, check_finite, check_non_negative_int, check_positive_int


def check_sparsity(sparsity: float) -> None:
    """The fraction of weights to remove must lie in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def check_pattern(nm: tuple[int, int] | None, in_features: int | None = None) -> None:
    """``nm = (N, M)``: keep N of every M consecutive weights; needs 1 <= N <= M and M | in_features."""
    if nm is None:
        return
    if not isinstance(nm, tuple) or len(nm) != 2:
        raise ValueError(f"nm must be None or a tuple (N, M), got {nm!r}")
    n, m = nm
    check_positive_int("nm[0] (N)", n)
    check_positive_int("nm[1] (M)", m)
    if n > m:
        raise ValueError(f"nm: N ({n}) must not exceed M ({m})")
    if in_features is not None and in_features % m:
        raise ValueError(f"nm: M ({m}) must divide the input features ({in_features})")


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError("scores must be a 2-D floating-point tensor [out_features, in_features]")
    check_finite("scores", scores)  # a NaN compares as larger than every score: it would be kept


def keep_highest(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Keep mask over the last dim of ``scores [..., k]``: the ``n_remove`` lowest of every row removed,
    ties in position order (the mask a stable sort gives), in linear time: every score below the row's
    ``n_remove``-th smallest, then as many of the scores equal to it as the row still needs."""
    check_non_negative_int("n_remove", n_remove)
    if scores.dim() == 0 or n_remove > scores.shape[-1]:
        raise ValueError(f"n_remove ({n_remove}) cannot exceed the {scores.shape[-1] if scores.dim() else 0} "
                         "scores of a row")
    if n_remove == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(n_remove, dim=-1, keepdim=True).values  # [..., 1]
    removed = scores < threshold
    still_needed = n_remove - removed.sum(dim=-1, keepdim=True)  # [..., 1]
    ties = scores == threshold
    removed |= ties & (ties.cumsum(dim=-1) <= still_needed)  # the first ties of every row
    return ~removed


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Keep mask removing the ``sparsity`` fraction of lowest ``scores [out, in]``, compared per output
    ``"row"`` or over the whole ``"layer"``; the count removed is ``round(sparsity * size)``."""
    _check_scores(scores)
    check_sparsity(sparsity)
    if scope == "row":
        return keep_highest(scores, round(sparsity * scores.shape[1]))
    if scope == "layer":
        return keep_highest(scores.reshape(-1), round(sparsity * scores.numel())).reshape(scores.shape)
    raise ValueError(f"scope must be one of ['row', 'layer'], got {scope!r}")


def nm_mask(scores: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """Keep mask with the N highest of every M consecutive ``scores`` along each row (N:M sparsity)."""
    _check_scores(scores)
    check_pattern(nm, scores.shape[1])
    n, m = nm
    groups = scores.reshape(scores.shape[0], -1, m)  # [out, in / M, M]
    return keep_highest(groups, m - n).reshape(scores.shape)


def mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, scope: str = "row") -> torch.Tensor:
    """The N:M mask when ``nm`` is given (``sparsity`` is then ignored: it is 1 - N/M), else the
    unstructured mask of :func:`unstructured_mask`."""
    return nm_mask(scores, nm) if nm is not None else unstructured_mask(scores, sparsity, scope)


def check_model(model: torch.nn.Module, sparsity: float, nm: tuple[int, int] | None) -> None:
    """Check the arguments against every layer to be pruned, the
    :func:`~refimpl.anatomy.compressed_linears` of ``model`` (finite weights, M dividing the input
    features), so that a method fails before it changes the first layer."""
    check_sparsity(sparsity)
    check_pattern(nm)
    for name, linear in anatomy.compressed_linears(model).items():
        if nm is not None and linear.in_features % nm[1]:
            raise ValueError(f"nm: M ({nm[1]}) must divide the input features of {name} ({linear.in_features})")
        if not all_finite(linear.weight):
            raise ValueError(f"the weight of {name} holds NaN or Inf values")


def sparsity_of(model: torch.nn.Module) -> float:
    """The fraction of exactly-zero weights over the decoder layers' linear layers (measured). A
    layer that stores its weight packed (a quantized layer with ``dequantized_weight``) counts with the
    weight it computes with."""
    zeros = total = 0
    for layer in anatomy.decoder_layers(model):
        for module in layer.modules():
            if hasattr(module, "dequantized_weight"):
                weight = module.dequantized_weight()  # [out, in]
            elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2:
                weight = module.weight  # [out, in]
            else:
                continue
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total
