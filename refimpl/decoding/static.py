r"""Greedy decoding with a fixed-shape step: a static KV cache that CUDA graphs can replay.

A decode step of :class:`~refimpl.attention.decoder.Decoder` through its cache attends over the first
``length`` slots of the :class:`~refimpl.attention.kv_cache.ModelKVCache`, a shape that grows by one
token per step, and advances ``length``, a Python int. Batch-1 decoding of a small model launches a few
hundred small kernels per token, and the time to launch them from Python can exceed the time they
run. A CUDA graph removes that cost, recording the step's kernels once and replaying them with a
single launch, but only for a step whose shapes, memory addresses and control flow are the same every
time.

gpt-fast (PyTorch, 2023, "Accelerating Generative AI with PyTorch II: GPT, Fast";
github.com/pytorch-labs/gpt-fast) makes the step static: the cache's buffers are preallocated for
``max_len`` positions (as :class:`~refimpl.attention.kv_cache.KVCache` already is), the new token's
key and value are written in place at its position :math:`p`, given as a tensor, and the query
attends over **all** ``max_len`` slots under a mask that admits the slots :math:`s \le p`,

.. math:: o_p = \mathrm{softmax}\Big(\frac{q_p K^\top}{\sqrt d} + M_p\Big) V, \qquad
          (M_p)_s = \begin{cases} 0 & s \le p \\ -\infty & s > p \end{cases},

the same output as attention over the first :math:`p + 1` slots, since masked slots get weight
zero. Nothing then changes shape or Python state from one step to the next: ``torch.compile`` traces
the step once (``fullgraph=True``) and ``mode="reduce-overhead"`` replays it as one CUDA graph.
:class:`StaticDecodeStep` is that step, :func:`greedy_static` the loop around it, and
:func:`greedy_decoder` the same greedy tokens through the decoder's own growing-shape step, the
reference it must match. :mod:`refimpl.bench.decode` times both loops, the static one eager and compiled.
"""

from __future__ import annotations

from typing import Callable

import torch

from refimpl._validation import check_positive_int
from refimpl.attention import gqa
from refimpl.attention.decoder import Decoder
from refimpl.attention.kv_cache import KVCache, ModelKVCache, apply_rope


class StaticDecodeStep(Decoder):
    """One greedy decode step of a Llama with fixed shapes, over a :class:`Decoder`'s weights and a
    :class:`ModelKVCache`'s buffers (see the module docstring).

    It is the :class:`Decoder` with one method replaced, the attention: the new token's key and value
    are written in place at ``position``, and the query attends over all ``max_len`` slots of the cache,
    masked to slots ``<= position``. The cache's ``length`` bookkeeping is not updated: use it after a
    prefill through the decoder (:func:`prefill`), then only through this step.
    """

    def __init__(self, decoder: Decoder, cache: ModelKVCache):
        if not isinstance(decoder, Decoder) or not isinstance(cache, ModelKVCache) or len(cache) != len(decoder.layers):
            raise TypeError("decoder must be a Decoder and cache a ModelKVCache with one layer per decoder layer")
        if any(layer.window is not None for layer in cache.layers):
            raise ValueError("StaticDecodeStep needs a cache without a sliding window")
        super().__init__(decoder.model, decoder.layers)
        self.cache = cache
        self.register_buffer("slots", torch.arange(cache[0].max_len, device=cache[0].k_cache.device),
                             persistent=False)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                scale: float, cache: KVCache) -> torch.Tensor:
        cache.k_cache[:, :, positions] = apply_rope(k, positions, self.inv_freq).to(cache.k_cache.dtype)
        cache.v_cache[:, :, positions] = v.to(cache.v_cache.dtype)
        scores = gqa.attention_scores(apply_rope(q, positions, self.inv_freq), cache.k_cache, scale)
        return gqa.attend(scores, cache.v_cache, self.slots[None, :] <= positions[:, None])  # [b, heads, 1, d]

    def forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The greedy next token ``[batch, 1]`` after ``token [batch, 1]`` at ``position`` (``LongTensor[1]``)."""
        return super().forward(token, self.cache, position, logits_to_keep=1).argmax(-1)


def prefill(decoder: Decoder, cache: ModelKVCache, prompt: torch.Tensor) -> torch.Tensor:
    """The greedy first token ``[batch, 1]`` after ``prompt [batch, t]``, with ``cache`` emptied and then
    filled with the prompt's keys and values through :meth:`Decoder.forward`."""
    cache.truncate(0)
    return decoder(prompt, cache, logits_to_keep=1).argmax(-1)  # [b, 1]


def greedy_decoder(decoder: Decoder, cache: ModelKVCache, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """``n_new`` greedy tokens ``[batch, n_new]`` after ``prompt`` with :meth:`Decoder.forward` and its
    cache (the cache is reset first)."""
    check_positive_int("n_new", n_new)
    token = prefill(decoder, cache, prompt)
    tokens = [token]
    for _ in range(n_new - 1):
        token = decoder(token, cache, logits_to_keep=1).argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def greedy_static(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], decoder: Decoder,
                  cache: ModelKVCache, prompt: torch.Tensor, n_new: int, cudagraphs: bool = False) -> torch.Tensor:
    """Like :func:`greedy_decoder`, with the prefill through the decoder and every later token through
    ``step`` (a :class:`StaticDecodeStep` over ``cache``, compiled or not). ``cudagraphs``: mark a new
    step for CUDA graph trees before each call and copy the output out of the graph's memory."""
    if not callable(step):
        raise TypeError(f"step must be callable (a StaticDecodeStep, compiled or not), got {type(step).__name__}")
    check_positive_int("n_new", n_new)
    if not isinstance(cache, ModelKVCache) or not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        raise TypeError("cache must be a ModelKVCache and prompt a LongTensor [batch, t]")
    if prompt.shape[1] + n_new - 1 > cache[0].max_len:  # the step writes at the positions t .. t + n_new - 2
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) and n_new ({n_new}) need {prompt.shape[1] + n_new - 1} "
                         f"cache slots; the cache holds {cache[0].max_len}")
    token = prefill(decoder, cache, prompt)
    position = torch.tensor([prompt.shape[1]], device=prompt.device)
    tokens = [token]
    for _ in range(n_new - 1):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        token = step(token, position)
        if cudagraphs:
            token = token.clone()
        position += 1
        tokens.append(token)
    return torch.cat(tokens, dim=1)
