r"""A readable Llama decoder forward over a Hugging Face model's own weights, with an explicit KV cache.

The Llama block (Touvron et al. 2023, arXiv:2302.13971, §2.2; SmolLM2 is one) is a pre-norm
transformer layer with RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), rotary position
embeddings on queries and keys (:func:`refimpl.attention.kv_cache.apply_rope`), grouped-query
attention (:mod:`refimpl.attention.gqa`) and a SiLU-gated MLP (SwiGLU; Shazeer 2020,
arXiv:2002.05202):

.. math::
    \mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac{1}{n}\sum_i x_i^2 + \epsilon}} \odot \gamma, \qquad
    h = x + W_O\,\mathrm{Attn}\big(\mathrm{RMSNorm}(x)\big), \qquad
    y = h + W_\text{down}\big(\mathrm{SiLU}(W_\text{gate}\, u) \odot W_\text{up}\, u\big),\ u = \mathrm{RMSNorm}(h).

After the last layer a final RMSNorm and the output projection (tied to the embedding in SmolLM2)
give the logits. :class:`Decoder` writes this out, reads every weight from the Hugging Face
``LlamaForCausalLM`` it wraps (nothing is copied), and keeps keys and values in a
:class:`refimpl.attention.kv_cache.ModelKVCache`, so a chapter can show each step: prefill a prompt,
then decode one token at a time against the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._validation import check_layer_indices, check_non_negative_int, check_token_ids
from refimpl.anatomy import attention_shape
from refimpl.attention.kv_cache import KVCache, ModelKVCache, cached_attention, rope_frequencies


def rope_theta(config: Any) -> float:
    """The RoPE base of a Hugging Face config; raises ``ValueError`` for scaled RoPE variants
    (``rope_scaling`` / ``rope_parameters`` with a ``rope_type`` other than ``"default"``)."""
    # transformers >= 5 keeps rope_theta inside rope_parameters (rope_scaling is an alias of it);
    # earlier versions have config.rope_theta and rope_scaling=None for plain RoPE.
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.rope_scaling must be None (plain RoPE); rope_type {rope_type!r} is not "
                         f"implemented here")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:math:`x / \\sqrt{\\mathrm{mean}(x^2) + \\epsilon} \\odot \\gamma` over the last dim, in float32."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Decoder(nn.Module):
    """A Llama forward pass written out, over the weights of a Hugging Face ``LlamaForCausalLM``.

    Build it with :meth:`from_hf`; the model stays a submodule, so its parameters are shared, not
    copied. Call it as ``decoder(input_ids, cache, positions)``: :meth:`forward` is :meth:`embed`, one
    :meth:`block` per layer run and :meth:`head`, steps that a caller may also run one at a time
    (:class:`refimpl.decoding.early_exit.LayerwiseDecoder` exits between them).

    ``layers`` runs only some of the model's decoder layers, in order, then the final norm and the
    output head: ``range(k)`` is the early exit of self-speculative decoding (LayerSkip, Elhoushi et
    al. 2024, arXiv:2404.16710), other subsets skip whole layers; Draft & Verify (Zhang et al. 2023,
    arXiv:2309.08168) skips attention and MLP sublayers separately
    (:class:`refimpl.decoding.layer_skip.LayerSkipDecoder`). Its caches hold one layer per layer run.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None):
        super().__init__()
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "llama" or not hasattr(model, "lm_head"):
            raise TypeError(f"model must be a Hugging Face LlamaForCausalLM, got {type(model).__name__}")
        if config.hidden_act != "silu":
            raise ValueError(f"config.hidden_act must be 'silu' (Llama's gated MLP), got {config.hidden_act!r}")
        self.model = model
        self.layers = check_layer_indices(range(config.num_hidden_layers) if layers is None else layers,
                                          config.num_hidden_layers, "layers")
        head_dim = attention_shape(config).head_dim
        self.register_buffer("inv_freq", rope_frequencies(head_dim, rope_theta(config)).to(model.device),
                             persistent=False)

    @classmethod
    def from_hf(cls, model: nn.Module, layers: Sequence[int] | None = None) -> Decoder:
        """The decoder over ``model``'s weights (``model`` is not modified), running ``layers`` (all by
        default)."""
        return cls(model, layers)

    @property
    def vocab_size(self) -> int:
        """The number of token ids the model knows (its config's ``vocab_size``)."""
        return self.model.config.vocab_size

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, window: int | None = None,
                  sinks: int = 0) -> ModelKVCache:
        """An empty cache for every layer run, on the model's device, in ``dtype`` (default: the model's)."""
        return ModelKVCache.from_config(self.model.config, batch_size, max_len, dtype or self.model.dtype,
                                        self.model.device, window, sinks, n_layers=len(self.layers))

    def attention(self, attn: nn.Module, x: torch.Tensor, positions: torch.Tensor,
                  cache: KVCache | None) -> torch.Tensor:
        """One layer's attention, :math:`W_O\\,\\mathrm{Attn}(\\cdot)` of the module docstring, on the normed
        hidden states ``x [batch, t, hidden]`` of the new tokens at ``positions [t]``: ``attn`` (the layer's
        ``self_attn``) projects them to query, key and value heads, these attend through the layer's
        ``cache`` (:func:`~refimpl.attention.kv_cache.cached_attention`, unless a subclass replaces
        ``_attend``), and the heads are joined and projected back to ``[batch, t, hidden]``."""
        hidden = self.model.config.hidden_size
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != hidden:
            raise ValueError(f"x must be a tensor [batch, t, hidden={hidden}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        shape = attention_shape(self.model.config)  # read each time: gqa.convert_kv_heads may change it
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, shape.n_heads, shape.head_dim).transpose(1, 2)  # [b, heads, t, d]
        k = attn.k_proj(x).view(b, t, shape.n_kv_heads, shape.head_dim).transpose(1, 2)  # [b, kv_heads, t, d]
        v = attn.v_proj(x).view(b, t, shape.n_kv_heads, shape.head_dim).transpose(1, 2)
        out = self._attend(q, k, v, positions, attn.scaling, cache)  # [b, heads, t, d]
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, shape.n_heads * shape.head_dim))  # [b, t, hidden]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float,
                cache: KVCache | None) -> torch.Tensor:
        """Attention of the projected new tokens through this layer's cache (a subclass may replace it,
        e.g. with a fixed-shape version for CUDA graphs)."""
        return cached_attention(q, k, v, positions, self.inv_freq, scale, cache)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first step of :meth:`forward`: the token embeddings ``[batch, t, hidden]`` of
        ``input_ids [batch, t]``, the input :math:`x` of the first layer run (the ids are not checked here)."""
        return self.model.model.embed_tokens(input_ids)

    def block(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """The ``i``-th layer run (the model's layer ``self.layers[i]``), :math:`x \\mapsto y` of the module
        docstring, on the hidden states ``h [batch, t, hidden]`` of the new tokens at ``positions [t]``:
        attention through that layer's ``cache`` (``None``: causal among the new tokens), then the gated
        MLP, each on the RMSNorm of its input and added to it (:meth:`attention_sublayer`, then
        :meth:`mlp_sublayer`)."""
        return self.mlp_sublayer(i, self.attention_sublayer(i, h, positions, cache))  # [b, t, hidden]

    def attention_sublayer(self, i: int, h: torch.Tensor, positions: torch.Tensor,
                           cache: KVCache | None) -> torch.Tensor:
        """The first half of :meth:`block` ``i``: :math:`h = x + W_O\\,\\mathrm{Attn}(\\mathrm{RMSNorm}(x))`
        on ``h [batch, t, hidden]`` (a draft that skips this sublayer passes the residual through)."""
        layer, eps = self.model.model.layers[self.layers[i]], self.model.config.rms_norm_eps
        return h + self.attention(layer.self_attn, rms_norm(h, layer.input_layernorm.weight, eps), positions, cache)

    def mlp_sublayer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """The second half of :meth:`block` ``i``: :math:`y = h + W_\\text{down}(\\mathrm{SiLU}(W_\\text{gate}
        u) \\odot W_\\text{up} u)`, :math:`u = \\mathrm{RMSNorm}(h)`, on ``h [batch, t, hidden]``."""
        layer, eps = self.model.model.layers[self.layers[i]], self.model.config.rms_norm_eps
        u = rms_norm(h, layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        return h + mlp.down_proj(F.silu(mlp.gate_proj(u)) * mlp.up_proj(u))  # [b, t, hidden]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The last step of :meth:`forward`: logits ``[batch, t, vocab]`` of the hidden states
        ``h [batch, t, hidden]`` through the final RMSNorm and the output projection."""
        return self.model.lm_head(rms_norm(h, self.model.model.norm.weight, self.model.config.rms_norm_eps))

    def forward(self, input_ids: torch.Tensor, cache: ModelKVCache | None = None,
                positions: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits ``[batch, t, vocab]`` of ``input_ids [batch, t]``.

        Args:
            input_ids: the new tokens.
            cache: from :meth:`new_cache`; the new tokens attend to the cached ones and are appended.
                ``None``: the tokens attend causally among themselves only.
            positions: ``LongTensor[t]``, the text positions of the new tokens (the same for every
                sequence of the batch); default ``cache.length, cache.length + 1, ...`` (or ``0..t-1``).
            logits_to_keep: ``0`` for the logits of every position; ``k > 0`` for those of the last
                ``k`` positions only, ``[batch, min(k, t), vocab]`` (generation needs the last one, and
                the output projection of the others is wasted work).
        """
        if not torch.compiler.is_compiling():  # reads the ids: under torch.compile it would break the graph
            check_token_ids("input_ids", input_ids, self.vocab_size)
        if cache is not None and (not isinstance(cache, ModelKVCache) or len(cache) != len(self.layers)):
            raise TypeError(f"cache must be a ModelKVCache with {len(self.layers)} layers (new_cache())")
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        elif not isinstance(positions, torch.Tensor) or positions.shape != (input_ids.shape[1],) \
                or positions.dtype != torch.long:
            raise ValueError(f"positions must be a LongTensor of shape [t={input_ids.shape[1]}]")
        check_non_negative_int("logits_to_keep", logits_to_keep)
        h = self.embed(input_ids)  # [b, t, hidden]
        for i in range(len(self.layers)):
            h = self.block(i, h, positions, cache[i] if cache is not None else None)  # [b, t, hidden]
        if logits_to_keep:
            h = h[:, -logits_to_keep:]  # [b, min(k, t), hidden]
        return self.head(h)  # [b, t or k, vocab]
