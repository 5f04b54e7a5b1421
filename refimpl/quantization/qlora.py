r"""QLoRA: LoRA adapters on a frozen 4-bit NormalFloat base (Dettmers et al. 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs", arXiv:2305.14314).

The base model's linear layers are stored in NF4 with double quantization
(:class:`~refimpl.quantization.packed.CodeBookLinear`, blocks of 64, bit-exact with bitsandbytes) and
never change; LoRA adapters (:mod:`refimpl.lora`) in float32 on every attention and MLP projection are
the only trained parameters. In the paper's notation (Eq. 5), for one layer,

.. math:: Y = X\,\mathrm{doubleDequant}(c_1, c_2, W^{\mathrm{NF4}}) + X L_1 L_2 ,

with :math:`L_1 L_2` the adapter (``lora_A`` and ``lora_B`` here, times :math:`\alpha/r`). Gradients
flow through the dequantized base weight into the adapters; the base has none. The paper also pages
optimizer state to CPU memory, which matters on GPUs only and is not reproduced here.

What training then costs in memory is three different numbers, which :func:`memory_report` measures:
the bytes stored (the packed base, the float parts such as embeddings, and the adapters), the bytes of
the trained parameters, and the optimizer state AdamW keeps for them (two float32 moments each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from refimpl import lora, training
from refimpl._rollback import restores_on_error
from refimpl.evaluate import model_bytes
from refimpl.quantization import formats, packed


@restores_on_error("model")
def prepare_qlora(model: nn.Module, r: int = 8, alpha: float = 16.0, blocksize: int = 64, double_quant: bool = True,
                  targets: tuple[str, ...] = lora.DEFAULT_TARGETS) -> nn.Module:
    """Pack the linear layers of ``model`` in NF4 (output layer excepted) and add LoRA adapters to the
    ``targets`` projections, in place. Afterwards only the adapters require gradients. Merging
    (:func:`refimpl.lora.merge_lora`) gives float32 layers holding the dequantized weight plus the update.

    Returns:
        ``model``. An error leaves it as it was (a copy of its tensors is held during the call).
    """
    lora.check_lora_arguments(model, r, alpha, targets)  # before packing: an error leaves the model untouched
    packed.pack_model_code_book(model, formats.NF4_CODE, blocksize, double_quant)
    return lora.add_lora(model, r, alpha, targets)


@dataclass(frozen=True)
class MemoryReport:
    """Measured bytes of a model being fine-tuned with adapters."""

    stored_bytes: int  # everything the model holds: base (packed or float), embeddings, norms, adapters
    trainable_parameters: int
    trainable_bytes: int  # the parameters that require gradients
    gradient_bytes: int  # their gradients while a step runs: computed, one tensor of the same size each
    optimizer_bytes: int | None  # the optimizer's state, if an optimizer (after a step) was given


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """The memory of fine-tuning ``model``: stored and trained bytes and the optimizer state measured on
    the tensors, gradients computed (one per trained parameter). Activations are not included."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return MemoryReport(model_bytes(model), sum(p.numel() for p in trainable), trainable_bytes, trainable_bytes,
                        None if optimizer is None else training.optimizer_state_bytes(optimizer))
