"""How many drafts each request gets this step: the speculation policy.

A draft is worth its row when it pays for itself. The policy weighs, for the whole step:
- gain: the j-th draft of a request adds a^j expected tokens (a = that request's acceptance rate: all j must
  pass);
- cost: each draft adds one row to every matmul of the pass, plus the drafter's own time per draft.

`CostAwarePolicy` adds drafts best-first while the step's expected tokens per second rise. The row cost comes from
`StepCostModel`, a running least-squares fit of decode-step time against rows on this machine:
- on a GPU, or a CPU reading a big model's weights, rows are nearly free: it drafts deep;
- on a CPU already compute-bound (a small model, a big batch), rows cost what a stream costs: it drafts only
  where acceptance is high, and not at all when nothing is.
The hard cap `max_batch_size` stays as a guard: above it nobody drafts.

`FixedPolicy` drafts k for everyone under the cap (tests, and a baseline for the bench).

# n=candidate requests, k=drafts per request at most
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass
class AcceptanceTracker:
    """An exponential moving average of one request's accepted fraction of drafts."""

    rate: float
    decay: float = 0.7

    def add(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts:
            weight = self.decay ** num_drafts  # each draft is one observation
            self.rate = weight * self.rate + (1 - weight) * num_accepted / num_drafts


@dataclass(frozen=True)
class Candidate:
    acceptance: float  # the request's estimated per-draft acceptance rate
    max_drafts: int  # what room and num_speculative_tokens allow


class StepCostModel:
    """Seconds of a decode step = fixed + per_row x rows, fitted online; and the drafter's seconds per draft.

    Exponentially weighted least squares over decode-only steps (a prefill chunk's rows cost differently). Until
    the steps have varied in rows, an extra row is assumed to cost `row_cost_prior` of a one-row step."""

    def __init__(self, row_cost_prior: float = 0.3, decay: float = 0.98):
        self.row_cost_prior = row_cost_prior
        self.decay = decay
        self._sums = [0.0] * 5  # decayed sums of 1, x, y, x^2, xy (x = rows, y = seconds)
        self.seconds_per_draft = 0.0  # the drafter's own time per proposed token (measured)

    def add_step(self, num_rows: int, seconds: float) -> None:
        x, y = float(num_rows), seconds
        self._sums = [self.decay * s + v for s, v in zip(self._sums, (1.0, x, y, x * x, x * y))]

    def add_drafting(self, num_drafts: int, seconds: float) -> None:
        if num_drafts:
            self.seconds_per_draft = 0.8 * self.seconds_per_draft + 0.2 * seconds / num_drafts

    def estimate(self) -> tuple[float, float]:
        """(fixed seconds, seconds per row), both >= 0. With no data: (1, prior) (only their ratio matters)."""
        n, sx, sy, sxx, sxy = self._sums
        if n < 1e-9:
            return 1.0, self.row_cost_prior
        mean_x, mean_y = sx / n, sy / n
        variance = sxx / n - mean_x * mean_x
        if variance < 0.25:  # the rows barely varied: the prior splits the mean step
            per_row = self.row_cost_prior * mean_y / (1.0 + self.row_cost_prior * max(0.0, mean_x - 1.0))
        else:
            per_row = max(0.0, (sxy / n - mean_x * mean_y) / variance)
        return max(0.0, mean_y - per_row * mean_x), per_row


class FixedPolicy:
    def __init__(self, num_speculative_tokens: int, max_batch_size: int):
        self.num_speculative_tokens = num_speculative_tokens
        self.max_batch_size = max_batch_size

    def plan(self, candidates: list[Candidate], num_running: int, num_rows: int) -> list[int]:
        if num_running > self.max_batch_size:
            return [0] * len(candidates)
        return [min(self.num_speculative_tokens, c.max_drafts) for c in candidates]


class CostAwarePolicy:
    def __init__(self, num_speculative_tokens: int, max_batch_size: int, cost: StepCostModel):
        self.num_speculative_tokens = num_speculative_tokens
        self.max_batch_size = max_batch_size
        self.cost = cost

    def plan(self, candidates: list[Candidate], num_running: int, num_rows: int) -> list[int]:
        """Drafts per candidate; num_rows: the rows the step has without drafts (one per decode, a chunk's
        tokens); every running request yields one token without drafting."""
        drafts = [0] * len(candidates)
        if num_running > self.max_batch_size or not candidates:
            return drafts
        fixed, per_row = self.cost.estimate()
        per_draft = per_row + self.cost.seconds_per_draft
        tokens = float(num_running)
        seconds = fixed + per_row * num_rows
        # Best-first: the j-th draft of request i gains a_i^j tokens; take it while the step's tokens per second
        # rise (gain / cost > tokens / seconds).
        heap = [(-c.acceptance, index) for index, c in enumerate(candidates) if c.max_drafts > 0]
        heapq.heapify(heap)
        while heap:
            negative_gain, index = heapq.heappop(heap)
            gain = -negative_gain
            if gain * seconds <= tokens * per_draft:
                break  # the best remaining draft no longer pays; no later one does either
            drafts[index] += 1
            tokens += gain
            seconds += per_draft
            limit = min(self.num_speculative_tokens, candidates[index].max_drafts)
            if drafts[index] < limit:
                heapq.heappush(heap, (-(gain * candidates[index].acceptance), index))
        return drafts
