r"""Structured pruning: a smaller dense model — fewer attention heads, MLP channels and layers.

Unstructured sparsity leaves every matrix its shape; only sparse kernels can skip the zeros.
Structured pruning removes whole **structures** so that the matrices themselves shrink and any dense
kernel runs faster. In a Llama decoder layer the structures, and the weights that go with each
(LLM-Pruner, Ma, Fang, Wang 2023, arXiv:2305.11627, §3.1: the *dependency groups*), are:

- a **query head** :math:`h`: its rows of ``q_proj`` and its columns of ``o_proj``;
- a **key-value group** :math:`g` (grouped-query attention): its rows of ``k_proj`` and ``v_proj``
  and every query head that reads it. Hugging Face's attention needs the same number of query heads
  per group, so heads are removed in equal numbers from every kept group;
- an **MLP channel** :math:`c`: row :math:`c` of ``gate_proj`` and ``up_proj`` and column :math:`c`
  of ``down_proj``;
- a whole **layer** (depth pruning; ShortGPT, Men et al. 2024, arXiv:2403.03853).

The **importance** of a structure estimates how much the loss changes without it. LLM-Pruner (§3.2)
uses the first-order Taylor expansion of the loss :math:`\mathcal{L}` on calibration text, per weight
(Eq. 4, element-wise, first order)

.. math:: I(W_k) = \left| \frac{\partial \mathcal{L}}{\partial W_k} W_k \right|,

summed over the weights of the structure (:func:`taylor_importance`). An activation-based
alternative needs no gradient (:func:`activation_importance`): Wanda's score :math:`|W_{ij}|\,\lVert
X_j \rVert_2` summed over the output columns a head or channel owns, and for layers ShortGPT's
*block influence* :math:`\mathrm{BI}_\ell = 1 - \mathbb{E}_t \cos(x_{\ell,t}, x_{\ell+1,t})` — a layer
that barely changes its input can go.

:func:`prune_structured` keeps the most important structures in **every** layer in equal numbers (so
that the result is an ordinary ``LlamaConfig``: ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``num_hidden_layers``; LLM-Pruner instead spares the first and last layers)
and the most important layers. Pruning hurts; LLM-Pruner recovers with a short LoRA fine-tune on
general text (§3.3), :func:`recover`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from refimpl import anatomy, calibration, lora, runtime, training
from refimpl._rollback import restores_on_error
from refimpl._validation import check_finite, check_layer_indices, check_positive_int


@dataclass
class Importance:
    """Importance scores of a model's structures (higher: more important). ``L`` decoder layers."""

    heads: torch.Tensor  # [L, n_heads]: query heads
    kv_heads: torch.Tensor  # [L, n_kv_heads]: the key/value rows of each group (0 where not scored)
    channels: torch.Tensor  # [L, intermediate_size]: MLP channels
    layers: torch.Tensor  # [L]: whole layers

    def group_scores(self) -> torch.Tensor:
        """``[L, n_kv_heads]``: a key-value group's own score plus those of the query heads it serves."""
        n_layers, n_kv = self.kv_heads.shape
        return self.kv_heads + self.heads.reshape(n_layers, n_kv, -1).sum(dim=2)


def _per_structure(layer: nn.Module, per_weight: dict[str, torch.Tensor], n_heads: int,
                   n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum per-weight scores ``[out, in]`` (by linear name within ``layer``) over each query head,
    key-value group and MLP channel: ``([n_heads], [n_kv], [intermediate])``."""
    def rows(name: str, n: int) -> torch.Tensor:  # [out, in] -> [n]: sums over blocks of out rows
        return per_weight[name].sum(dim=1).reshape(n, -1).sum(dim=1)

    def columns(name: str, n: int) -> torch.Tensor:  # [out, in] -> [n]: sums over blocks of in columns
        return per_weight[name].sum(dim=0).reshape(n, -1).sum(dim=1)

    heads = rows("self_attn.q_proj", n_heads) + columns("self_attn.o_proj", n_heads)
    kv_heads = rows("self_attn.k_proj", n_kv) + rows("self_attn.v_proj", n_kv)
    channels_count = layer.mlp.down_proj.in_features
    channels = rows("mlp.gate_proj", channels_count) + rows("mlp.up_proj", channels_count) \
        + columns("mlp.down_proj", channels_count)
    return heads, kv_heads, channels


def _check_layers(model: nn.Module) -> list[nn.Module]:
    layers = list(anatomy.decoder_layers(model))
    for i, layer in enumerate(layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            if not isinstance(layer.get_submodule(name), nn.Linear):
                raise TypeError(f"layer {i}: {name} must be an nn.Linear (merge adapters, do not quantize first)")
    return layers


def taylor_importance(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> Importance:
    """LLM-Pruner's first-order Taylor importance (Eq. 4) of every head, group, channel and layer.

    The gradient of the mean next-token loss over ``blocks`` (``LongTensor [n, seq_len]``) is accumulated
    batch by batch; each weight's :math:`|g \\cdot w|` is summed over the structures it belongs to, and a
    layer's score is the sum over all its weights. The weights and ``requires_grad`` flags of ``model``
    are unchanged; its ``.grad`` tensors are cleared. Scores come back on the CPU."""
    calibration.check_blocks(blocks, batch_size, model)
    layers = _check_layers(model)
    attention = anatomy.attention_shape(model.config)
    weights = {(i, name): m.weight for i, layer in enumerate(layers) for name, m in anatomy.linears(layer).items()}
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad(), training.requires_grad_restored(model):
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for w in weights.values():
                w.requires_grad_(True)
            for batch in blocks.split(batch_size):
                loss = training.next_token_loss(model, batch) * (batch.shape[0] / blocks.shape[0])
                loss.backward()
        per_layer = []
        for i, layer in enumerate(layers):
            scores = {name: (w.grad * w).abs().float() for (j, name), w in weights.items() if j == i}
            heads, kv_heads, channels = _per_structure(layer, scores, attention.n_heads, attention.n_kv_heads)
            per_layer.append((heads, kv_heads, channels, sum(s.sum() for s in scores.values())))
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
    return Importance(*(torch.stack([row[k] for row in per_layer]).detach().cpu() for k in range(4)))


@torch.no_grad()
def activation_importance(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> Importance:
    """Gradient-free importance from one forward pass over ``blocks``: heads and channels by the Wanda
    scores :math:`|W_{ij}|\\,\\lVert X_j \\rVert_2` of the ``o_proj``/``down_proj`` columns they own,
    key-value groups 0 (scored through their heads), layers by block influence
    :math:`1 - \\mathbb{E}_t \\cos(x_{\\ell,t}, x_{\\ell+1,t})` (ShortGPT Eq. 1). Scores come back on the CPU."""
    calibration.check_blocks(blocks, batch_size, model)
    layers = _check_layers(model)
    attention = anatomy.attention_shape(model.config)
    n_heads, n_kv, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
    squares = {(i, name): 0.0 for i in range(len(layers)) for name in ("self_attn.o_proj", "mlp.down_proj")}
    cosines = [0.0] * len(layers)
    handles = []

    def record_input(key):
        def hook(module, args):  # sum over tokens of x_j^2, [in]
            squares[key] = squares[key] + args[0].float().reshape(-1, args[0].shape[-1]).pow(2).sum(dim=0).cpu()
        return hook

    def record_influence(i):
        def hook(module, args, kwargs, output):  # cosine of every token's hidden state before and after the layer
            hidden = args[0] if args else kwargs["hidden_states"]
            similarity = torch.cosine_similarity(hidden.float(), anatomy.layer_output(output).float(), dim=-1)
            cosines[i] += similarity.sum().item()
        return hook

    for i, layer in enumerate(layers):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            handles.append(layer.get_submodule(name).register_forward_pre_hook(record_input((i, name))))
        handles.append(layer.register_forward_hook(record_influence(i), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        with runtime.eval_mode(model):
            for batch in blocks.split(batch_size):
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    heads, channels = [], []
    for i, layer in enumerate(layers):
        o_proj, down_proj = layer.self_attn.o_proj.weight.cpu(), layer.mlp.down_proj.weight.cpu()
        o_scores = o_proj.abs().float().sum(dim=0) * squares[(i, "self_attn.o_proj")].sqrt()  # [n_heads * head_dim]
        heads.append(o_scores.reshape(n_heads, head_dim).sum(dim=1))
        channels.append(down_proj.abs().float().sum(dim=0) * squares[(i, "mlp.down_proj")].sqrt())  # [intermediate]
    return Importance(torch.stack(heads), torch.zeros(len(layers), n_kv), torch.stack(channels),
                      1 - torch.tensor(cosines) / blocks.numel())


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores``, in increasing order (ties: the earlier index)."""
    return scores.argsort(descending=True, stable=True)[:k].sort().values


def _check_count(param: str, value: int | None, current: int) -> None:
    if value is not None:
        check_positive_int(param, value)
        if value > current:
            raise ValueError(f"{param} ({value}) cannot exceed the current number ({current})")


@torch.no_grad()
@restores_on_error("model")
def prune_structured(model: nn.Module, importance: Importance, intermediate_size: int | None = None,
                     heads_per_group: int | None = None, n_kv_heads: int | None = None,
                     n_layers: int | None = None) -> nn.Module:
    """Shrink ``model`` in place to the given sizes, keeping the most important structures.

    Args:
        importance: scores of ``model``'s structures (:func:`taylor_importance`, :func:`activation_importance`).
        intermediate_size: MLP channels kept in every layer (``None``: all).
        heads_per_group: query heads kept in every kept key-value group (``None``: all).
        n_kv_heads: key-value groups kept in every layer (``None``: all), by :meth:`Importance.group_scores`.
        n_layers: decoder layers kept (``None``: all), by ``importance.layers``.

    Returns:
        ``model``, with smaller ``nn.Linear`` layers, fewer decoder layers and its config updated; an
        ordinary Hugging Face model (``save_pretrained`` and ``from_pretrained`` work). Scores must be
        finite (a NaN would rank first and be kept); an error leaves the model as it was (a copy of its
        tensors is held during the call).
    """
    layers = _check_layers(model)
    attention = anatomy.attention_shape(model.config)
    n_heads, n_kv, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
    intermediate = model.config.intermediate_size
    if not isinstance(importance, Importance):
        raise TypeError(f"importance must be an Importance, got {type(importance).__name__}")
    expected = {"heads": (len(layers), n_heads), "kv_heads": (len(layers), n_kv),
                "channels": (len(layers), intermediate), "layers": (len(layers),)}
    for name, shape in expected.items():
        if tuple(getattr(importance, name).shape) != shape:
            raise ValueError(f"importance.{name} has shape {tuple(getattr(importance, name).shape)}, "
                             f"the model needs {shape}: score the model you prune")
        check_finite(f"importance.{name}", getattr(importance, name))
    importance = Importance(*(t.detach().cpu() for t in (importance.heads, importance.kv_heads, importance.channels,
                                                         importance.layers)))
    _check_count("intermediate_size", intermediate_size, intermediate)
    _check_count("heads_per_group", heads_per_group, n_heads // n_kv)
    _check_count("n_kv_heads", n_kv_heads, n_kv)
    _check_count("n_layers", n_layers, len(layers))
    keep_groups = n_kv if n_kv_heads is None else n_kv_heads
    keep_per_group = n_heads // n_kv if heads_per_group is None else heads_per_group

    def select(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
        device = linear.weight.device
        weight = linear.weight if rows is None else linear.weight[rows.to(device)]  # [out', in]
        weight = weight if cols is None else weight[:, cols.to(device)]  # [out', in']
        bias = None if linear.bias is None else (linear.bias if rows is None else linear.bias[rows.to(device)])
        return anatomy.linear_from_weight(weight, bias)

    def head_rows(heads: torch.Tensor) -> torch.Tensor:  # head indices -> their rows (or columns), [k * head_dim]
        return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)

    group_scores = importance.group_scores()  # [L, n_kv]
    for i, layer in enumerate(layers):
        replacements = {}
        if intermediate_size is not None:
            channels = _top(importance.channels[i], intermediate_size)
            replacements |= {"mlp.gate_proj": select(layer.mlp.gate_proj, rows=channels),
                             "mlp.up_proj": select(layer.mlp.up_proj, rows=channels),
                             "mlp.down_proj": select(layer.mlp.down_proj, cols=channels)}
        if n_kv_heads is not None or heads_per_group is not None:
            groups = _top(group_scores[i], keep_groups)  # kept key-value groups, in order
            per_group = importance.heads[i].reshape(n_kv, -1)  # [n_kv, heads per group]
            heads = torch.cat([g * (n_heads // n_kv) + _top(per_group[g], keep_per_group) for g in groups.tolist()])
            replacements |= {"self_attn.q_proj": select(layer.self_attn.q_proj, rows=head_rows(heads)),
                             "self_attn.k_proj": select(layer.self_attn.k_proj, rows=head_rows(groups)),
                             "self_attn.v_proj": select(layer.self_attn.v_proj, rows=head_rows(groups)),
                             "self_attn.o_proj": select(layer.self_attn.o_proj, cols=head_rows(heads))}
        anatomy.swap_linears(layer, replacements)
        layer.self_attn.num_key_value_groups = keep_per_group
        if hasattr(layer.mlp, "intermediate_size") and intermediate_size is not None:
            layer.mlp.intermediate_size = intermediate_size

    config = model.config
    config.head_dim = head_dim  # no longer hidden_size / num_attention_heads
    config.num_attention_heads, config.num_key_value_heads = keep_groups * keep_per_group, keep_groups
    config.intermediate_size = intermediate if intermediate_size is None else intermediate_size
    return keep_layers(model, _top(importance.layers, len(layers) if n_layers is None else n_layers).tolist())


@restores_on_error("model")
def keep_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the decoder layers ``keep`` (strictly increasing indices), in place: depth pruning,
    and the start of a layer-subset student (:mod:`refimpl.distillation.student`). Every module with a
    ``layer_idx`` gets its new position (the KV cache is indexed by layer) and the config its new
    ``num_hidden_layers`` (and ``layer_types`` where it has them).

    Returns:
        ``model``. An error leaves it as it was (a copy of its tensors is held during the call).
    """
    layers = anatomy.decoder_layers(model)
    keep = check_layer_indices(keep, len(layers))
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


@restores_on_error("model")
def recover(model: nn.Module, blocks: torch.Tensor, config: training.TrainConfig, r: int = 8, alpha: float = 16.0,
            batch_size: int = 4) -> training.TrainLog:
    """Recovery fine-tuning (LLM-Pruner §3.3): LoRA adapters on every projection, trained on the
    next-token loss over ``blocks`` (``LongTensor [n, seq_len]``, cycled in batches of ``batch_size``)
    with :func:`refimpl.training.train`, then merged into the weights, in place. The model's
    ``requires_grad`` flags are restored; if training fails, the model is as it was (adapters gone,
    a copy of its tensors is held during the call).

    Returns:
        the training log (losses per step, seconds).
    """
    calibration.check_blocks(blocks, batch_size, model)
    with training.requires_grad_restored(model):
        lora.add_lora(model, r, alpha)
        log = training.train(model, list(blocks.split(batch_size)), training.next_token_loss, config,
                             desc="LoRA recovery")
        lora.merge_lora(model)
    return log
