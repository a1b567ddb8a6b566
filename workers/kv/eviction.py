"""EvictionPolicy: which of a running sequence's blocks may leave the cache (the hook the engine calls).

Policies pick blocks; they never reach into the scheduler. The manager frees what they pick.
`none` is the default and keeps everything; scored policies (StreamingLLM, H2O, value-aware)
implement the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class EvictionCandidate:
    """What a policy sees of one sequence: its table and how full it is."""

    request_id: str
    block_table: tuple[int, ...]
    num_tokens: int
    block_size: int


class EvictionPolicy(ABC):
    name: str

    @abstractmethod
    def select(self, candidate: EvictionCandidate) -> list[int]:
        """Indices into the block table of blocks to evict now (may be empty)."""


class NoEviction(EvictionPolicy):
    name = "none"

    def select(self, candidate: EvictionCandidate) -> list[int]:
        return []


def make_eviction_policy(name: str) -> EvictionPolicy:
    policies = {NoEviction.name: NoEviction}
    if name not in policies:
        raise ValueError(f"unknown eviction policy {name!r}; available: {', '.join(policies)}")
    return policies[name]()
