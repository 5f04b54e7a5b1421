"""Layer-by-layer calibration: the inputs every linear layer sees on calibration text.

GPTQ, AWQ and SmoothQuant (quantization) and Wanda and SparseGPT (pruning) all need, for each linear
layer, the activations :math:`X` that reach it on a few calibration blocks — to build the Hessian
:math:`H = 2XX^\\top` (GPTQ, SparseGPT), the per-channel activation norms :math:`\\lVert X_j \\rVert_2`
(Wanda) or magnitudes (AWQ, SmoothQuant). They also process the model **one decoder layer at a
time** (Frantar et al. 2022, GPTQ §4): the inputs of layer :math:`\\ell + 1` are computed with layer
:math:`\\ell` *already compressed*, so that each layer corrects for the errors of the layers before
it, and only one layer's activations are in memory at once.

:func:`layerwise` implements that loop once for every method::

    for capture in layerwise(model, calibration_blocks):
        for name, linear in capture.linears.items():
            X = capture.inputs[name]            # [n_tokens, in_features]
            ...                                 # compress `linear` using X, in place
        # on the next iteration the layer's outputs are recomputed with the compressed weights

It works for Hugging Face decoders that keep their blocks in ``model.model.layers`` (Llama, Mistral,
Qwen, SmolLM2, ...): the arguments the model passes to its first block (attention mask, rotary
embeddings, positions) are recorded once and reused for every block (:func:`first_layer_inputs`, also
for a method that walks the layers itself, such as ZeroQuant's layer-wise distillation).

Most methods need only a few statistics of :math:`X`, not :math:`X` itself: the Gram matrix
:math:`X^\\top X` (from which GPTQ's Hessian and any layer's output error
:math:`\\lVert \\Delta W X \\rVert^2 = \\mathrm{tr}(\\Delta W X^\\top X \\Delta W^\\top)` follow), the mean
and the maximum magnitude per input channel. :class:`InputStatistics` holds them;
:func:`input_statistics` captures them once for a whole (uncompressed) model, so that a sweep over bit
widths or methods need not run the model again; :func:`statistics_by_layer` feeds a method either
way — recomputed layer by layer from calibration blocks, or from statistics captured once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from refimpl import anatomy
from refimpl._validation import check_finite, check_positive_int, check_token_ids, vocabulary_size
from refimpl.runtime import progress


@dataclass
class LayerCapture:
    """One decoder layer during calibration: its index, the module, its linear layers by name
    (relative to the layer, e.g. ``"self_attn.q_proj"``) and the inputs each received,
    ``inputs[name]: float32[n_tokens, in_features]`` over all calibration tokens, block after block
    (token ``t`` of block ``b`` in row ``b * seq_len + t``)."""

    index: int
    layer: torch.nn.Module
    linears: dict[str, torch.nn.Linear]
    inputs: dict[str, torch.Tensor]
    seq_len: int


class _StopForward(Exception):
    """Raised by the hook on the first decoder layer once its inputs are recorded."""


def check_blocks(blocks: torch.Tensor, batch_size: int = 8, model: torch.nn.Module | None = None) -> None:
    """Calibration token ``blocks`` must be a non-empty ``LongTensor [n_blocks, seq_len]`` of ids in
    ``model``'s vocabulary (when given) and ``batch_size`` a positive int."""
    check_token_ids("blocks", blocks, vocabulary_size(model))
    check_positive_int("batch_size", batch_size)


@torch.no_grad()
def first_layer_inputs(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8
                       ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """What the first decoder layer receives on the calibration ``blocks``, batch by batch:
    ``(hidden_states [batch, seq_len, hidden], kwargs)`` per batch of ``batch_size`` blocks, the
    keyword arguments (attention mask, rotary embeddings, positions) without the cache. The model runs
    only up to that layer; it is not modified. Feed the states to the layers in order to walk the
    model layer by layer (:func:`layerwise`; ZeroQuant's layer-wise distillation)."""
    check_blocks(blocks, batch_size, model)
    first = anatomy.decoder_layers(model)[0]
    device = next(model.parameters()).device
    recorded: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        recorded.append((hidden, kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in blocks.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return recorded


def layerwise(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8,
              skip: tuple[str, ...] = (), modifies: bool = True) -> Iterator[LayerCapture]:
    """Walk the decoder layers in order, yielding each with the inputs of its linear layers.

    Before yielding layer :math:`\\ell`, its linear layers' inputs are captured by running the layer
    on the outputs of layer :math:`\\ell - 1`; after the caller's loop body (which may modify the
    layer in place), the layer's outputs are recomputed with the modified weights and passed on.

    Args:
        model: a Hugging Face causal LM with ``model.model.layers``; put it in eval mode.
        blocks: calibration token ids, ``LongTensor[n_blocks, seq_len]``.
        batch_size: blocks per forward pass.
        skip: linear layers whose name contains one of these strings are not captured.
        modifies: whether the loop body may change the layer. ``False`` (for captures of an unmodified
            model) passes on the outputs of the capturing pass instead of recomputing them: half the
            forward passes, the same outputs.

    Raises ``ValueError`` when a layer's inputs hold NaN or Inf (activations that overflow), before
    that layer is yielded.
    """
    states = first_layer_inputs(model, blocks, batch_size)  # checks blocks and batch_size first
    layers = anatomy.decoder_layers(model)
    for index in progress(range(len(layers)), desc="calibration", total=len(layers)):
        layer = layers[index]
        linears = anatomy.linears(layer, skip)
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
        handles = [m.register_forward_pre_hook(
            lambda module, args, name=name: inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
            for name, m in linears.items()]
        try:
            with torch.no_grad():
                outputs = [anatomy.layer_output(layer(hidden, **kwargs)) for hidden, kwargs in states]
        finally:
            for handle in handles:
                handle.remove()
        captured = {name: torch.cat(xs) for name, xs in inputs.items()}  # [n_tokens, in_features] each
        for name, x in captured.items():  # activations that overflowed would make every statistic NaN
            check_finite(f"the inputs of {anatomy.layer_name(index, name)} on these blocks", x)
        yield LayerCapture(index, layer, linears, captured, blocks.shape[1])
        if modifies:  # the layer may have changed: its outputs, recomputed, feed the next layer
            with torch.no_grad():
                outputs = [anatomy.layer_output(layer(hidden, **kwargs)) for hidden, kwargs in states]
        states = [(output, kwargs) for output, (_, kwargs) in zip(outputs, states)]


@dataclass
class InputStatistics:
    """What a compression method needs to know about the inputs ``X [n_tokens, in]`` of a linear layer."""

    gram: torch.Tensor  # float32 [in, in]: X^T X, summed over tokens
    mean_abs: torch.Tensor  # float32 [in]: mean |x| per input channel
    absmax: torch.Tensor  # float32 [in]: max |x| per input channel
    n_tokens: int
    first_gram: torch.Tensor  # float32 [in, in]: the part of X^T X from the first token of every block

    @classmethod
    def from_inputs(cls, x: torch.Tensor, seq_len: int | None = None) -> "InputStatistics":
        """Statistics of ``x: [n_tokens, in_features]``, made of blocks of ``seq_len`` tokens (``None``:
        one block)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
            raise ValueError("x must be a non-empty [n_tokens, in_features] tensor of layer inputs")
        seq_len = x.shape[0] if seq_len is None else seq_len
        check_positive_int("seq_len", seq_len)
        if x.shape[0] % seq_len:
            raise ValueError(f"seq_len {seq_len} must divide the number of tokens ({x.shape[0]})")
        x = x.float()
        first = x[::seq_len]  # [n_blocks, in]: the first token of every block
        return cls(x.T @ x, x.abs().mean(dim=0), x.abs().amax(dim=0), x.shape[0], first.T @ first)

    def __add__(self, other: "InputStatistics") -> "InputStatistics":
        """The statistics of both token sets together (e.g. two calibration corpora captured apart)."""
        if not isinstance(other, InputStatistics) or other.gram.shape != self.gram.shape:
            return NotImplemented
        n = self.n_tokens + other.n_tokens
        mean_abs = (self.mean_abs * self.n_tokens + other.mean_abs * other.n_tokens) / n
        return InputStatistics(self.gram + other.gram, mean_abs, torch.maximum(self.absmax, other.absmax), n,
                               self.first_gram + other.first_gram)

    def hessian(self, first_token_weight: float = 1.0) -> torch.Tensor:
        """:math:`H = 2 X^\\top D X / n`, the Hessian of the layer-wise squared error (GPTQ), with the
        tokens weighted by :math:`D`: 1 for every token, ``first_token_weight`` for the first token
        of every block (1: the paper's uniform weighting).

        The first token of a sequence is an *attention sink*: most heads put most of their attention
        on it, so an error in its key or value reaches every later query. Weighting it like the
        number of queries that read it tells GPTQ so; uniform weights let GPTQ trade a large error on
        that one token for small errors on all others."""
        if not first_token_weight >= 0:
            raise ValueError(f"first_token_weight must be >= 0, got {first_token_weight!r}")
        return (2.0 / self.n_tokens) * (self.gram + (first_token_weight - 1.0) * self.first_gram)

    def output_error(self, delta_weight: torch.Tensor) -> float:
        """:math:`\\lVert \\Delta W X \\rVert_F^2 = \\mathrm{tr}(\\Delta W\\, X^\\top X\\, \\Delta W^\\top)` for a
        weight change ``delta_weight [out, in]``, summed over the calibration tokens."""
        delta = delta_weight.float()
        return ((delta @ self.gram) * delta).sum().item()


def layer_statistics(capture: LayerCapture) -> dict[str, InputStatistics]:
    """:class:`InputStatistics` of every linear layer of a captured decoder layer; layers that read the
    same tensor (q, k, v; gate, up) share one object."""
    stats: dict[str, InputStatistics] = {}
    for name, x in capture.inputs.items():
        shared = next((other for other in stats if torch.equal(capture.inputs[other], x)), None)
        stats[name] = stats[shared] if shared is not None else InputStatistics.from_inputs(x, capture.seq_len)
    return stats


def shared_input_sets(stats: dict[str, InputStatistics]) -> list[list[str]]:
    """The names of ``stats`` grouped by shared statistics object: the linear layers that read the
    same input (q, k, v; gate, up), in their order."""
    sets: dict[int, list[str]] = {}
    for name, s in stats.items():
        sets.setdefault(id(s), []).append(name)
    return list(sets.values())


def input_statistics(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8,
                     skip: tuple[str, ...] = ()) -> dict[str, InputStatistics]:
    """:class:`InputStatistics` of every linear layer of the decoder layers, by full module name
    (``"model.layers.3.mlp.down_proj"``), from one pass over the unmodified ``model``.

    The Gram matrices stay in memory: about 400 MB in float32 for SmolLM2-135M (one per distinct
    input of each layer). Captures of two token sets combine with :func:`combine_statistics`."""
    stats = {}
    for capture in layerwise(model, blocks, batch_size, skip, modifies=False):
        stats.update({anatomy.layer_name(capture.index, name): s for name, s in layer_statistics(capture).items()})
    return stats


def combine_statistics(*captures: dict[str, InputStatistics]) -> dict[str, InputStatistics]:
    """Statistics of several :func:`input_statistics` captures together, layer by layer (layers that
    shared one object still do)."""
    if not captures or any(c.keys() != captures[0].keys() for c in captures):
        raise ValueError("captures must be one or more input_statistics() results of the same model")
    combined: dict[int, InputStatistics] = {}
    result = {}
    for name, first in captures[0].items():
        if id(first) not in combined:
            total = first
            for capture in captures[1:]:
                total = total + capture[name]
            combined[id(first)] = total
        result[name] = combined[id(first)]
    return result


def statistics_by_layer(model: torch.nn.Module, blocks: torch.Tensor | None = None,
                        statistics: dict[str, InputStatistics] | None = None, batch_size: int = 8,
                        ) -> Iterator[tuple[int, torch.nn.Module, dict[str, torch.nn.Linear], dict[str, InputStatistics]]]:
    """Yield ``(index, layer, linears, stats)`` for every decoder layer, names relative to the layer.

    With ``blocks``: sequential, as in :func:`layerwise` — each layer's statistics come from the outputs
    of the layers before it *as the caller left them* (compressed). With ``statistics`` (from
    :func:`input_statistics`): every layer's statistics as captured on the uncompressed model, so that
    several settings can share one capture; no forward pass runs. Exactly one of the two must be given.
    """
    if (blocks is None) == (statistics is None):
        raise ValueError("pass exactly one of blocks (calibrate layer by layer) and statistics (captured once)")
    if blocks is not None:
        for capture in layerwise(model, blocks, batch_size):
            yield capture.index, capture.layer, capture.linears, layer_statistics(capture)
        return
    layers = anatomy.decoder_layers(model)
    missing = [anatomy.layer_name(i, name) for i, layer in enumerate(layers) for name in anatomy.linears(layer)
               if anatomy.layer_name(i, name) not in statistics]
    if missing:
        raise ValueError(f"statistics has no entry for {missing[0]} (and {len(missing) - 1} more layers)")
    for i, layer in enumerate(progress(layers, desc="layers", total=len(layers))):
        linears = anatomy.linears(layer)
        yield i, layer, linears, {name: statistics[anatomy.layer_name(i, name)] for name in linears}
