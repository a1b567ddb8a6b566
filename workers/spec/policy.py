"""How many drafts each request gets this step: the speculation policy.

Drafting pays when the verify pass costs about what a one-token decode costs: the target's weights are read
once either way. When the batch is large the pass is no longer free (every draft is a row of every matmul),
so the policy backs off: no drafts while more than max_batch_size requests run. Per request, a drafter that keeps
missing (recent acceptance below min_acceptance) proposes one token at a time until it hits again: a miss then
costs one row, and a hit still saves a step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AcceptanceTracker:
    """An exponential moving average of one request's accepted fraction of drafts (starts optimistic)."""

    rate: float = 1.0
    decay: float = 0.5

    def add(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts:
            self.rate = self.decay * self.rate + (1 - self.decay) * num_accepted / num_drafts


class SpecPolicy:
    def __init__(self, num_speculative_tokens: int, max_batch_size: int, min_acceptance: float):
        self.num_speculative_tokens = num_speculative_tokens
        self.max_batch_size = max_batch_size
        self.min_acceptance = min_acceptance

    def batch_allows(self, num_running: int) -> bool:
        return num_running <= self.max_batch_size

    def num_draft_tokens(self, tracker: AcceptanceTracker, num_output_room: int) -> int:
        """Drafts for one request: num_output_room = tokens it may still emit after this step's own one."""
        wanted = self.num_speculative_tokens if tracker.rate >= self.min_acceptance else 1
        return max(0, min(wanted, num_output_room))
