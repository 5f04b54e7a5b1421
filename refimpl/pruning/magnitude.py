r"""Magnitude pruning: remove the weights of smallest absolute value (Han et al. 2015).

"Learning both Weights and Connections for Efficient Neural Networks" (arXiv:1506.02626) prunes the
connections whose weight magnitude :math:`|W_{ij}|` lies below a threshold, then retrains. The score
needs no data:

.. math:: S_{ij} = |W_{ij}|,

compared over one layer (``scope="layer"``, the usual baseline in the LLM pruning papers), over every
row (``"row"``), or across all layers at once with one threshold (``"global"``), which lets layers
with small weights lose more of them. ``nm=(N, M)`` keeps the N largest of every M consecutive
weights instead (:mod:`refimpl.pruning.masks`). No retraining here: this is the one-shot baseline
that SparseGPT and Wanda are measured against.
"""

from __future__ import annotations

import torch

from refimpl import anatomy
from refimpl._rollback import restores_on_error
from refimpl._validation import check_choice
from refimpl.pruning import masks


def _global_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep masks removing the ``sparsity`` fraction of smallest magnitudes over all ``weights`` together
    (ties in layer and position order)."""
    magnitudes = torch.cat([w.detach().abs().float().reshape(-1) for w in weights.values()])  # [all weights]
    keep = masks.keep_highest(magnitudes, round(sparsity * magnitudes.numel()))
    return {name: part.reshape(w.shape)
            for (name, w), part in zip(weights.items(), keep.split([w.numel() for w in weights.values()]))}


@torch.no_grad()
@restores_on_error("model")
def prune_model_magnitude(model: torch.nn.Module, sparsity: float, scope: str = "layer",
                    nm: tuple[int, int] | None = None) -> torch.nn.Module:
    """Magnitude-prune the linear layers of the decoder layers, in place.

    Args:
        sparsity: fraction of weights removed, in [0, 1) (ignored with ``nm``: 1 - N/M).
        scope: ``"layer"``, ``"row"`` or ``"global"`` (one threshold over all layers; not with ``nm``).
        nm: ``(N, M)`` for N:M sparsity, e.g. ``(2, 4)``.

    Returns:
        ``model``, its pruned weights set to zero. An error leaves it as it was (arguments are checked
        first; a copy of its tensors is held during the call).
    """
    masks.check_model(model, sparsity, nm)
    check_choice("scope", scope, ("layer", "row", "global"))
    if scope == "global" and nm is not None:
        raise ValueError("scope='global' compares across layers; N:M sparsity is per group of M: pass one of them")
    linears = anatomy.compressed_linears(model)
    if scope == "global":
        keep = _global_masks({name: m.weight for name, m in linears.items()}, sparsity)
    else:
        keep = {name: masks.mask(m.weight.abs().float(), sparsity, nm, scope) for name, m in linears.items()}
    for name, linear in linears.items():
        linear.weight.mul_(keep[name])
    return model
