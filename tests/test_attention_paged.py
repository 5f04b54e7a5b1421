"""refimpl.attention.paged: paged attention equals contiguous attention; random workloads of
add/append/fork/free keep the allocator's books (no block owned twice except through a fork, every
block back after the last free) and every sequence's keys and values intact under copy-on-write; the
serving arithmetic by hand; validation."""

from __future__ import annotations

import random

import pytest
import torch

from refimpl.attention import gqa, paged
from refimpl.attention.paged import BlockAllocator, OutOfBlocksError, PagedKVCache


def _tokens(n_layers, n_kv_heads, t, d, generator):
    return torch.randn(n_layers, n_kv_heads, t, d, generator=generator), \
        torch.randn(n_layers, n_kv_heads, t, d, generator=generator)


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_paged_attention_equals_contiguous_attention(block_size, n_heads, n_kv_heads):
    g = torch.Generator().manual_seed(block_size)
    cache = PagedKVCache(n_blocks=64, block_size=block_size, n_kv_heads=n_kv_heads, head_dim=8, n_layers=2)
    rng = random.Random(block_size)
    contiguous = {}
    for _ in range(3):
        seq = cache.add_sequence()
        contiguous[seq] = [torch.empty(2, n_kv_heads, 0, 8)] * 2
        for _ in range(rng.randint(1, 4)):  # appended in chunks, interleaved with the other sequences
            k, v = _tokens(2, n_kv_heads, rng.randint(1, 6), 8, g)
            cache.append(seq, k, v)
            contiguous[seq] = [torch.cat([old, new], dim=2) for old, new in zip(contiguous[seq], (k, v))]
    seqs = list(contiguous)
    q = torch.randn(len(seqs), n_heads, 8, generator=g)
    for layer in range(2):
        out = paged.paged_attention(q, cache, seqs, layer=layer)
        for i, seq in enumerate(seqs):
            k, v = (x[layer] for x in contiguous[seq])
            assert all(torch.equal(a, b) for a, b in zip(cache.gather(seq, layer), (k, v)))
            expected = gqa.attention(q[i][None, :, None], k[None], v[None])[0, :, 0]
            torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


def _check_books(cache: PagedKVCache, contiguous: dict) -> None:
    allocator = cache.allocator
    owners = [0] * allocator.n_blocks
    for seq, table in cache.block_tables.items():
        assert len(set(table)) == len(table)  # a sequence never lists a block twice
        assert len(table) == paged.blocks_needed(cache.lengths[seq], cache.block_size)
        for block in table:
            owners[block] += 1
    for block in range(allocator.n_blocks):
        assert allocator.ref_count(block) == owners[block]  # shared blocks are exactly the forked ones
    assert allocator.n_free == owners.count(0)
    for seq, (k, v) in contiguous.items():  # every sequence reads back what was appended to it
        assert cache.lengths[seq] == k.shape[2]
        for layer in range(k.shape[0]):
            gathered_k, gathered_v = cache.gather(seq, layer)
            assert torch.equal(gathered_k, k[layer]) and torch.equal(gathered_v, v[layer])


@pytest.mark.parametrize("seed", range(8))
def test_random_workloads_keep_the_books(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    block_size = rng.choice([1, 2, 4, 5])
    cache = PagedKVCache(n_blocks=24, block_size=block_size, n_kv_heads=2, head_dim=4, n_layers=2)
    contiguous, forks, out_of_blocks = {}, 0, 0
    for _ in range(150):
        action = rng.choices(["add", "append", "fork", "free"], weights=[2, 6, 2, 2])[0]
        live = sorted(contiguous)
        if action == "add" or not live:
            contiguous[cache.add_sequence()] = (torch.empty(2, 2, 0, 4), torch.empty(2, 2, 0, 4))
        elif action == "append":
            seq = rng.choice(live)
            k, v = _tokens(2, 2, rng.randint(1, 7), 4, g)
            before = {s: list(t) for s, t in cache.block_tables.items()}
            try:
                cache.append(seq, k, v)
            except OutOfBlocksError:
                out_of_blocks += 1
                assert cache.block_tables == before  # nothing changed
            else:
                contiguous[seq] = tuple(torch.cat([old, new], dim=2) for old, new in zip(contiguous[seq], (k, v)))
        elif action == "fork":
            parent = rng.choice(live)
            contiguous[cache.fork(parent)] = contiguous[parent]  # appends build new tensors, never modify these
            forks += 1
        else:
            seq = rng.choice(live)
            cache.free(seq)
            del contiguous[seq]
        _check_books(cache, contiguous)
    assert forks and out_of_blocks  # the workload exercised sharing and a full pool
    for seq in list(contiguous):
        cache.free(seq)
    assert cache.allocator.n_free == 24 and not cache.block_tables
    assert all(cache.allocator.ref_count(b) == 0 for b in range(24))


def test_copy_on_write_keeps_the_shared_prefix():
    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(n_blocks=8, block_size=4, n_kv_heads=2, head_dim=4, n_layers=2)
    parent = cache.add_sequence()
    cache.append(parent, *_tokens(2, 2, 6, 4, g))  # blocks [0, 1], the second holding 2 of 4 tokens
    full, partial = cache.block_tables[parent]
    pool_before = cache.k_blocks.clone(), cache.v_blocks.clone()
    child = cache.fork(parent)
    assert cache.block_tables[child] == [full, partial]
    assert cache.allocator.ref_count(full) == cache.allocator.ref_count(partial) == 2
    cache.append(child, *_tokens(2, 2, 3, 4, g))  # into the shared, partly filled block: copy it first
    private = cache.block_tables[child][1]
    assert cache.block_tables[child][0] == full and private not in (full, partial)
    assert cache.allocator.ref_count(full) == 2 and cache.allocator.ref_count(partial) == 1
    for pool, before in zip((cache.k_blocks, cache.v_blocks), pool_before):
        assert torch.equal(pool[:, [full, partial]], before[:, [full, partial]])  # the parent's bytes are intact
        assert torch.equal(pool[:, private, :, :2], before[:, partial, :, :2])  # the copy starts from them
    k_parent, _ = cache.gather(parent, 1)
    k_child, _ = cache.gather(child, 1)
    assert torch.equal(k_child[:, :6], k_parent) and k_child.shape[1] == 9
    tables = {s: list(t) for s, t in cache.block_tables.items()}
    cache.append(parent, *_tokens(2, 2, 1, 4, g))  # the parent's last block is its own again: no copy
    assert cache.block_tables[parent] == tables[parent] and cache.block_tables[child] == tables[child]
    # a full shared last block needs no copy: the fork just starts a new block
    cache.free(child)
    cache.append(parent, *_tokens(2, 2, 1, 4, g))  # 8 tokens: both blocks full
    twin = cache.fork(parent)
    cache.append(twin, *_tokens(2, 2, 1, 4, g))
    assert cache.block_tables[twin][:2] == cache.block_tables[parent]
    assert all(cache.allocator.ref_count(b) == 2 for b in cache.block_tables[parent])
    for seq in (parent, twin):
        cache.free(seq)
    assert cache.allocator.n_free == 8


def test_allocator_never_hands_out_a_block_twice():
    allocator = BlockAllocator(n_blocks=5, block_size=16)
    blocks = [allocator.allocate() for _ in range(5)]
    assert sorted(blocks) == list(range(5)) and blocks[0] == 0
    with pytest.raises(OutOfBlocksError, match="n_blocks=5"):
        allocator.allocate()
    allocator.share(3)
    allocator.free(3)
    assert allocator.ref_count(3) == 1 and allocator.n_free == 0  # still owned once
    allocator.free(3)
    assert allocator.ref_count(3) == 0 and allocator.allocate() == 3  # back in the pool, reused
    allocator.free(4)
    with pytest.raises(ValueError, match="block 4 is not allocated"):
        allocator.free(4)  # freed twice
    with pytest.raises(ValueError, match="block 4 is not allocated"):
        allocator.share(4)  # a free block has no owner to share it
    with pytest.raises(ValueError, match=r"block must be an int in \[0, 5\)"):
        allocator.free(5)


def test_out_of_blocks_changes_nothing():
    cache = PagedKVCache(n_blocks=3, block_size=2, n_kv_heads=1, head_dim=2)
    seq = cache.add_sequence()
    cache.append(seq, torch.ones(1, 1, 5, 2), torch.ones(1, 1, 5, 2))
    twin = cache.fork(seq)  # shares the partly filled third block
    with pytest.raises(OutOfBlocksError, match="needs 1 more blocks, 0 of n_blocks=3 are free"):
        cache.append(twin, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))  # copy-on-write needs a block
    assert cache.block_tables[twin] == cache.block_tables[seq] and cache.lengths[twin] == 5
    cache.free(seq)
    cache.append(twin, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))  # now its own: no copy, fills block 3
    assert cache.lengths[twin] == 6 and cache.allocator.n_free == 0


# --- serving arithmetic -------------------------------------------------------------------------


def test_serving_memory_by_hand():
    memory = paged.serving_memory([10, 3], [5, 0], max_len=32, block_size=4)
    assert memory["preallocated"] == paged.KVMemory(reserved_slots=64, used_slots=18)
    assert memory["paged"] == paged.KVMemory(reserved_slots=16 + 4, used_slots=18)  # ceil(15/4) + ceil(3/4) blocks
    assert memory["paged"].waste_fraction == pytest.approx(0.1)
    assert memory["preallocated"].waste_fraction == pytest.approx(1 - 18 / 64)
    assert paged.serving_memory([8], [0], 8, 4)["paged"].waste_fraction == 0


def test_paged_waste_is_the_last_block_only():
    rng = random.Random(0)
    prompts = [rng.randint(1, 300) for _ in range(200)]
    outputs = [rng.randint(0, 200) for _ in range(200)]
    for block_size in (1, 8, 16, 64):
        memory = paged.serving_memory(prompts, outputs, max_len=512, block_size=block_size)
        assert memory["paged"].used_slots == memory["preallocated"].used_slots == sum(prompts) + sum(outputs)
        assert memory["paged"].reserved_slots - memory["paged"].used_slots <= 200 * (block_size - 1)
        assert memory["paged"].waste_fraction < memory["preallocated"].waste_fraction
    assert paged.serving_memory(prompts, outputs, 512, 1)["paged"].waste_fraction == 0


def test_sequences_that_fit_by_hand():
    fits = paged.sequences_that_fit([10, 3, 20, 1], [5, 0, 10, 1], max_len=32, block_size=4, budget_slots=40)
    # preallocated: 40 // 32 = 1; paged: 10 blocks, requests need 4, 1, 8 -> the first two
    assert fits == {"preallocated": 1, "paged": 2}
    assert paged.sequences_that_fit([1] * 10, [1] * 10, 32, 2, 15) == {"preallocated": 0, "paged": 7}
    assert paged.sequences_that_fit([4], [0], 4, 8, 4) == {"preallocated": 1, "paged": 0}  # no whole block


def test_validation():
    with pytest.raises(ValueError, match="n_blocks must be a positive int"):
        BlockAllocator(0, 4)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        PagedKVCache(4, 0, 1, 2)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        PagedKVCache(4, 2, 1, 0)
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(4, 2, 1, 2, dtype=torch.int8)
    cache = PagedKVCache(4, 2, n_kv_heads=2, head_dim=3, n_layers=2)
    seq = cache.add_sequence()
    with pytest.raises(ValueError, match=r"seq 7 is not a live sequence \(live: \[0\]\)"):
        cache.append(7, torch.ones(2, 2, 1, 3), torch.ones(2, 2, 1, 3))
    with pytest.raises(ValueError, match=r"k must have shape \[n_layers=2, kv_heads=2, t, head_dim=3\]"):
        cache.append(seq, torch.ones(1, 2, 1, 3), torch.ones(2, 2, 1, 3))
    with pytest.raises(ValueError, match=r"v must have shape \[n_layers=2, kv_heads=2, t, head_dim=3\]"):
        cache.append(seq, torch.ones(2, 2, 1, 3), torch.ones(2, 2, 1, 4))
    assert cache.lengths[seq] == 0 and cache.allocator.n_free == 4  # failed appends reserved nothing
    with pytest.raises(ValueError, match=r"v must have shape \[kv_heads, t, head_dim\] = \[2, 1, 3\]"):
        cache.write(0, cache.reserve(seq, 1), torch.ones(2, 1, 3), torch.ones(2, 1, 4))
    cache.free(seq)
    seq = cache.add_sequence()
    with pytest.raises(ValueError, match="n_tokens must be a positive int"):
        cache.reserve(seq, 0)
    with pytest.raises(ValueError, match="slots must be a 1-D LongTensor"):
        cache.write(0, torch.tensor([99]), torch.ones(2, 1, 3), torch.ones(2, 1, 3))
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        cache.gather(seq, 2)
    with pytest.raises(ValueError, match="seq 3 is not a live sequence"):
        cache.fork(3)
    with pytest.raises(ValueError, match="has no cached tokens"):
        paged.paged_attention(torch.ones(1, 2, 3), cache, [seq])
    with pytest.raises(ValueError, match="seqs must list one sequence per query"):
        paged.paged_attention(torch.ones(2, 2, 3), cache, [seq])
    with pytest.raises(ValueError, match=r"q must be a tensor of shape \[n_seqs, heads, head_dim\]"):
        paged.paged_attention(torch.ones(2, 3), cache, [seq])
    with pytest.raises(TypeError, match="cache must be a PagedKVCache"):
        paged.paged_attention(torch.ones(1, 2, 3), {}, [seq])
    cache.free(seq)
    with pytest.raises(ValueError, match="seq 1 is not a live sequence"):
        cache.free(seq)
    with pytest.raises(ValueError, match="exceeds max_len 8"):
        paged.serving_memory([5], [4], 8, 2)
    with pytest.raises(ValueError, match="output_lengths must be a list with one length per prompt"):
        paged.serving_memory([5, 1], [1], 8, 2)
    with pytest.raises(ValueError, match="prompt_lengths must be a non-empty list"):
        paged.serving_memory([], [], 8, 2)
    with pytest.raises(ValueError, match=r"output_lengths\[i\] must be a non-negative int"):
        paged.serving_memory([1], [-1], 8, 2)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        paged.serving_memory([1], [1], 8, 0)
    with pytest.raises(ValueError, match="budget_slots must be a positive int"):
        paged.sequences_that_fit([1], [1], 8, 2, 0)
