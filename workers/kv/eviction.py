"""EvictionPolicy: which of a running sequence's blocks leave the cache when it is over its KV budget.

The unit is the block, and the block is evicted in every layer at once: a pool block holds all layers'
pages, so dropping it in some layers only would free no memory. Selection is per sequence, on one priority
per block combined from the votes of every (layer, KV head) (workers/kv/block_scores.py says how votes are
normalised; ScoredEviction how they combine).

Every policy shares the rules; only the ranking differs:
* the first ``sink_blocks`` blocks (attention sinks) and the last ``recent_blocks`` (the local window,
  including the block being written) are never evicted;
* a block another sequence also holds (a shared prefix-cache block) is never evicted: dropping our
  reference would free nothing and cost us the block;
* the blocks with the lowest priority go first; ties go to the older block.

Policies pick; they never touch the pool. KVCacheManager.evict frees what they pick.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from workers.kv.block_scores import ScoreSpec


@dataclass(frozen=True)
class EvictionBudget:
    """How many blocks a sequence may keep: a fraction of the blocks it has written, or a fixed count."""

    fraction: float | None
    max_blocks: int | None
    sink_blocks: int
    recent_blocks: int

    def blocks_to_keep(self, num_written_blocks: int) -> int:
        keep = num_written_blocks
        if self.fraction is not None:
            keep = math.ceil(self.fraction * num_written_blocks)
        if self.max_blocks is not None:
            keep = min(keep, self.max_blocks)
        return max(keep, self.sink_blocks + self.recent_blocks)


@dataclass(frozen=True)
class EvictionCandidate:
    """What a policy sees of one sequence."""

    request_id: str
    num_blocks: int  # blocks held now (the block table's length)
    num_evicted_blocks: int  # blocks already evicted (the table once was this much longer)
    shared: tuple[bool, ...]  # per held block: another sequence holds it too
    scores: torch.Tensor | None  # [V, num_blocks] votes per voter (layer, KV head), or [num_blocks]; None before any


class EvictionPolicy(ABC):
    name: str

    def __init__(self, budget: EvictionBudget):
        self.budget = budget

    @property
    def score_spec(self) -> ScoreSpec | None:
        """Which votes this policy ranks by (None: it needs no scores)."""
        return None

    def num_over_budget(self, num_blocks: int, num_evicted_blocks: int) -> int:
        """Blocks a sequence holding num_blocks (after evicting num_evicted_blocks) must give up (<= 0: none)."""
        return num_blocks - self.budget.blocks_to_keep(num_blocks + num_evicted_blocks)

    def select(self, candidate: EvictionCandidate) -> list[int]:
        """Ascending indices into the block table of the blocks to evict now (may be empty)."""
        budget = self.budget
        num_blocks = candidate.num_blocks
        excess = self.num_over_budget(num_blocks, candidate.num_evicted_blocks)
        if excess <= 0:
            return []
        first_recent = num_blocks - budget.recent_blocks
        evictable = [index for index in range(budget.sink_blocks, first_recent) if not candidate.shared[index]]
        priority = self.priority(candidate).tolist()
        ranked = sorted(evictable, key=lambda index: (priority[index], index))
        return sorted(ranked[:excess])

    @abstractmethod
    def priority(self, candidate: EvictionCandidate) -> torch.Tensor:
        """[num_blocks]: higher is kept longer."""


class NoEviction(EvictionPolicy):
    name = "none"

    def num_over_budget(self, num_blocks: int, num_evicted_blocks: int) -> int:
        return 0

    def priority(self, candidate: EvictionCandidate) -> torch.Tensor:
        return torch.zeros(candidate.num_blocks)


class StreamingEviction(EvictionPolicy):
    """StreamingLLM: sinks + the most recent blocks; no scores, the oldest middle block goes first."""

    name = "streaming"

    def priority(self, candidate: EvictionCandidate) -> torch.Tensor:
        return torch.arange(candidate.num_blocks, dtype=torch.float32)


class ScoredEviction(EvictionPolicy):
    """Ranks blocks by accumulated votes; subclasses say which votes (ScoreSpec).

    ``aggregate`` combines the voters (layer, KV head): "max" (the default) takes the largest share of any one
    voter's votes, so a block a few retrieval heads need survives even when the other heads never look at it (as
    SnapKV's per-head top-k keeps it); "sum" adds every vote (the block's total attention), which lets the many
    heads that attend broadly outvote a needle (measured: docs/eviction.md).
    """

    def __init__(self, budget: EvictionBudget, aggregate: str = "max"):
        super().__init__(budget)
        self.aggregate = aggregate

    def priority(self, candidate: EvictionCandidate) -> torch.Tensor:
        scores = candidate.scores
        if scores is None:
            return torch.zeros(candidate.num_blocks)
        if scores.dim() == 1:
            return scores
        if self.aggregate == "max":
            return (scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)).max(0).values
        return scores.sum(0)


class H2OEviction(ScoredEviction):
    """H2O: attention mass accumulated over decode steps (the prompt votes only through its last query)."""

    name = "h2o"

    @property
    def score_spec(self) -> ScoreSpec:
        return ScoreSpec(observe_window=1, accumulate_decode=True)


class SnapKVEviction(ScoredEviction):
    """SnapKV: the observation window's attention at the end of prefill, then frozen.

    Blocks written after prefill never get votes, so once out of the recent window they go first (oldest first),
    before any prompt block the window voted for.
    """

    name = "snapkv"

    def __init__(self, budget: EvictionBudget, observe_window: int, aggregate: str = "max"):
        super().__init__(budget, aggregate)
        self.observe_window = observe_window

    @property
    def score_spec(self) -> ScoreSpec:
        return ScoreSpec(observe_window=self.observe_window, accumulate_decode=False)


class ValueAwareEviction(ScoredEviction):
    """Observation window, then every decode step, each vote weighted by the value's size (VATP / CriticalKV)."""

    name = "value_aware"

    def __init__(self, budget: EvictionBudget, observe_window: int, value_norm: str, aggregate: str = "max"):
        super().__init__(budget, aggregate)
        self.observe_window = observe_window
        self.value_norm = value_norm

    @property
    def score_spec(self) -> ScoreSpec:
        return ScoreSpec(observe_window=self.observe_window, accumulate_decode=True, weighting=self.value_norm)


POLICY_NAMES = ("none", "streaming", "h2o", "snapkv", "value_aware")


def make_eviction_policy(name: str, budget: EvictionBudget, observe_window: int = 32,
                         value_norm: str = "output", aggregate: str = "max") -> EvictionPolicy:
    if name == "none":
        return NoEviction(budget)
    if name == "streaming":
        return StreamingEviction(budget)
    if name == "h2o":
        return H2OEviction(budget, aggregate)
    if name == "snapkv":
        return SnapKVEviction(budget, observe_window, aggregate)
    if name == "value_aware":
        return ValueAwareEviction(budget, observe_window, value_norm, aggregate)
    raise ValueError(f"unknown eviction policy {name!r}; available: {', '.join(POLICY_NAMES)}")
