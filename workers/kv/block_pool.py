"""BlockPool: the paged KV allocator in plain Python (no torch). Ref counts and prefix hashes.

A block is free when its ref count is 0. Free blocks wait in an LRU queue; a free block that still
holds a full, hashed block of tokens can be revived by a later request with the same prefix
(prefix caching). Reuse of such a block for new content drops its hash first.
Invariants: every block is in exactly one of {free queue, in use (ref > 0)}; a hash maps to at most one block.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence


BlockHash = bytes


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash: a block's identity includes every token before it, so equal hashes mean equal prefixes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent_hash or b"root")
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # Eviction order is the queue order: the head is reused first (least recently freed).
        self._free: OrderedDict[int, None] = OrderedDict((block_id, None) for block_id in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise MemoryError(f"asked for {num_blocks} KV blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # reusing a cached block for new content: forget its old identity
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            block_ids.append(block_id)
        return block_ids

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (prefix hit); a free one leaves the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; pass a sequence's blocks tail-first so its tail is reused first."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Publish a full block under its prefix hash. First writer wins; a duplicate stays unpublished."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        for block_hash, block_id in list(self._cached.items()):
            self.blocks[block_id].block_hash = None
        self._cached.clear()

    def check_invariants(self) -> None:
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has negative refs"
            assert (block.ref_count == 0) == (block.block_id in self._free), f"block {block.block_id} free-state mismatch"
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) == block.block_id, f"block {block.block_id} hash not indexed"
        for block_hash, block_id in self._cached.items():
            assert self.blocks[block_id].block_hash == block_hash
