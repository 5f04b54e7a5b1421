r"""Grouped-query attention (GQA): query heads share fewer key/value heads.

Multi-head attention (MHA; Vaswani et al. 2017, arXiv:1706.03762, §3.2.2) gives each of the :math:`H`
query heads its own key and value head, so the KV cache holds :math:`2 H d` numbers per token and
layer and decoding reads all of them at every step. Multi-query attention (MQA; Shazeer 2019,
arXiv:1911.02150) keeps a single key/value head. Grouped-query attention (Ainslie et al. 2023, "GQA:
Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", arXiv:2305.13245,
§2.2) sits between them: the :math:`H` query heads form :math:`G` groups of :math:`H/G` consecutive
heads, and head :math:`h` attends with the key and value head of its group,

.. math:: \mathrm{head}_h = \mathrm{softmax}\Big(\frac{Q_h K_{g(h)}^\top}{\sqrt{d}}\Big) V_{g(h)},
          \qquad g(h) = \lfloor h\, G / H \rfloor,

so GQA-1 is MQA and GQA-:math:`H` is MHA. The cache shrinks by :math:`H/G` to :math:`2 G d` numbers
per token and layer (:func:`refimpl.evaluate.kv_cache_bytes`). SmolLM2-135M has :math:`H = 9`,
:math:`G = 3`.

**Uptraining** (§2.1): a multi-head checkpoint becomes a grouped one by mean-pooling the key and value
projection heads within each group, then training briefly (5% of the pre-training compute in the
paper). :func:`convert_kv_heads` does the pooling and :func:`uptrain` the training, of the key and value
projections only (:func:`uptraining_recipe`: the book's budget). The pooling also starts from a grouped
model: SmolLM2's 3 KV heads pool to 1 (MQA); a 9-head MHA version of it (:func:`expand_kv_heads`)
pools to 3 or 1. :func:`expand_kv_heads` goes the other way exactly: copying each key/value head for
every query head of its group changes nothing but the size of the cache.

The attention core here (:func:`attention_scores`, :func:`attend`, :func:`attention`) computes GQA
without copying key/value heads: the query heads are viewed as ``[kv_heads, group]`` and broadcast
against their shared head. The decoder with an explicit cache (:mod:`refimpl.attention.kv_cache`) and
paged attention (:mod:`refimpl.attention.paged`) use it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from refimpl import data, training
from refimpl._rollback import restores_on_error
from refimpl._validation import check_positive_int
from refimpl.anatomy import attention_shape, linear_from_weight
from refimpl.training import TrainConfig, TrainLog

# --- the attention core ---------------------------------------------------------------------------


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [batch, heads, seq, head_dim], got {tuple(x.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have the same batch, heads and length, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same batch size and head_dim, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[1]})")


def repeat_kv_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``x [batch, kv_heads, seq, d]`` with every head repeated ``n_rep`` times in place,
    ``[batch, kv_heads * n_rep, seq, d]``: head :math:`g` becomes heads :math:`g\\,n_{rep}, \\dots,
    (g+1)\\,n_{rep} - 1`, the query heads of its group (MHA with the GQA weights)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor of shape [batch, kv_heads, seq, head_dim], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_positive_int("n_rep", n_rep)
    return x.repeat_interleave(n_rep, dim=1)


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Scaled dot products :math:`Q_h K_{g(h)}^\\top \\cdot s` of every query head with the key head of
    its group, ``q [batch, heads, t, d]``, ``k [batch, kv_heads, l, d]`` -> ``[batch, heads, t, l]``;
    ``scale`` :math:`s` defaults to :math:`1/\\sqrt{d}`."""
    _check_heads(q, k, k)
    b, n_heads, t, d = q.shape
    n_kv_heads, length = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q.reshape(b, n_kv_heads, n_heads // n_kv_heads, t, d)  # query heads grouped by their KV head
    scores = q @ k.unsqueeze(2).transpose(-1, -2)  # [b, kv_heads, group, t, l], K broadcast over the group
    return scores.reshape(b, n_heads, t, length) * scale


def attend(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the keys of ``scores [batch, heads, t, l]`` where ``mask`` (bool, broadcastable to
    the scores; ``True`` = may attend) allows, then the weighted sum of the values of each head's group,
    ``v [batch, kv_heads, l, d]`` -> ``[batch, heads, t, d]``. The softmax runs in float32."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError("scores must be a tensor of shape [batch, heads, t, l]")
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.shape[2] != scores.shape[3] \
            or scores.shape[1] % v.shape[1]:
        raise ValueError(f"v must have shape [batch, kv_heads, l={scores.shape[3]}, d] with kv_heads dividing the "
                         f"{scores.shape[1]} heads of the scores")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        scores = scores.masked_fill(~mask, float("-inf"))
    b, n_heads, t, length = scores.shape
    n_kv_heads = v.shape[1]
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # [b, heads, t, l]
    out = weights.reshape(b, n_kv_heads, n_heads // n_kv_heads, t, length) @ v.unsqueeze(2)  # [b, kv, group, t, d]
    return out.reshape(b, n_heads, t, v.shape[-1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Grouped-query attention, ``softmax(Q K^T s + mask) V`` per head with its group's key/value head.

    Args:
        q: ``[batch, heads, t, d]``.
        k, v: ``[batch, kv_heads, l, d]``, ``kv_heads`` dividing ``heads`` (MHA: equal; MQA: 1).
        mask: bool, broadcastable to ``[batch, heads, t, l]``, ``True`` where a query may attend a key;
            ``None`` lets every query see every key.
        scale: defaults to :math:`1/\\sqrt{d}`.

    Returns:
        ``[batch, heads, t, d]``.
    """
    _check_heads(q, k, v)
    return attend(attention_scores(q, k, scale), v, mask)


# --- converting a Hugging Face Llama model -------------------------------------------------------


def _attention_modules(model: Any) -> list[nn.Module]:
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if config is None or layers is None or not all(
            hasattr(getattr(layer, "self_attn", None), "k_proj") for layer in layers):
        raise TypeError(f"model must be a Hugging Face Llama-style causal LM (model.model.layers[i].self_attn "
                        f"with k_proj/v_proj), got {type(model).__name__}")
    return [layer.self_attn for layer in layers]


def _regroup_kv_heads(model: Any, n_kv_heads: int,
                      regroup: Callable[[torch.Tensor, int], torch.Tensor]) -> Any:
    """Replace every layer's ``k_proj``/``v_proj`` by ``regroup`` of its per-head output rows
    ``[old_kv_heads, head_dim, ...]`` -> ``[n_kv_heads, head_dim, ...]`` and update the config and the
    attention modules' ``num_key_value_groups`` (what Hugging Face's attention functions read)."""
    modules = _attention_modules(model)
    shape = attention_shape(model.config)
    for attn in modules:
        for name in ("k_proj", "v_proj"):
            linear = getattr(attn, name)
            weight = linear.weight.detach().view(shape.n_kv_heads, shape.head_dim, -1)  # [old_kv, d, hidden]
            weight = regroup(weight, n_kv_heads).reshape(n_kv_heads * shape.head_dim, -1)  # [new_kv * d, hidden]
            bias = None
            if linear.bias is not None:
                bias = regroup(linear.bias.detach().view(shape.n_kv_heads, shape.head_dim), n_kv_heads).reshape(-1)
            setattr(attn, name, linear_from_weight(weight, bias).train(linear.training))
        attn.num_key_value_groups = shape.n_heads // n_kv_heads
        if hasattr(attn, "num_key_value_heads"):  # older transformers versions keep it on the module
            attn.num_key_value_heads = n_kv_heads
    model.config.num_key_value_heads = n_kv_heads
    return model


def mean_pool_heads(heads: torch.Tensor, n_groups: int) -> torch.Tensor:
    """GQA §2.1: the mean of each group of consecutive heads, ``[n_heads, ...]`` -> ``[n_groups, ...]``
    (group :math:`g` = heads :math:`g\\,n/G, \\dots, (g+1)\\,n/G - 1`)."""
    check_positive_int("n_groups", n_groups)
    if heads.shape[0] % n_groups:
        raise ValueError(f"n_groups ({n_groups}) must divide the number of heads ({heads.shape[0]})")
    return heads.view(n_groups, heads.shape[0] // n_groups, *heads.shape[1:]).mean(dim=1)


@torch.no_grad()
@restores_on_error("model")
def convert_kv_heads(model: Any, n_kv_heads: int) -> Any:
    """Mean-pool the key and value heads of a Hugging Face Llama model to ``n_kv_heads`` (GQA §2.1).

    Modifies ``model`` in place and returns it: every layer's ``k_proj`` and ``v_proj`` get
    ``n_kv_heads * head_dim`` output rows, each new head the mean of the consecutive old heads it
    replaces, and ``config.num_key_value_heads`` and each attention module's ``num_key_value_groups``
    are updated so the model's own forward (and its cache) work as before. The query and output
    projections are unchanged. ``n_kv_heads`` must divide the current number of key/value heads:
    SmolLM2 (3) can go to 1 (MQA); a 9-head MHA model to 3 or 1. The same number is the identity.
    Without uptraining the pooled model is worse; the paper recovers quality with brief training.
    An error leaves the model as it was (a copy of its tensors is held during the call).
    """
    check_positive_int("n_kv_heads", n_kv_heads)
    _attention_modules(model)
    current = attention_shape(model.config).n_kv_heads
    if current % n_kv_heads:
        raise ValueError(f"n_kv_heads must divide the current number of key/value heads ({current}): mean "
                         f"pooling merges whole groups of heads, got {n_kv_heads}")
    return _regroup_kv_heads(model, n_kv_heads, mean_pool_heads)


@torch.no_grad()
@restores_on_error("model")
def expand_kv_heads(model: Any, n_kv_heads: int) -> Any:
    """Repeat each key/value head of a Hugging Face Llama model so it has ``n_kv_heads`` of them;
    ``n_kv_heads = num_attention_heads`` gives the equivalent MHA model.

    Modifies ``model`` in place and returns it. Every query head keeps attending with an exact copy of
    the key/value head it used before, so the outputs do not change; only the cache grows (by
    ``n_kv_heads / current``). ``n_kv_heads`` must be a multiple of the current number of key/value
    heads and divide the number of query heads. An error leaves the model as it was (a copy of its
    tensors is held during the call).
    """
    check_positive_int("n_kv_heads", n_kv_heads)
    _attention_modules(model)
    shape = attention_shape(model.config)
    if n_kv_heads % shape.n_kv_heads or shape.n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads must be a multiple of the current number of key/value heads "
                         f"({shape.n_kv_heads}) and divide the number of query heads ({shape.n_heads}), got "
                         f"{n_kv_heads}")
    return _regroup_kv_heads(model, n_kv_heads,
                             lambda heads, n: heads.repeat_interleave(n // heads.shape[0], dim=0))


# --- uptraining -----------------------------------------------------------------------------------

#: The parameters uptraining trains: the key and value projections, the weights the pooling changed.
UPTRAINED = ("k_proj.weight", "v_proj.weight")
#: The book's uptraining schedule (:func:`uptraining_recipe`).
UPTRAINING = TrainConfig(steps=64, lr=3e-3, warmup_steps=4)


@restores_on_error("model")
def uptrain(model: nn.Module, batches: Sequence[torch.Tensor], config: TrainConfig) -> TrainLog:
    """Uptraining (§2.1): continue training a converted model's key and value projections
    (:data:`UPTRAINED`) with the language-modelling loss on ``batches`` of token ids ``[b, seq_len]``;
    every other parameter stays frozen, and each parameter's ``requires_grad`` flag is what it was
    afterwards. Trains ``model`` in place (:func:`refimpl.training.train`) and returns the training log;
    an error leaves the model as it was (a copy of its tensors is held during the call)."""
    with training.requires_grad_restored(model):
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith(UPTRAINED))
        return training.train(model, batches, training.next_token_loss, config, desc="uptraining")


def uptraining_recipe(tokenizer: Any) -> tuple[TrainConfig, list[torch.Tensor]]:
    """The book's uptraining of SmolLM2's MQA version (chapter 07, and the effects table's ``mqa`` row):
    :data:`UPTRAINING` (AdamW at a learning rate of 3e-3 after 4 warm-up steps, cosine decay, 64 steps),
    each step on 2 sequences of 128 tokens of the calibration split of both corpora (64 blocks per
    corpus, shuffled with seed 0; disjoint from the evaluation text). The budget is far below the
    paper's 5 % of pre-training. A rate of 1e-3 left the perplexity in the thousands after the same
    64 steps; at 3e-3 the result still depends on the CPU's last bits, by about a sixth (the
    ``long-training`` kind of :mod:`refimpl.reproducibility`), where 16 steps moved it fourfold.

    Returns:
        ``(config, batches)``, ``batches`` a list of 64 ``LongTensor [2, 128]``.
    """
    text = torch.cat([data.token_blocks(tokenizer, data.load_text(name, "calibration"), seq_len=128, n_blocks=64)
                      for name in data.CORPORA])  # [128, 128]
    text = text[torch.randperm(len(text), generator=torch.Generator().manual_seed(0))]
    return UPTRAINING, list(text.split(2))
