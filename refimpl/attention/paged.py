r"""PagedAttention: the KV cache in fixed-size blocks, addressed through per-sequence block tables.

A server that preallocates each request's cache for the maximum length wastes what the request does
not use, and cannot share a common prompt between requests. Kwon et al. 2023 ("Efficient Memory
Management for Large Language Model Serving with PagedAttention", arXiv:2309.06180, SOSP 2023) store
the cache as virtual memory stores pages: in *blocks* of :math:`B` tokens (§4.1), taken from a pool of
physical blocks as a sequence grows and listed in its *block table* (§4.2). Only a sequence's last
block can be partly empty, so at most :math:`B - 1` slots per sequence are wasted. Attention reads the
keys and values through the table; split into blocks :math:`K_j, V_j` it is (§4.1, Eq. 4)

.. math:: A_{ij} = \frac{\exp(q_i^\top K_j / \sqrt d)}{\sum_{t} \exp(q_i^\top K_t \mathbf{1} / \sqrt d)},
          \qquad o_i = \sum_{j} V_j A_{ij}^\top,

the same numbers as attention over the contiguous cache. Blocks carry *reference counts*, so
sequences can share them (§4.4): :meth:`PagedKVCache.fork` gives a new sequence the table of an
existing one (parallel sampling, a shared system prompt), and the first write into a shared, partly
filled last block copies it first (*copy-on-write*), leaving the shared prefix intact. A finished
sequence frees its blocks; a block returns to the pool when its last owner lets go.

:func:`serving_memory` and :func:`sequences_that_fit` do the bookkeeping of §3 on a list of requests:
slots reserved and used under max-length preallocation and under paging, and how many requests fit
into a fixed budget of slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refimpl._validation import as_device, check_non_negative_int, check_positive_int
from refimpl.attention import gqa


class OutOfBlocksError(RuntimeError):
    """The block pool has no free block left."""


def blocks_needed(n_tokens: int, block_size: int) -> int:
    """Blocks that hold ``n_tokens`` tokens: :math:`\\lceil n / B \\rceil`."""
    check_non_negative_int("n_tokens", n_tokens)
    check_positive_int("block_size", block_size)
    return -(-n_tokens // block_size)


class BlockAllocator:
    """A pool of ``n_blocks`` physical blocks of ``block_size`` token slots, with reference counts.

    Free blocks are handed out lowest id first when the pool is fresh; a freed block is reused next.
    """

    def __init__(self, n_blocks: int, block_size: int):
        check_positive_int("n_blocks", n_blocks)
        check_positive_int("block_size", block_size)
        self.n_blocks, self.block_size = n_blocks, block_size
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: pop() gives block 0 first
        self._ref_counts = [0] * n_blocks

    @property
    def n_free(self) -> int:
        return len(self._free)

    def _check_block(self, block: int) -> None:
        if not isinstance(block, int) or isinstance(block, bool) or not 0 <= block < self.n_blocks:
            raise ValueError(f"block must be an int in [0, {self.n_blocks}), got {block!r}")
        if self._ref_counts[block] == 0:
            raise ValueError(f"block {block} is not allocated")

    def ref_count(self, block: int) -> int:
        """Owners of ``block`` (0: free)."""
        if not isinstance(block, int) or isinstance(block, bool) or not 0 <= block < self.n_blocks:
            raise ValueError(f"block must be an int in [0, {self.n_blocks}), got {block!r}")
        return self._ref_counts[block]

    def allocate(self) -> int:
        """A free block, now with one owner; :class:`OutOfBlocksError` when none is left."""
        if not self._free:
            raise OutOfBlocksError(f"all n_blocks={self.n_blocks} blocks are in use")
        block = self._free.pop()
        self._ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more owner of the allocated ``block``."""
        self._check_block(block)
        self._ref_counts[block] += 1

    def free(self, block: int) -> None:
        """One owner fewer; the block returns to the pool when none is left."""
        self._check_block(block)
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free.append(block)


class PagedKVCache:
    """Keys and values of many sequences in a shared pool of blocks.

    ``k_blocks``/``v_blocks`` are ``[n_layers, n_blocks, kv_heads, block_size, head_dim]`` (per layer
    the ``[n_blocks, kv_heads, block_size, head_dim]`` pool); ``block_tables[seq]`` lists a sequence's
    physical blocks in order and ``lengths[seq]`` its tokens. Token ``p`` of a sequence is in slot
    ``p % block_size`` of block ``block_tables[seq][p // block_size]``.
    """

    def __init__(self, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, n_layers: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.allocator = BlockAllocator(n_blocks, block_size)
        for name, value in (("n_kv_heads", n_kv_heads), ("head_dim", head_dim), ("n_layers", n_layers)):
            check_positive_int(name, value)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        shape = (n_layers, n_blocks, n_kv_heads, block_size, head_dim)
        self.k_blocks = torch.zeros(shape, dtype=dtype, device=as_device("device", device))
        self.v_blocks = torch.zeros_like(self.k_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self._next_id = 0

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value pools."""
        return sum(t.numel() * t.element_size() for t in (self.k_blocks, self.v_blocks))

    def _check_seq(self, seq: int) -> None:
        if seq not in self.block_tables:
            raise ValueError(f"seq {seq!r} is not a live sequence (live: {sorted(self.block_tables)})")

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.k_blocks.shape[0]:
            raise ValueError(f"layer must be an int in [0, {self.k_blocks.shape[0]}), got {layer!r}")

    def add_sequence(self) -> int:
        """A new, empty sequence; returns its id."""
        seq, self._next_id = self._next_id, self._next_id + 1
        self.block_tables[seq], self.lengths[seq] = [], 0
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence sharing all of ``seq``'s blocks (one more owner each); returns its id."""
        self._check_seq(seq)
        child = self.add_sequence()
        for block in self.block_tables[seq]:
            self.allocator.share(block)
        self.block_tables[child], self.lengths[child] = list(self.block_tables[seq]), self.lengths[seq]
        return child

    def free(self, seq: int) -> None:
        """The sequence is finished: give up its blocks and forget it."""
        self._check_seq(seq)
        for block in self.block_tables.pop(seq):
            self.allocator.free(block)
        del self.lengths[seq]

    def reserve(self, seq: int, n_tokens: int) -> torch.Tensor:
        """Make room for ``n_tokens`` more tokens of ``seq`` and return their slots
        (``block * block_size + offset``, ``LongTensor[n_tokens]``).

        Allocates blocks as the sequence crosses block boundaries. If the last block is partly filled
        and shared, it is first copied to a private block (copy-on-write, §4.4). Either everything
        succeeds or nothing changes (:class:`OutOfBlocksError`).
        """
        self._check_seq(seq)
        check_positive_int("n_tokens", n_tokens)
        table, length, size = self.block_tables[seq], self.lengths[seq], self.block_size
        copy_on_write = length % size != 0 and self.allocator.ref_count(table[-1]) > 1
        needed = blocks_needed(length + n_tokens, size) - len(table) + copy_on_write
        if needed > self.allocator.n_free:
            raise OutOfBlocksError(f"seq {seq} needs {needed} more blocks, {self.allocator.n_free} of "
                                   f"n_blocks={self.allocator.n_blocks} are free")
        if copy_on_write:
            shared, private = table[-1], self.allocator.allocate()
            self.k_blocks[:, private] = self.k_blocks[:, shared]
            self.v_blocks[:, private] = self.v_blocks[:, shared]
            self.allocator.free(shared)
            table[-1] = private
        slots = []
        for position in range(length, length + n_tokens):
            if position % size == 0:
                table.append(self.allocator.allocate())
            slots.append(table[position // size] * size + position % size)
        self.lengths[seq] = length + n_tokens
        return torch.tensor(slots, dtype=torch.long)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [kv_heads, t, head_dim]`` of one layer into ``slots [t]`` (from :meth:`reserve`)."""
        self._check_layer(layer)
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.long or slots.dim() != 1 \
                or not ((slots >= 0) & (slots < self.k_blocks.shape[1] * self.block_size)).all():
            raise ValueError("slots must be a 1-D LongTensor of slots in the pool (from reserve())")
        expected = (self.k_blocks.shape[2], len(slots), self.k_blocks.shape[4])
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != expected:
                raise ValueError(f"{name} must have shape [kv_heads, t, head_dim] = {list(expected)}, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        blocks, offsets = slots // self.block_size, slots % self.block_size
        self.k_blocks[layer][blocks, :, offsets] = k.transpose(0, 1).to(self.k_blocks.dtype)  # [t, kv_heads, d]
        self.v_blocks[layer][blocks, :, offsets] = v.transpose(0, 1).to(self.v_blocks.dtype)

    def append(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append the keys and values ``[n_layers, kv_heads, t, head_dim]`` of ``t`` new tokens of ``seq``."""
        n_layers, _, n_kv_heads, _, head_dim = self.k_blocks.shape
        for name, x in (("k", k), ("v", v)):  # checked before reserving, so a bad call changes nothing
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (
                    n_layers, n_kv_heads, head_dim) or x.shape[2] != k.shape[2]:
                raise ValueError(f"{name} must have shape [n_layers={n_layers}, kv_heads={n_kv_heads}, t, "
                                 f"head_dim={head_dim}] (t the same for k and v)")
        slots = self.reserve(seq, k.shape[2])
        for layer in range(n_layers):
            self.write(layer, slots, k[layer], v[layer])

    def gather(self, seq: int, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq``'s keys and values of ``layer``, read through its block table: ``[kv_heads, length, head_dim]``."""
        self._check_seq(seq)
        self._check_layer(layer)
        table = torch.tensor(self.block_tables[seq], dtype=torch.long, device=self.k_blocks.device)
        n_kv_heads, head_dim = self.k_blocks.shape[2], self.k_blocks.shape[4]

        def contiguous(pool: torch.Tensor) -> torch.Tensor:
            blocks = pool[layer, table]  # [n_table, kv_heads, block_size, d]
            return blocks.transpose(0, 1).reshape(n_kv_heads, -1, head_dim)[:, :self.lengths[seq]]  # [kv, len, d]

        return contiguous(self.k_blocks), contiguous(self.v_blocks)


def paged_attention(q: torch.Tensor, cache: PagedKVCache, seqs: list[int], layer: int = 0,
                    scale: float | None = None) -> torch.Tensor:
    """One decoding query per sequence attending to that sequence's cached keys and values.

    Args:
        q: ``[n_seqs, heads, head_dim]``, the query of each sequence's newest token (its own key and value
            already appended).
        cache: the paged store.
        seqs: the sequence of each query.
        layer: which layer's pool.
        scale: defaults to :math:`1/\\sqrt{d}`.

    Returns:
        ``[n_seqs, heads, head_dim]``, equal to :func:`refimpl.attention.gqa.attention` over the
        contiguous keys and values.
    """
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError("q must be a tensor of shape [n_seqs, heads, head_dim]")
    if not isinstance(seqs, (list, tuple)) or len(seqs) != q.shape[0]:
        raise ValueError(f"seqs must list one sequence per query ({q.shape[0]}), got {seqs!r}")
    outputs = []
    for query, seq in zip(q, seqs):
        if cache.lengths.get(seq) == 0:
            raise ValueError(f"seq {seq} has no cached tokens to attend to")
        k, v = cache.gather(seq, layer)  # [kv_heads, length, d]
        out = gqa.attention(query[None, :, None], k[None], v[None], scale=scale)  # [1, heads, 1, d]
        outputs.append(out[0, :, 0])
    return torch.stack(outputs)  # [n_seqs, heads, d]


# --- serving arithmetic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KVMemory:
    """Token slots of a KV cache: reserved for requests, and holding a token."""

    reserved_slots: int
    used_slots: int

    @property
    def waste_fraction(self) -> float:
        """Reserved but unused, as a fraction of reserved."""
        return 1 - self.used_slots / self.reserved_slots


def _check_requests(prompt_lengths: list[int], output_lengths: list[int], max_len: int) -> None:
    check_positive_int("max_len", max_len)
    if not isinstance(prompt_lengths, (list, tuple)) or not prompt_lengths:
        raise ValueError("prompt_lengths must be a non-empty list of ints")
    if not isinstance(output_lengths, (list, tuple)) or len(output_lengths) != len(prompt_lengths):
        raise ValueError(f"output_lengths must be a list with one length per prompt ({len(prompt_lengths)})")
    for prompt, output in zip(prompt_lengths, output_lengths):
        check_positive_int("prompt_lengths[i]", prompt)
        check_non_negative_int("output_lengths[i]", output)
        if prompt + output > max_len:
            raise ValueError(f"a request of {prompt} + {output} tokens exceeds max_len {max_len}")


def serving_memory(prompt_lengths: list[int], output_lengths: list[int], max_len: int,
                   block_size: int) -> dict[str, KVMemory]:
    """Slots of finished requests (each at prompt + output tokens) under two allocation schemes.

    ``"preallocated"``: every request reserves ``max_len`` slots up front, and what it does not use is
    wasted (the internal fragmentation of §3). ``"paged"``: blocks of ``block_size`` as tokens
    arrive, so only the last block of each request is partly empty.
    """
    _check_requests(prompt_lengths, output_lengths, max_len)
    lengths = [p + o for p, o in zip(prompt_lengths, output_lengths)]
    used = sum(lengths)
    paged = sum(blocks_needed(n, block_size) for n in lengths) * block_size
    return {"preallocated": KVMemory(len(lengths) * max_len, used), "paged": KVMemory(paged, used)}


def sequences_that_fit(prompt_lengths: list[int], output_lengths: list[int], max_len: int, block_size: int,
                       budget_slots: int) -> dict[str, int]:
    """How many of the requests, admitted in order, run together at their final lengths within
    ``budget_slots`` token slots: ``max_len`` each when preallocated; with paging, as many as the pool
    of ``budget_slots // block_size`` blocks can hand out blocks to."""
    _check_requests(prompt_lengths, output_lengths, max_len)
    check_positive_int("block_size", block_size)
    check_positive_int("budget_slots", budget_slots)
    preallocated = min(len(prompt_lengths), budget_slots // max_len)
    if budget_slots < block_size:
        return {"preallocated": preallocated, "paged": 0}
    allocator, admitted = BlockAllocator(budget_slots // block_size, block_size), 0
    for prompt, output in zip(prompt_lengths, output_lengths):
        needed = blocks_needed(prompt + output, block_size)
        if needed > allocator.n_free:
            break
        for _ in range(needed):
            allocator.allocate()
        admitted += 1
    return {"preallocated": preallocated, "paged": admitted}
