r"""The KV cache: keys and values of past tokens kept for decoding, with sliding windows and sinks.

A decoder generates one token at a time. Causal attention lets position :math:`p` see positions
:math:`\le p` only, so the keys and values of earlier tokens never change, and recomputing them at
every step would cost :math:`O(n^2)` projections for :math:`n` tokens. The KV cache stores them once:
each step projects only the new token, appends its key and value and attends to all cached ones,

.. math:: o_p = \mathrm{softmax}\Big(\frac{q_p K_{\le p}^\top}{\sqrt d}\Big) V_{\le p},

trading compute for memory — :math:`2 \cdot \text{layers} \cdot \text{kv\_heads} \cdot d \cdot
\text{length} \cdot \text{batch}` numbers (:func:`refimpl.evaluate.kv_cache_bytes`; Pope et al. 2022,
"Efficiently Scaling Transformer Inference", arXiv:2211.05102). :class:`KVCache` is one layer's
cache in the style of gpt-fast: buffers preallocated for ``max_len`` positions, written in place by
``update(positions, k, v)``, and rolled back by ``truncate(n)`` (speculative decoding discards the
rejected tokens of the draft and of the target this way).

**Sliding-window attention** (Beltagy et al. 2020, Longformer, arXiv:2004.05150; Mistral 7B, Jiang et
al. 2023, arXiv:2310.06825, its "rolling buffer cache") lets position :math:`p` attend to the last
:math:`W` positions :math:`p-W+1, \dots, p` only. The cache then needs :math:`W` slots, reused as a
ring (position :math:`p` goes to slot :math:`p \bmod W`), and its memory no longer grows with the
length. Positions keep their values from the text, as in Mistral.

**Attention sinks** (StreamingLLM; Xiao et al. 2023, "Efficient Streaming Language Models with
Attention Sinks", arXiv:2309.17453, §3.2): window attention breaks down as soon as the first tokens
leave the window, because models put large attention weights on them whatever they say. Keeping the
first :math:`S` tokens (the sinks, 4 in the paper) next to the window restores it: position
:math:`p` attends to :math:`\{0, \dots, S-1\} \cup \{p-W+1, \dots, p\}`, with :math:`S + W` slots.
StreamingLLM numbers positions *within the cache*, not in the text: the sinks are at
:math:`0..S-1`, the window follows them, and the query is at its own slot
:math:`c_p = \min(p,\, S + W - 1)`. The paper stores keys before the rotary embedding (RoPE) and
rotates them at their cache position at every step. Since RoPE scores depend only on the difference
of the two positions, this module gets the same scores without re-rotating keys: keys are stored
*after* RoPE at their text position; a window key is at the same distance :math:`p - s` from the query
in the text as in the cache, so those scores need nothing; and the sinks' cache positions are their
text positions (they are the first tokens), so their scores use the query rotated a second time, at
:math:`c_p` (:func:`cached_attention`). The result equals the paper's rule for every query, also
within a chunk of several new tokens.

RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864, §3.2, in the rotate-half form of Hugging Face's
Llama): with :math:`\theta_i = \text{base}^{-2i/d}` for :math:`i < d/2`, a query or key :math:`x` at
position :math:`p` becomes

.. math:: R_p x = x \odot \cos(p\,\theta) + \mathrm{rotate\_half}(x) \odot \sin(p\,\theta), \qquad
          \mathrm{rotate\_half}(x) = (-x_{d/2:},\ x_{:d/2}),

with :math:`\theta` repeated over both halves, so that :math:`\langle R_p q, R_s k\rangle` depends
on :math:`p - s` only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refimpl._validation import as_device, check_non_negative_int, check_positive_int
from refimpl.anatomy import attention_shape
from refimpl.attention import gqa

# --- RoPE -----------------------------------------------------------------------------------------


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE's :math:`\\theta_i = \\text{theta}^{-2i/d}`, ``FloatTensor[head_dim / 2]``."""
    check_positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if not isinstance(theta, (int, float)) or theta <= 1:
        raise ValueError(f"theta must be a number > 1, got {theta!r}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., t, d]`` at ``positions [t]``: :math:`R_p x` of the module docstring."""
    angles = positions.to(inv_freq.device).float()[:, None] * inv_freq[None, :]  # [t, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [t, d]: the same angle for dims i and i + d/2
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


# --- one layer's cache ----------------------------------------------------------------------------


class KVCache(nn.Module):
    """One attention layer's cache: ``k_cache``/``v_cache`` ``[batch, kv_heads, slots, head_dim]``.

    Without a window there are ``max_len`` slots and position :math:`p` is stored in slot :math:`p`.
    With ``window`` :math:`W` (and ``sinks`` :math:`S`) there are :math:`\\min(\\text{max\\_len}, S+W)`
    slots: positions below :math:`S` keep their slot, later ones share the other :math:`W` slots as a
    ring. ``slot_positions [slots]`` records which position each slot holds (-1: empty).

    Args:
        batch_size, n_kv_heads, max_len, head_dim: the buffers' shape without a window; positions
            ``0 .. max_len - 1`` may be written.
        dtype, device: of the buffers.
        window: the last ``window`` positions (the query's included) are attended to; ``None`` for all.
        sinks: the first ``sinks`` positions are always attended to as well (StreamingLLM; needs a window).
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 window: int | None = None, sinks: int = 0):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("n_kv_heads", n_kv_heads), ("max_len", max_len),
                            ("head_dim", head_dim)):
            check_positive_int(name, value)
        if window is not None:
            check_positive_int("window", window)
        check_non_negative_int("sinks", sinks)
        if sinks and window is None:
            raise ValueError(f"sinks ({sinks}) need a window: without one every position is kept anyway")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        device = as_device("device", device)
        self.max_len, self.window, self.sinks = max_len, window, sinks
        n_slots = max_len if window is None else min(max_len, sinks + window)
        self.register_buffer("k_cache", torch.zeros(batch_size, n_kv_heads, n_slots, head_dim, dtype=dtype,
                                                    device=device))
        self.register_buffer("v_cache", torch.zeros_like(self.k_cache))
        self.register_buffer("slot_positions", torch.full((n_slots,), -1, dtype=torch.long, device=device))
        self.length = 0  # positions 0 .. length - 1 have been written

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value buffers (the cache proper; ``slot_positions`` is bookkeeping)."""
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache))

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return positions
        return torch.where(positions < self.sinks, positions, self.sinks + (positions - self.sinks) % self.window)

    def _check_update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point torch.Tensor")
            expected = (self.k_cache.shape[0], self.k_cache.shape[1], self.k_cache.shape[3])
            if x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3]) != expected:
                raise ValueError(f"{name} must have shape [batch={expected[0]}, kv_heads={expected[1]}, t, "
                                 f"head_dim={expected[2]}], got {tuple(x.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if not isinstance(positions, torch.Tensor) or positions.dtype != torch.long or positions.dim() != 1:
            raise TypeError("positions must be a 1-D LongTensor")
        if positions.numel() != k.shape[2] or k.shape[2] == 0:
            raise ValueError(f"positions must hold one position per new token ({k.shape[2]}), got "
                             f"{positions.numel()}")
        expected_positions = torch.arange(self.length, self.length + k.shape[2], device=positions.device)
        if not torch.equal(positions, expected_positions):
            raise ValueError(f"positions must continue the cache: {self.length}, {self.length + 1}, ... (call "
                             f"truncate() first to overwrite), got {positions.tolist()}")
        if self.length + k.shape[2] > self.max_len:
            raise ValueError(f"positions up to {self.length + k.shape[2] - 1} are past max_len {self.max_len}")

    def update(self, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the keys and values ``k, v [batch, kv_heads, t, head_dim]`` of ``positions [t]`` (which
        must continue the cache) and return what the new queries attend to.

        Returns:
            ``(keys, values, key_positions)``: ``[batch, kv_heads, l, head_dim]`` twice and ``[l]``, the
            text position of each key (-1: an empty slot). Without a window these are the first
            ``length`` slots. With a window they are the slots as they were before this call followed by
            the new tokens: a chunk longer than the window would otherwise overwrite keys that its own
            earlier queries still see. :meth:`visible` says which key each query may attend to.
        """
        self._check_update(positions, k, v)
        positions = positions.to(self.k_cache.device)
        k, v = k.to(self.k_cache.dtype), v.to(self.v_cache.dtype)
        if self.window is not None:
            return self._update_window(positions, k, v)
        self.k_cache[:, :, positions] = k  # position p in slot p
        self.v_cache[:, :, positions] = v
        self.slot_positions[positions] = positions
        self.length += len(positions)
        n = self.length
        return self.k_cache[:, :, :n], self.v_cache[:, :, :n], self.slot_positions[:n]

    def _update_window(self, positions: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`update` of a cache with a window (arguments checked and converted there)."""
        keys = torch.cat([self.k_cache, k], dim=2)  # [b, kv_heads, slots + t, d]
        values = torch.cat([self.v_cache, v], dim=2)
        key_positions = torch.cat([self.slot_positions, positions])  # [slots + t]
        # Keep the sinks and the last `window` new positions; each goes to its own slot.
        kept = (positions < self.sinks) | (positions > positions[-1] - self.window)
        slots = self._slots(positions[kept])
        self.k_cache[:, :, slots] = k[:, :, kept]
        self.v_cache[:, :, slots] = v[:, :, kept]
        self.slot_positions[slots] = positions[kept]
        self.length += len(positions)
        return keys, values, key_positions

    def visible(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """``BoolTensor[t, l]``: may the query at ``query_positions[i]`` attend to the key at
        ``key_positions[j]``? Causal, within the window or a sink, and not an empty slot."""
        query = query_positions.to(key_positions.device)[:, None]  # [t, 1]
        key = key_positions[None, :]  # [1, l]
        mask = (key >= 0) & (key <= query)
        if self.window is not None:
            mask &= (key > query - self.window) | (key < self.sinks)
        return mask

    def cache_positions(self, query_positions: torch.Tensor) -> torch.Tensor:
        """StreamingLLM's position of each query within the cache, :math:`c_p = \\min(p, S + W - 1)`
        (only the text position :math:`p` without a window)."""
        if self.window is None:
            return query_positions
        return query_positions.clamp(max=self.sinks + self.window - 1)

    def truncate(self, n: int) -> None:
        """Roll back to the first ``n`` positions (``0 <= n <= length``): later ones are forgotten, and
        the next :meth:`update` writes position ``n``.

        A window cache can only roll back while the keys the next query needs are still held: a
        ring of :math:`W` slots has overwritten position :math:`p - W` when it stored :math:`p`, so one
        position can always be rolled back and more only before the window is full.
        """
        check_non_negative_int("n", n)
        if n > self.length:
            raise ValueError(f"n must be at most the cache length {self.length}, got {n}")
        kept = self.slot_positions[(self.slot_positions >= 0) & (self.slot_positions < n)]
        if self.window is not None:
            needed = [p for p in range(n) if p < self.sinks or p > n - self.window]
            missing = sorted(set(needed) - set(kept.tolist()))
            if missing:
                raise ValueError(f"n={n}: the window has already overwritten position(s) {missing[:5]} that "
                                 f"position {n} attends to; a window cache rolls back at most what it still holds")
        self.slot_positions[self.slot_positions >= n] = -1
        self.length = n


class ModelKVCache(nn.Module):
    """The caches of all layers of a decoder (``cache[i]`` is layer ``i``'s :class:`KVCache`)."""

    def __init__(self, layers: list[KVCache]):
        super().__init__()
        if not layers or not all(isinstance(layer, KVCache) for layer in layers):
            raise TypeError("layers must be a non-empty list of KVCache")
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_config(cls, config: Any, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", window: int | None = None, sinks: int = 0,
                    n_layers: int | None = None) -> ModelKVCache:
        """Empty caches for every layer of the decoder a Hugging Face ``config`` describes (or for
        ``n_layers`` of them: a decoder that runs only some layers)."""
        shape = attention_shape(config)
        if n_layers is not None:
            check_positive_int("n_layers", n_layers)
        return cls([KVCache(batch_size, shape.n_kv_heads, max_len, shape.head_dim, dtype, device, window, sinks)
                    for _ in range(shape.n_layers if n_layers is None else n_layers)])

    def __getitem__(self, index: int) -> KVCache:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        """Positions written so far (the same in every layer after a full forward)."""
        return self.layers[0].length

    @property
    def nbytes(self) -> int:
        """Bytes of all key and value buffers."""
        return sum(layer.nbytes for layer in self.layers)

    def truncate(self, n: int) -> None:
        """:meth:`KVCache.truncate` every layer (all hold the same positions, so the first layer's
        checks fail before any layer changes)."""
        for layer in self.layers:
            layer.truncate(n)


# --- attention with the cache ---------------------------------------------------------------------


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     inv_freq: torch.Tensor, scale: float | None = None,
                     cache: KVCache | None = None) -> torch.Tensor:
    """Causal grouped-query attention of new tokens, through ``cache`` if given.

    Args:
        q: ``[batch, heads, t, d]`` and k, v: ``[batch, kv_heads, t, d]`` of the new tokens, ``q`` and
            ``k`` before RoPE.
        positions: ``LongTensor[t]``, the text positions of the new tokens.
        inv_freq: RoPE frequencies (:func:`rope_frequencies`).
        scale: defaults to :math:`1/\\sqrt{d}`.
        cache: this layer's :class:`KVCache`; ``None`` attends within the new tokens only.

    Returns:
        ``[batch, heads, t, d]``.
    """
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.long or positions.shape != q.shape[2:3]:
        raise ValueError(f"positions must be a LongTensor of shape [t={q.shape[2]}] (one per new query)")
    q_rot, k_rot = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cache is None:
        keys, values, key_positions = k_rot, v, positions
        mask = key_positions[None, :] <= positions[:, None]  # [t, t], causal
    else:
        keys, values, key_positions = cache.update(positions, k_rot, v)
        mask = cache.visible(positions, key_positions)  # [t, l]
    scores = gqa.attention_scores(q_rot, keys, scale)  # [b, heads, t, l]
    if cache is not None and cache.sinks:
        # StreamingLLM positions: a sink at cache position s (= its text position) is seen from the
        # query's cache position c_p, not from p (see the module docstring).
        q_in_cache = apply_rope(q, cache.cache_positions(positions), inv_freq)
        scores = torch.where(key_positions < cache.sinks, gqa.attention_scores(q_in_cache, keys, scale), scores)
    return gqa.attend(scores, values, mask)
