r"""ZeroQuant's layer-by-layer knowledge distillation (LKD): train a quantized model one layer at a time.

ZeroQuant (Yao et al. 2022, "ZeroQuant: Efficient and Affordable Post-Training Quantization for
Large-Scale Transformers", arXiv:2206.01861, §4.2) recovers what quantization costs with neither the
original training data nor the memory of full training: with :math:`L_1, \dots, L_N` the transformer
layers of the full-precision model and :math:`\hat L_k` the quantized version of :math:`L_k`, the
quantized layer is trained to reproduce its original on the *same* input, the output of the
full-precision layers before it (Eq. 4),

.. math:: \mathcal{L}_{\mathrm{LKD},k} = \mathrm{MSE}\big(L_k \cdot L_{k-1} \cdots L_1(X) \;-\;
          \hat L_k \cdot L_{k-1} \cdots L_1(X)\big),

for :math:`k = 1, \dots, N` in turn, so that only one layer's activations, gradients and optimizer
state are in memory at once. :math:`X` can be the original training data or text from anywhere else
(the paper's point is that it need not be the former); the book uses its calibration split.

In Eq. 4 the layers before :math:`\hat L_k` are the float model's (``inputs="float"``, the default):
each quantized layer learns to map the float model's hidden states to the float model's next ones,
and never sees the error that the quantized layers before it add. ``inputs="quantized"`` feeds both
sides the output of the quantized layers already trained, :math:`\hat L_{k-1} \cdots \hat L_1(X)`,
the order in which GPTQ calibrates (:mod:`refimpl.calibration`), so that each layer can correct the
error it receives; that variant is not the paper's.

The quantized layers are QAT's (:func:`refimpl.quantization.qat.prepare_qat`: latent weights starting
at round-to-nearest, straight-through gradients, optional ``a_bits`` for ZeroQuant's W4/8-A8), the
layers' inputs come from :func:`refimpl.calibration.first_layer_inputs`, and each layer trains with
the loop of :mod:`refimpl.training` (AdamW, warm-up, cosine decay, gradient clipping) on its own
parameters alone. :func:`~refimpl.quantization.qat.convert_qat` turns the result into plain or packed
layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refimpl import anatomy, calibration, training
from refimpl._rollback import restores_on_error
from refimpl._validation import check_choice
from refimpl.quantization.qat import FakeQuantLinear
from refimpl.runtime import progress

#: The book's LKD budget (chapter 04): per decoder layer, 7 AdamW steps at a learning rate of 1e-3
#: after one warm-up step, one batch of calibration blocks per step.
LKD = training.TrainConfig(steps=7, lr=1e-3, warmup_steps=1)
#: Whose hidden states feed layer k: the float model's (Eq. 4) or the quantized layers' before it.
INPUTS = ("float", "quantized")

#: One calibration batch at layer k: the layer's input [b, seq, hidden], the keyword arguments the model
#: passes its layers (mask, rotary embeddings, positions) and the target L_k(input) [b, seq, hidden].
Batch = tuple[torch.Tensor, dict[str, Any], torch.Tensor]


def layer_mse(layer: nn.Module, batch: Batch) -> torch.Tensor:
    r""":math:`\mathcal{L}_{\mathrm{LKD},k}` on one batch: the mean squared error between the layer's output
    and the float layer's on the same input."""
    hidden, kwargs, target = batch
    return F.mse_loss(anatomy.layer_output(layer(hidden, **kwargs)), target)


@torch.no_grad()
def _mse_over(layer: nn.Module, batches: list[Batch]) -> float:
    """The LKD loss over all calibration tokens (every batch weighted by its size)."""
    return sum(layer_mse(layer, b).item() * b[2].numel() for b in batches) / sum(b[2].numel() for b in batches)


@restores_on_error("model")
def layerwise_distill(model: nn.Module, teacher: nn.Module, blocks: torch.Tensor,
                      config: training.TrainConfig = LKD, inputs: str = "float",
                      batch_size: int = 2) -> list[tuple[float, float]]:
    """LKD (§4.2, Eq. 4): train the decoder layers of ``model`` (after
    :func:`~refimpl.quantization.qat.prepare_qat`, a quantized copy of ``teacher``) one at a time, in
    place, each to reproduce the same layer of the float ``teacher`` on the calibration ``blocks``
    (``LongTensor [n_blocks, seq_len]``, ``batch_size`` blocks per step). Layer k trains for
    ``config.steps`` steps of :func:`refimpl.training.train` on its own parameters that require a
    gradient (its latent weights; freeze its norms to train only those), every other layer untouched;
    its input is the float model's hidden state (``inputs="float"``) or the trained quantized layers'
    output (``"quantized"``). The teacher runs in eval mode without gradients.

    Returns:
        ``(MSE before, MSE after)`` of every decoder layer's output against the float layer's, over all
        calibration tokens. Any error (a non-finite loss: ``FloatingPointError``) leaves ``model`` as it
        was (a copy of its tensors is held during the call).
    """
    if not isinstance(model, nn.Module) or not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("model has no FakeQuantLinear layer (qat.prepare_qat first)")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    training.check_config(config)
    check_choice("inputs", inputs, INPUTS)
    layers, teacher_layers = anatomy.decoder_layers(model), anatomy.decoder_layers(teacher)
    if len(layers) != len(teacher_layers):
        raise ValueError(f"teacher has {len(teacher_layers)} decoder layers, model {len(layers)}: "
                         f"model must be a quantized copy of teacher")
    for index, layer in enumerate(layers):
        if not any(p.requires_grad for p in layer.parameters()):
            raise ValueError(f"model: decoder layer {index} has no parameter that requires a gradient")
    # [(hidden [b, seq, hidden], kwargs)] per batch; checks blocks and batch_size, changes nothing
    states = calibration.first_layer_inputs(model if inputs == "quantized" else teacher, blocks, batch_size)

    was_training = teacher.training
    teacher.eval()
    results = []
    try:
        for index in progress(range(len(layers)), desc="LKD", total=len(layers)):
            layer, teacher_layer = layers[index], teacher_layers[index]
            with torch.no_grad():  # the targets L_k(input)
                targets = [anatomy.layer_output(teacher_layer(hidden, **kwargs)) for hidden, kwargs in states]
            batches = [(hidden, kwargs, target) for (hidden, kwargs), target in zip(states, targets)]
            before = _mse_over(layer, batches)
            training.train(layer, batches, layer_mse, config, desc=f"LKD, layer {index}")
            results.append((before, _mse_over(layer, batches)))
            with torch.no_grad():  # the next layer's input: L_k(...) (Eq. 4) or the trained L̂_k(...)
                outputs = targets if inputs == "float" else [
                    anatomy.layer_output(layer(hidden, **kwargs)) for hidden, kwargs in states]
            states = [(output, kwargs) for output, (_, kwargs) in zip(outputs, states)]
    finally:
        teacher.train(was_training)
    return results
