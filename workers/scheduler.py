"""Scheduler: continuous batching under a per-step token budget, chunked prefill, preemption by recompute.

One rule drives everything (vLLM v1): each step, a sequence's num_computed_tokens catches up toward
its token count. A decode is a 1-token catch-up; a long prompt catches up in chunks; a prefix-cache
hit starts the count above zero. Running sequences are served first, in arrival order; when blocks
run out the newest running sequence is preempted (blocks freed, recomputed later from its tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.kv.manager import KVCacheManager
from workers.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def is_decode(self) -> bool:
        """One query token attending to everything before it (true decodes and 1-token prefill tails)."""
        return self.num_new_tokens == 1


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # lifetime count (a metric)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, num_new):
                victim = self.running.pop()  # the newest arrival gives way
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
                index += 1
        if out.preempted:
            return out  # memory is tight: don't admit new work in the same step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix_blocks, num_prefix_tokens = self.kv.find_prefix_hit(seq)
            num_new = min(seq.num_tokens - num_prefix_tokens, budget)
            if not self.kv.allocate_slots(seq, num_new, prefix_blocks):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_prefix_tokens
            seq.num_computed_tokens = num_prefix_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return out

    def finish(self, seq: Sequence, free_blocks: bool = True) -> None:
        """Take a finished or aborted sequence out of the queues; its blocks return unless held for export."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free_blocks:
            self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence whose KV is already in its blocks (imported from a prefill replica)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
