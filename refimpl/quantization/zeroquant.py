r"""ZeroQuant: fine-grained, hardware-friendly W8A8 / W4A8 quantization (Yao et al. 2022).

ZeroQuant (arXiv:2206.01861) quantizes weights *and* activations of a Transformer after training with
the uniform quantizer of :mod:`~refimpl.quantization.uniform` — a scale :math:`S` and a zero point
:math:`Z` (:math:`Z = 0` symmetric) per group of values (§3, Eq. 1) — and makes it accurate by choosing
finer, but still GEMM-compatible, granularities for :math:`S` (§4.1):

- **group-wise weight quantization**: each row of a weight matrix is split into groups, each with its
  own :math:`S` (from Q-BERT), so that a few large weights only coarsen their own group;
- **token-wise dynamic activation quantization**: each token (row of :math:`X`) gets its own
  :math:`S`, computed on the fly from its range, so no calibration is needed and a token with large
  activations does not coarsen the others. (It does not help with *channel* outliers, which every
  token has — that is SmoothQuant's point, :mod:`~refimpl.quantization.smoothquant`.)

Both scales lie along the outer dimensions of the GEMM, so the integer matmul stays one kernel with a
rescale of its output. :func:`quantize_model_zeroquant` is this configuration of
:func:`~refimpl.quantization.activation.quantize_model_w8a8`.

**Layer-by-layer knowledge distillation (LKD, §4.2, Eq. 2)** then recovers accuracy without the original
training data: each quantized layer :math:`\hat L_k` is trained to reproduce its full-precision
teacher :math:`L_k` on the *same* input, the teacher's output of the layers before it,

.. math:: \mathcal{L}_{\mathrm{LKD},k} = \mathrm{MSE}\big(L_k \cdot L_{k-1} \cdots L_1(X) \;-\; \hat L_k \cdot L_{k-1} \cdots L_1(X)\big),

one layer at a time (only one layer's activations and gradients in memory), with the rounding passed
over by the straight-through estimator: :func:`layerwise_distill`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from refimpl import anatomy, calibration
from refimpl._rollback import restores_on_error
from refimpl._validation import check_positive_int
from refimpl.quantization import uniform
from refimpl.quantization.activation import ActivationQuantizedLinear, quantize_model_w8a8, straight_through


def quantize_model_zeroquant(model: nn.Module, weight_grid: uniform.Grid = uniform.Grid(8, group_size=64),
                             act_grid: uniform.Grid | None = uniform.Grid(8, per="token"),
                             skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """ZeroQuant's scheme, in place: group-wise weights on ``weight_grid`` (symmetric, ``group_size``
    inputs per scale by default; per channel: one group per row) and dynamic per-token activations on
    ``act_grid`` (``None``: weight-only).

    Returns:
        ``model``, modified in place (its linear layers become
        :class:`~refimpl.quantization.activation.ActivationQuantizedLinear`); an error leaves it as it
        was (see :func:`~refimpl.quantization.activation.quantize_model_w8a8`).
    """
    uniform.check_grid("weight_grid", weight_grid, ("channel", "group"))
    if act_grid is not None:
        uniform.check_grid("act_grid", act_grid, ("token",))
    return quantize_model_w8a8(model, None, weight_grid, act_grid, static=False, skip=skip)


class _LatentWeight(nn.Module):
    """Parametrization ``weight = Q(latent)`` with a straight-through gradient to the latent weight."""

    def __init__(self, layer: ActivationQuantizedLinear):
        super().__init__()
        self.quantize = layer.quantize_weight

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return straight_through(latent, self.quantize(latent))


def _paired_linears(fp_layer: nn.Module, q_layer: nn.Module) -> list[tuple[ActivationQuantizedLinear, nn.Linear]]:
    """Each weight-quantized layer of ``q_layer`` with the full-precision linear of ``fp_layer`` at its name."""
    fp_modules = dict(fp_layer.named_modules())
    pairs = []
    for name, module in q_layer.named_modules():
        if isinstance(module, ActivationQuantizedLinear) and module.weight_grid is not None:
            teacher = fp_modules.get(name)
            if not isinstance(teacher, nn.Linear) or teacher.weight.shape != module.weight.shape:
                raise TypeError(f"model_fp has no nn.Linear {name} of shape {tuple(module.weight.shape)}: "
                                f"model_q must be a quantized copy of model_fp")
            pairs.append((module, teacher))
    return pairs


@restores_on_error("model_q")
def layerwise_distill(model_fp: nn.Module, model_q: nn.Module, blocks: torch.Tensor, steps: int = 20,
                      lr: float = 1e-4, batch_size: int = 8) -> list[tuple[float, float]]:
    """LKD (§4.2): train the weights of each quantized decoder layer of ``model_q``, in place, to match
    the corresponding layer of ``model_fp`` on the teacher's inputs from the calibration ``blocks``.

    Each weight is re-learned from the teacher's full-precision weight as a latent ``W`` with the
    layer computing with :math:`Q(W)` (straight-through gradient) for ``steps`` Adam steps, one
    calibration batch per step; the layer then keeps :math:`Q(W)`. Norms and biases are not trained.
    ``model_q`` must be a quantized copy of ``model_fp`` (e.g. ``quantize_model_zeroquant(copy.deepcopy(model_fp))``).

    Returns:
        ``(MSE before, MSE after)`` of every decoder layer's output, over all calibration tokens. A
        non-finite loss stops training (``FloatingPointError``), and any error leaves ``model_q`` as it
        was (a copy of its tensors is held during the call).
    """
    check_positive_int("steps", steps)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    layers_fp, layers_q = anatomy.decoder_layers(model_fp), anatomy.decoder_layers(model_q)
    if len(layers_fp) != len(layers_q):
        raise TypeError(f"model_fp has {len(layers_fp)} decoder layers, model_q {len(layers_q)}")
    pairs = [_paired_linears(f, q) for f, q in zip(layers_fp, layers_q)]  # check all layers first
    states = calibration.first_layer_inputs(model_fp, blocks, batch_size)  # [(hidden [b, t, d], kwargs)]
    losses = []
    for index, (fp_layer, q_layer, layer_pairs) in enumerate(zip(layers_fp, layers_q, pairs)):
        with torch.no_grad():  # the teacher's outputs L_k(...L_1(X)): targets here, inputs of layer k + 1
            targets = [anatomy.layer_output(fp_layer(hidden, **kwargs)) for hidden, kwargs in states]

        def layer_mse() -> float:
            with torch.no_grad():
                return sum(F.mse_loss(anatomy.layer_output(q_layer(h, **kw)), t, reduction="sum").item()
                           for (h, kw), t in zip(states, targets)) / sum(t.numel() for t in targets)

        before = layer_mse()
        latents = []
        for module, teacher in layer_pairs:  # weight = Q(latent), the latent starting at the teacher's W
            parametrize.register_parametrization(module, "weight", _LatentWeight(module))
            latent = module.parametrizations.weight.original
            latent.data.copy_(teacher.weight.detach())
            latent.requires_grad_(True)
            latents.append(latent)
        if latents:
            optimizer = torch.optim.Adam(latents, lr=lr)
            for step in range(steps):
                (hidden, kwargs), target = states[step % len(states)], targets[step % len(states)]
                loss = F.mse_loss(anatomy.layer_output(q_layer(hidden, **kwargs)), target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the LKD loss of layer {index} is {loss.item()} at step {step}")
                grads = torch.autograd.grad(loss, latents)  # only the latents: no .grad left on the model
                for latent, grad in zip(latents, grads):
                    latent.grad = grad
                optimizer.step()
            for latent in latents:
                latent.grad = None
        for module, _ in layer_pairs:  # keep Q(W) as a plain, frozen weight
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight.requires_grad_(False)
        losses.append((before, layer_mse()))
        states = [(target, kwargs) for (_, kwargs), target in zip(states, targets)]
    return losses
