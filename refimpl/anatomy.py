"""Model anatomy: the parts of a Hugging Face decoder that compression methods read and replace.

Every method family needs the same few facts about the model it works on; they live here, so that no
family imports another for them:

- the **decoder layers** (``model.model.layers``: Llama, Mistral, Qwen, SmolLM2, ...) and what a
  layer returns (:func:`decoder_layers`, :func:`layer_output`);
- the **linear layers a method compresses**: :func:`linears` is the one definition (the ``nn.Linear``
  layers of a model or of one decoder layer, less those named in ``skip``), :func:`compressed_linears`
  applies it to a whole model, and :func:`layer_name` builds the one full name,
  ``"model.layers.3.mlp.up_proj"``, the name ``model.named_modules()`` gives that layer;
- **building and swapping layers**: an ``nn.Linear`` holding a given weight (:func:`linear_from_weight`)
  and modules put in place by name (:func:`swap_linears`);
- the **attention sizes** a config describes (:func:`attention_shape`).

Nothing here is a method or a measurement: a method imports this module (and the calibration capture,
:mod:`refimpl.calibration`, and the shared quantizers), never another family's package for its plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refimpl._validation import check_non_negative_int

# --- decoder layers -------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError("model must be a Hugging Face decoder with its blocks in model.model.layers")
    return layers


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns: alone, or first in a tuple (older transformers)."""
    return output[0] if isinstance(output, tuple) else output


# --- the linear layers a method compresses --------------------------------------------------------


def linears(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers inside ``module`` by name relative to it, in the module's order, less
    those whose name contains an entry of ``skip``: what a method compresses in a model or in one
    decoder layer. A layer a method already replaced (quantized, adapted) is no ``nn.Linear``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(skip, tuple) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"skip must be a tuple of name fragments (str), got {skip!r}")
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in skip)}


def compressed_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """:func:`linears` of a whole model, by full name (``"model.layers.3.mlp.up_proj"``): by default
    every one but the output layer, which SmolLM2 ties to the input embedding. Raises ``ValueError``
    if there is none: every caller is about to compress them."""
    found = linears(model, skip)
    if not found:
        raise ValueError("model has no nn.Linear layer to compress (after skip)")
    return found


def layer_name(index: int, name: str) -> str:
    """The full name of the module ``name`` (relative to its layer) of decoder layer ``index``, as
    ``model.named_modules()`` gives it: ``"model.layers.{index}.{name}"``."""
    check_non_negative_int("index", index)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty module name within the layer, got {name!r}")
    return f"model.layers.{index}.{name}"


# --- building and swapping layers -----------------------------------------------------------------


@torch.no_grad()
def linear_from_weight(weight: torch.Tensor, bias: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding a copy of ``weight [out, in]`` (and ``bias [out]``), in ``dtype``
    (default: the weight's), on the weight's device: what a converted, merged or pruned layer becomes."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a 2-D floating-point tensor [out_features, in_features]")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must be None or a tensor [{weight.shape[0]}], one value per output feature")
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device,
                       dtype=dtype or weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def swap_linears(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Put each module of ``replacements`` (by full name) in place of the layer of that name, in place.
    Every name is looked up before the first swap, so a wrong one (``AttributeError``) leaves ``model``
    untouched; build all replacements before calling this, for the same reason."""
    if not isinstance(replacements, dict) or not all(
            isinstance(name, str) and isinstance(module, nn.Module) for name, module in replacements.items()):
        raise TypeError("replacements must be a dict {full module name: nn.Module}")
    places = []
    for name, module in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(getattr(parent, child, None), nn.Module):
            raise AttributeError(f"{type(model).__name__} has no module {name!r} to replace")
        places.append((parent, child, module))
    for parent, child, module in places:
        setattr(parent, child, module)
    return model


# --- attention sizes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    """What sizes the attention and the KV cache of a decoder: layers, query and key/value heads, and
    the dimension of a head."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


def attention_shape(config: Any) -> AttentionShape:
    """Read the attention sizes from a Hugging Face config (Llama-style names, with the usual
    defaults: as many KV heads as query heads, ``head_dim = hidden_size / n_heads``)."""
    missing = [a for a in ("num_hidden_layers", "num_attention_heads", "hidden_size") if not hasattr(config, a)]
    if missing:
        raise ValueError(f"config must describe a decoder with attention; it lacks {missing}")
    n_heads = config.num_attention_heads
    return AttentionShape(
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
    )
