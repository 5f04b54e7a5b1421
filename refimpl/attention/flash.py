r"""FlashAttention: exact attention in tiles, without writing the attention matrix to memory.

Standard attention (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness", arXiv:2205.14135, Algorithm 0) computes :math:`S = QK^\top`, :math:`P =
\mathrm{softmax}(S)` and :math:`O = PV` as three passes over GPU main memory (HBM) and reads and
writes the :math:`N \times N` matrices :math:`S` and :math:`P`. FlashAttention loads blocks of
:math:`Q`, :math:`K`, :math:`V` into fast on-chip memory (SRAM, :math:`M` elements), computes the
scores of one block pair there, and never stores :math:`S` or :math:`P`. The softmax is assembled
block by block with the *online softmax* (§3.1; Milakov & Gimelshein 2018, arXiv:1805.02867): for a
query row with running maximum :math:`m`, running sum :math:`\ell` and unnormalized output
:math:`\tilde O`, a new block of scores :math:`S_{ij}` updates

.. math::
    m^\text{new} = \max\big(m,\ \mathrm{rowmax}(S_{ij})\big), \qquad
    \tilde P_{ij} = e^{S_{ij} - m^\text{new}}, \\
    \ell^\text{new} = e^{m - m^\text{new}}\,\ell + \mathrm{rowsum}(\tilde P_{ij}), \qquad
    \tilde O^\text{new} = e^{m - m^\text{new}}\,\tilde O + \tilde P_{ij} V_j,

and :math:`O = \tilde O / \ell` after the last block — the exact softmax, because rescaling by
:math:`e^{m - m^\text{new}}` puts every earlier block on the new maximum. The loop order is
FlashAttention-2's (Dao 2023, arXiv:2307.08691, Algorithm 1): query blocks outside, key/value blocks
inside, so each output block is written once, and the division by :math:`\ell` happens once at the
end. With a causal mask, key blocks entirely above the diagonal are skipped (FlashAttention-2 §3.1),
about half of them.

**IO complexity** (Theorem 2): standard attention makes :math:`\Theta(Nd + N^2)` HBM accesses,
FlashAttention :math:`\Theta(N^2 d^2 / M)`, because with blocks of :math:`B_c = \lceil M/4d \rceil`
keys and :math:`B_r = \min(B_c, d)` queries (Algorithm 1, line 1) each of the :math:`N / B_r` query
blocks reads all :math:`2Nd` keys and values. :func:`flash_attention_io` counts the element reads
and writes of the loop below as it runs them (the same block iteration), :func:`standard_attention_io`
those of Algorithm 0. Counted this way flash makes about :math:`2N^2 d / B_r` accesses against
standard attention's :math:`4N^2`: fewer once :math:`B_r > d/2`, and every further elementwise pass
that an implementation makes over the :math:`N \times N` matrix (mask, dropout) adds :math:`2N^2` to
the standard count only.

**Memory.** :func:`peak_tensor_bytes` measures what the claim is about, deterministically: the largest
number of bytes held at one time by the tensors a call creates. Standard attention holds the
:math:`N \times N` scores (quadratic in :math:`N`); the tiled forward holds the output and one tile's
working set (linear).

:func:`use_flash_attention` makes a Hugging Face model run this function as its attention, so
perplexity can be checked unchanged. This is a PyTorch transcription of the algorithm for reading
and testing; its speed on a CPU says nothing about the fused GPU kernel.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from refimpl._validation import check_positive_int
from refimpl.models import attention_implementation

# --- the tiled forward ----------------------------------------------------------------------------


def _key_block_starts(q_end: int, n_q: int, n_k: int, block_k: int, causal: bool) -> range:
    """Starts of the key blocks that the query block ending at ``q_end`` (exclusive) visits. Causal
    queries are aligned to the end of the keys (query ``i`` at key position ``i + n_k - n_q``, as in
    decoding with a cache), so blocks past the last query's position are skipped."""
    last_key = min(n_k, q_end + n_k - n_q) if causal else n_k  # exclusive
    return range(0, last_key, block_k)


def _check_flash_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, block_q: int,
                      block_k: int) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if x.dim() != 4 or 0 in x.shape:
            raise ValueError(f"{name} must have a non-empty shape [batch, heads, seq, head_dim], got {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim, and the "
                         f"key/value heads must divide the query heads")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs at least as many keys as queries (queries are aligned to the "
                         f"last keys), got {q.shape[2]} queries and {k.shape[2]} keys")
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, block_q: int = 64, block_k: int = 64) -> torch.Tensor:
    """Exact attention computed in ``block_q x block_k`` tiles with the online softmax.

    Args:
        q: ``[batch, heads, n_q, d]``.
        k, v: ``[batch, kv_heads, n_k, d]``; ``kv_heads`` dividing ``heads`` (grouped-query attention:
            query head ``h`` uses key/value head ``h // (heads / kv_heads)``).
        causal: query ``i`` sees keys ``<= i + n_k - n_q`` (aligned to the last key, so it equals
            ``scaled_dot_product_attention(..., is_causal=True)`` when ``n_q == n_k`` and is the decoding
            rule when queries are the newest tokens); needs ``n_q <= n_k``.
        scale: defaults to :math:`1/\\sqrt{d}`.
        block_q, block_k: queries and keys per tile (:math:`B_r`, :math:`B_c`); lengths need not be multiples.

    Returns:
        ``[batch, heads, n_q, d]`` in ``q``'s dtype; tiles are computed in float32.
    """
    _check_flash_args(q, k, v, causal, block_q, block_k)
    b, n_heads, n_q, d = q.shape
    n_kv_heads, n_k = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    offset = n_k - n_q  # query i sits at key position i + offset
    q = q.reshape(b, n_kv_heads, n_heads // n_kv_heads, n_q, d)  # query heads grouped by their KV head
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # [b, kv_heads, 1, n_k, d]: broadcast over the group
    out = torch.empty_like(q)
    for i0 in range(0, n_q, block_q):  # outer loop: one block of queries at a time
        i1 = min(i0 + block_q, n_q)
        q_i = q[..., i0:i1, :].float()  # load Q_i: [b, kv, group, B_r, d]
        m_i = torch.full_like(q_i[..., :1], float("-inf"))  # running row maximum m
        l_i = torch.zeros_like(m_i)  # running row sum ℓ
        o_i = torch.zeros_like(q_i)  # unnormalized output Õ
        for j0 in _key_block_starts(i1, n_q, n_k, block_k, causal):  # inner loop over key/value blocks
            j1 = min(j0 + block_k, n_k)
            k_j, v_j = k[..., j0:j1, :].float(), v[..., j0:j1, :].float()  # load K_j, V_j: [b, kv, 1, B_c, d]
            s_ij = (q_i @ k_j.transpose(-1, -2)) * scale  # [b, kv, group, B_r, B_c]
            if causal and j1 - 1 > i0 + offset:  # the block reaches above the diagonal: mask it there
                query_pos = torch.arange(i0, i1, device=q.device)[:, None] + offset
                key_pos = torch.arange(j0, j1, device=q.device)[None, :]
                s_ij = s_ij.masked_fill(key_pos > query_pos, float("-inf"))
            m_new = torch.maximum(m_i, s_ij.amax(dim=-1, keepdim=True))
            p_ij = torch.exp(s_ij - m_new)  # P̃_ij
            rescale = torch.exp(m_i - m_new)  # e^{m - m_new}: earlier blocks onto the new maximum
            l_i = rescale * l_i + p_ij.sum(dim=-1, keepdim=True)
            o_i = rescale * o_i + p_ij @ v_j
            m_i = m_new
        out[..., i0:i1, :] = (o_i / l_i).to(out.dtype)  # write O_i once
    return out.reshape(b, n_heads, n_q, d)


# --- counting HBM accesses (Theorem 2) --------------------------------------------------------------


@dataclass(frozen=True)
class IOCount:
    """Elements read from and written to HBM by one head's attention."""

    reads: int
    writes: int

    @property
    def total(self) -> int:
        return self.reads + self.writes


def standard_attention_io(n: int, d: int) -> IOCount:
    """HBM accesses of standard attention (Algorithm 0) for ``n`` tokens of dimension ``d``: read
    :math:`Q, K` and write :math:`S`; read :math:`S`, write :math:`P`; read :math:`P, V` and write
    :math:`O` — :math:`3Nd + 2N^2` reads, :math:`2N^2 + Nd` writes, :math:`\\Theta(Nd + N^2)`. A mask
    does not change it: the full matrices are written either way."""
    check_positive_int("n", n)
    check_positive_int("d", d)
    return IOCount(reads=2 * n * d + n * n + (n * n + n * d), writes=n * n + n * n + n * d)


def flash_attention_io(n: int, d: int, block_q: int, block_k: int, causal: bool = False) -> IOCount:
    """HBM accesses of :func:`flash_attention` for ``n`` queries and keys of dimension ``d``, counted
    over the same loop: each query block reads :math:`Q_i` once, reads :math:`K_j, V_j` of every key
    block it visits, and writes :math:`O_i` once. Without a mask :math:`Nd + 2Nd\\lceil N/B_r\\rceil`
    reads and :math:`Nd` writes; with blocks from :func:`sram_block_sizes`, :math:`\\Theta(N^2d^2/M)`."""
    check_positive_int("n", n)
    check_positive_int("d", d)
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    reads = writes = 0
    for i0 in range(0, n, block_q):
        i1 = min(i0 + block_q, n)
        reads += (i1 - i0) * d  # Q_i
        for j0 in _key_block_starts(i1, n, n, block_k, causal):
            reads += 2 * (min(j0 + block_k, n) - j0) * d  # K_j and V_j
        writes += (i1 - i0) * d  # O_i
    return IOCount(reads, writes)


def sram_block_sizes(sram_size: int, d: int) -> tuple[int, int]:
    """``(block_q, block_k)`` = :math:`(B_r, B_c) = (\\min(\\lceil M/4d \\rceil, d),\\ \\lceil M/4d \\rceil)`
    for an SRAM of ``sram_size`` :math:`M` elements (Algorithm 1, line 1): the tiles of :math:`Q, K, V`
    and :math:`O` then fit in :math:`M`. Needs ``d <= sram_size``."""
    check_positive_int("sram_size", sram_size)
    check_positive_int("d", d)
    if d > sram_size:
        raise ValueError(f"sram_size ({sram_size}) must hold at least one row of d={d} elements")
    block_k = -(-sram_size // (4 * d))
    return min(block_k, d), block_k


# --- measuring memory ------------------------------------------------------------------------------


class _LiveTensorBytes(TorchDispatchMode):
    """Follows every tensor storage that an operation allocates while the mode is active: its bytes count
    from the operation that creates it until its last reference is gone (checked through a weak
    reference after every operation); ``peak`` is the largest sum seen."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # data pointer -> (weak ref, bytes)
        self.live_bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr, (ref, nbytes) in list(self.live.items()):
            if ref.expired():  # freed since the last operation
                del self.live[ptr]
                self.live_bytes -= nbytes
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() == 0 or ptr in inputs or ptr in self.live:
                continue  # a view or an in-place result: no new memory
            self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
            self.live_bytes += storage.nbytes()
        self.peak = max(self.peak, self.live_bytes)
        return out


def peak_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak)``: the most bytes held at one time by tensors that
    ``fn`` creates.

    Every PyTorch operation inside ``fn`` is intercepted (a ``TorchDispatchMode``): an output whose
    storage is new — not a view of, or written into, one of the operation's inputs — counts from that
    operation until it is freed. Tensors that exist before the call (inputs, weights) do not count; the
    result counts while it is alive, so the peak includes it. Buffers that a single fused kernel
    allocates internally and frees before returning are invisible. The figure depends only on the
    operations and their shapes, not on the allocator or the machine's load, so it is the same on every
    run.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    with _LiveTensorBytes() as mode:
        result = fn()
    return result, mode.peak


# --- running a Hugging Face model with it -----------------------------------------------------------


def _hf_flash_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, *, block_q: int, block_k: int,
                        scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` signature: ``query [b, heads, n_q, d]``, ``key``/``value``
    ``[b, kv_heads, n_k, d]`` (after the cache update) -> ``([b, n_q, heads, d], None)``.
    ``attention_mask`` is SDPA's: ``None`` for plain causal attention, else bool ``[b, 1, n_q, n_k]``."""
    if attention_mask is not None:
        n_q, n_k = query.shape[2], key.shape[2]
        causal = torch.arange(n_k, device=query.device) <= torch.arange(n_q, device=query.device)[:, None] + n_k - n_q
        if attention_mask.dtype != torch.bool or not bool((attention_mask == causal).all()):
            raise ValueError("attention_mask: flash_attention here runs causal attention over unpadded sequences; "
                             "got a mask that also hides other tokens (padding)")
    if dropout:
        raise ValueError(f"dropout must be 0 (inference), got {dropout}")
    out = flash_attention(query, key, value, causal=bool(getattr(module, "is_causal", True)), scale=scaling,
                          block_q=block_q, block_k=block_k)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def use_flash_attention(model: Any, block_q: int = 64, block_k: int = 64) -> Iterator[Any]:
    """Within the block the Hugging Face ``model`` computes attention with :func:`flash_attention`;
    on exit, also on an exception, its previous attention implementation is back.

    The function is registered under its own name (``refimpl_tiled_q{block_q}_k{block_k}``), so
    other models keep theirs, together with SDPA's mask builder, so that a padding mask reaches it
    (and raises ``ValueError``: padding is not supported) instead of being dropped. Unpadded batches,
    as in :func:`refimpl.evaluate.perplexity`, and decoding with the model's cache work.
    """
    from transformers.masking_utils import sdpa_mask

    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    name = f"refimpl_tiled_q{block_q}_k{block_k}"  # a name with "flash" would select HF's kernel loader
    attention_fn = functools.partial(_hf_flash_attention, block_q=block_q, block_k=block_k)
    with attention_implementation(model, name, attention_fn, mask_fn=sdpa_mask):
        yield model
