r"""A student made from its teacher: the same model with fewer decoder layers.

A distilled student must share the teacher's tokenizer (the losses compare distributions over the same
vocabulary), and it learns faster from a good start than from random weights. Dropping decoder layers
gives both: the student keeps the teacher's embeddings, final norm and output head and a subset of its
layers, with their weights copied, so that it is a smaller model of the same architecture that the
same code (Hugging Face ``generate``, ``save_pretrained``, the KV cache) runs unchanged. Keeping layers
spread evenly over the depth is the usual start (DistilBERT, Sanh et al. 2019, arXiv:1910.01108, took
one layer in two); the default here keeps the first and the last layer too, the one that reads the
embeddings and the one that writes to the output head.

With :math:`L` teacher layers and :math:`n` student layers, :func:`evenly_spaced` keeps
:math:`\ell_i = \mathrm{round}\big(i\,(L-1)/(n-1)\big)` for :math:`i = 0, \dots, n-1`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence


from refimpl import anatomy
from refimpl._rollback import private_copy
from refimpl._validation import check_layer_indices, check_positive_int
from refimpl.pruning import structured

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def evenly_spaced(n_teacher_layers: int, n_layers: int) -> tuple[int, ...]:
    """``n_layers`` indices spread evenly over ``range(n_teacher_layers)``, first and last included
    (only the first when ``n_layers`` is 1)."""
    check_positive_int("n_teacher_layers", n_teacher_layers)
    check_positive_int("n_layers", n_layers)
    if n_layers > n_teacher_layers:
        raise ValueError(f"n_layers must be at most the teacher's {n_teacher_layers} layers, got {n_layers}")
    if n_layers == 1:
        return (0,)
    return tuple(round(i * (n_teacher_layers - 1) / (n_layers - 1)) for i in range(n_layers))


@dataclass(frozen=True)
class StudentSpec:
    """What a layer-subset student is: the teacher it comes from (its :func:`refimpl.models.load_model`
    name or path) and the teacher's decoder layers it keeps, in order."""

    teacher: str
    keep: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ValueError(f"teacher must be a non-empty str naming the teacher, got {self.teacher!r}")
        object.__setattr__(self, "keep", check_layer_indices(self.keep))  # a list given as keep becomes a tuple

    @classmethod
    def evenly_spaced(cls, teacher: str, n_teacher_layers: int, n_layers: int) -> "StudentSpec":
        """The spec keeping :func:`evenly_spaced` layers."""
        return cls(teacher, evenly_spaced(n_teacher_layers, n_layers))


def layer_subset_student(teacher: "PreTrainedModel", keep: Sequence[int] | None = None,
                         n_layers: int | None = None) -> "PreTrainedModel":
    """A new model made of the teacher's embeddings, final norm, output head and the decoder layers
    ``keep`` (or ``n_layers`` evenly spaced ones, first and last included), all deep copies: the
    teacher is not changed and the student trains independently. (The whole teacher is copied and the
    dropped layers released, so memory briefly holds two teachers.)

    The copy's config gets ``num_hidden_layers = len(keep)`` (and ``layer_types`` cut to the kept
    layers where the config has it), and every module of a kept layer that has a ``layer_idx`` gets
    its new position, so that the KV cache, which is indexed by layer, works.

    Args:
        teacher: a Hugging Face causal LM with ``model.layers``.
        keep: the teacher's layer indices to keep, strictly increasing.
        n_layers: instead of ``keep``, how many evenly spaced layers to keep.

    Returns:
        the student, in eval mode, on the teacher's device and dtype, with gradients enabled.
    """
    n_teacher = len(anatomy.decoder_layers(teacher))
    if (keep is None) == (n_layers is None):
        raise ValueError("give exactly one of keep (layer indices) and n_layers (a count)")
    keep = evenly_spaced(n_teacher, n_layers) if keep is None else check_layer_indices(keep, n_teacher)
    with private_copy(copy.deepcopy(teacher)) as student:  # depth pruning of a copy no caller holds
        structured.keep_layers(student, keep)
    student.requires_grad_(True)
    return student.eval()
