"""BlockPool alone: ref counts, free-queue order, prefix hashes, invariants under random operations."""

import random

import pytest

from workers.kv.block_pool import BlockPool, hash_block_tokens


def test_allocate_free_roundtrip_and_exhaustion():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and pool.num_free_blocks == 1
    assert not pool.can_allocate(2)
    with pytest.raises(MemoryError):
        pool.allocate(2)
    pool.free(blocks)
    assert pool.num_free_blocks == 4
    pool.check_invariants()


def test_double_free_is_caught():
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([block])


def test_chained_hash_depends_on_whole_prefix():
    a = hash_block_tokens(None, [1, 2, 3])
    b = hash_block_tokens(None, [1, 2, 4])
    assert a != b
    assert hash_block_tokens(a, [5]) != hash_block_tokens(b, [5])
    assert hash_block_tokens(a, [5]) == hash_block_tokens(hash_block_tokens(None, [1, 2, 3]), [5])


def test_cached_block_revived_then_dropped_on_reuse():
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    block_hash = hash_block_tokens(None, [7] * 16)
    pool.cache_block(block, block_hash)
    pool.free([block])
    assert pool.lookup(block_hash) == block  # still cached while free
    pool.touch([block])
    assert pool.blocks[block].ref_count == 1 and pool.num_free_blocks == 1
    pool.free([block])
    # Allocating everything reuses the cached block for new content: its hash must go.
    pool.allocate(2)
    assert pool.lookup(block_hash) is None
    pool.check_invariants()


def test_free_queue_is_lru_of_release_order():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    pool.free([blocks[2]])
    pool.free([blocks[0]])
    pool.free([blocks[1]])
    assert pool.allocate(3) == [blocks[2], blocks[0], blocks[1]]


def test_prefix_caching_disabled_never_publishes():
    pool = BlockPool(2, enable_prefix_caching=False)
    [block] = pool.allocate(1)
    pool.cache_block(block, b"x" * 16)
    assert pool.lookup(b"x" * 16) is None


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    pool = BlockPool(32)
    owners: list[list[int]] = []
    hashes = [hash_block_tokens(None, [i]) for i in range(20)]
    for _ in range(3000):
        op = rng.random()
        if op < 0.35 and pool.num_free_blocks:
            owned = pool.allocate(rng.randint(1, min(4, pool.num_free_blocks)))
            for block in owned:
                if rng.random() < 0.5:
                    pool.cache_block(block, rng.choice(hashes))
            owners.append(owned)
        elif op < 0.6 and owners:
            pool.free(reversed(owners.pop(rng.randrange(len(owners)))))
        elif op < 0.8:
            block = pool.lookup(rng.choice(hashes))
            if block is not None:
                pool.touch([block])
                owners.append([block])
        pool.check_invariants()
        held = sum(len(o) for o in owners)
        assert sum(b.ref_count for b in pool.blocks) == held
    for owned in owners:
        pool.free(owned)
    assert pool.num_free_blocks == 32
    pool.check_invariants()
