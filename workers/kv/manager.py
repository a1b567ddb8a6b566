"""KVCacheManager: per-sequence block tables on top of the BlockPool (prefix hits, growth, release).

Check/act pairs: the scheduler asks `allocate_slots` and, on False, preempts; nothing is half-done.
Block tables grow at the end while a sequence runs; eviction removes full blocks from the middle (the
engine asks its EvictionPolicy which); a preempted sequence gives back all its blocks.
"""

from __future__ import annotations

from workers.kv.block_pool import BlockHash, BlockPool, hash_block_tokens
from workers.sequence import Sequence


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self._block_hashes: dict[str, list[BlockHash]] = {}  # request id -> hashes of its full blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix_hit(self, seq: Sequence) -> tuple[list[int], int]:
        """Cached blocks holding a prefix of seq's tokens, and how many tokens they cover.

        The last seq.min_uncached_tokens tokens (at least the last: its logits sample the next token) are never
        served from cache.
        """
        if not self.pool.enable_prefix_caching:
            return [], 0
        token_ids = seq.token_ids
        max_full_blocks = max(0, len(token_ids) - seq.min_uncached_tokens) // self.block_size
        hit_blocks: list[int] = []
        parent: BlockHash | None = None
        for index in range(max_full_blocks):
            start = index * self.block_size
            parent = hash_block_tokens(parent, token_ids[start:start + self.block_size])
            block_id = self.pool.lookup(parent)
            if block_id is None:
                break
            hit_blocks.append(block_id)
        return hit_blocks, len(hit_blocks) * self.block_size

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] = ()) -> bool:
        """Make room for num_new_tokens after seq.num_computed_tokens (+ the prefix hit). False if the pool is short."""
        num_have = len(seq.block_table) + len(prefix_blocks)
        num_prefix_tokens = len(prefix_blocks) * self.block_size
        total_tokens = max(seq.num_computed_tokens, num_prefix_tokens) + num_new_tokens - seq.num_evicted_tokens
        num_missing = max(0, self.blocks_needed(total_tokens) - num_have)
        # Reviving a free cached block takes it off the free queue too, so count it against the budget.
        num_revived = sum(1 for b in prefix_blocks if self.pool.blocks[b].ref_count == 0)
        if not self.pool.can_allocate(num_missing + num_revived):
            return False
        if prefix_blocks:
            self.pool.touch(prefix_blocks)
            seq.block_table.extend(prefix_blocks)
        seq.block_table.extend(self.pool.allocate(num_missing))
        return True

    def cache_full_blocks(self, seq: Sequence, token_ids: list[int] | None = None) -> None:
        """Publish the hashes of blocks that became full of computed tokens. token_ids: the sequence's tokens
        when it computed more than it holds yet (accepted drafts, appended right after); default its own."""
        # After an eviction, later blocks were computed without the evicted context: they are not the K/V
        # of their token prefix and must never be served to another request.
        if not self.pool.enable_prefix_caching or seq.num_evicted_tokens:
            return
        hashes = self._block_hashes.setdefault(seq.request_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= len(hashes):
            return
        token_ids = token_ids if token_ids is not None else seq.token_ids
        parent = hashes[-1] if hashes else None
        for index in range(len(hashes), num_full):
            start = index * self.block_size
            parent = hash_block_tokens(parent, token_ids[start:start + self.block_size])
            hashes.append(parent)
            self.pool.cache_block(seq.block_table[index], parent)

    def evict(self, seq: Sequence, indices: list[int]) -> None:
        """Drop the blocks at these block-table indices (full blocks, never the last)."""
        if not indices:
            return
        assert indices[-1] < len(seq.block_table) - 1, "the block being written is never evicted"
        dropped = set(indices)
        self.pool.free(seq.block_table[index] for index in indices)
        seq.block_table = [block for index, block in enumerate(seq.block_table) if index not in dropped]
        seq.num_evicted_tokens += len(indices) * self.block_size

    def free(self, seq: Sequence) -> None:
        # Tail first: the end of a sequence is the least likely to be shared, so it is reused first.
        self.pool.free(reversed(seq.block_table))
        seq.block_table = []
        seq.num_evicted_tokens = 0
        self._block_hashes.pop(seq.request_id, None)

    def is_shared(self, block_id: int) -> bool:
        return self.pool.blocks[block_id].ref_count > 1

    def num_blocks_held(self, seq: Sequence) -> int:
        return len(seq.block_table)
