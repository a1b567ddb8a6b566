"""The records one engine step passes between its parts, and the hook interface that plugs into the step.

    Scheduler.schedule() -> SchedulerOutput
    StepHook.plan(SchedulerOutput) -> ModelInput         (eviction scoring says which queries vote)
    ModelRunner.execute(ModelInput) -> ModelOutput       (forward + sampling)
    StepHook.observe(ModelInput, ModelOutput)            (fold the step's by-products, e.g. block votes)
    Scheduler.update(SchedulerOutput, ModelOutput) -> RequestOutputs   (advance, stops, finishing)
    StepHook.after_update(SchedulerOutput)               (act on the new state, e.g. evict over budget)

Every record here is plain data (ids, token ids, positions, block tables): no live Sequence crosses into the
runner, so a runner can live in another process (tensor- or expert-parallel ranks). The sampling state of a
sampled row (its params and its seeded generator) rides along: sampling happens where the logits are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from workers.sampling_params import SamplingParams
from workers.sequence import TokenLogprobs

if TYPE_CHECKING:
    from workers.attention import AttentionProbe


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: compute `token_ids` at positions start_position, start_position + 1, ..."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens whose K/V this step computes
    start_position: int  # num_computed_tokens before the step: the first token's true (RoPE) position
    block_table: tuple[int, ...]  # the held blocks, in order, covering every token through this step's last
    # Eviction drops whole blocks from the middle of the table: token p's K/V sits at held index
    # (p - num_evicted_tokens) // block_size. Zero until prefill is over.
    num_evicted_tokens: int
    num_known_tokens: int  # prompt + outputs so far: the step samples iff it computes through the last of them
    in_prefill: bool  # some known token was not computed before this step (a prompt, or a recompute)
    params: SamplingParams
    generator: torch.Generator | None  # the request's seeded RNG (same seed, same tokens, whatever the batch)
    forced_token_id: int | None = None  # teacher-forced next token (a migrated stream's replay), if any
    # Speculative decoding (workers/spec): proposed tokens after token_ids (a decode's one token), computed in the
    # same pass at the next positions; the runner verifies them and Scheduler.update keeps the accepted prefix.
    draft_token_ids: tuple[int, ...] = ()
    # [k, V] the drafter's probabilities for each draft token, when it sampled them (None: the drafts are point
    # masses, e.g. n-gram lookups or greedy drafts). Rejection sampling needs them for temperature > 0.
    draft_probs: torch.Tensor | None = None
    # A draft tree's parent per draft (workers/spec/tree.py: -1 = the known token); () for a chain.
    draft_parents: tuple[int, ...] = ()

    @property
    def num_new_tokens(self) -> int:
        """Known tokens computed this step (drafts not included: they are guesses until verified)."""
        return len(self.token_ids)

    @property
    def num_query_tokens(self) -> int:
        """Tokens in the forward pass: the known ones plus the drafts."""
        return len(self.token_ids) + len(self.draft_token_ids)

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.token_ids)

    @property
    def samples(self) -> bool:
        """Its last token's logits give the request's next token."""
        return self.end_position == self.num_known_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...] = ()
    preempted_ids: tuple[str, ...] = ()  # gave their blocks back this step (recomputed later)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(request.num_query_tokens for request in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class ModelInput:
    requests: tuple[ScheduledRequest, ...]
    # Request index -> how many of its chunk's last queries vote for the blocks to keep (an observation window).
    # Listed requests always take the prefill path, even for a one-token chunk, so that query votes as part of
    # the window (weighted as the window is), never as a decode vote; a window may be 0 tokens.
    observe_windows: dict[int, int] = field(default_factory=dict)
    probe: AttentionProbe | None = None  # collects the step's attention by-products for a StepHook
    # Return the residual stream entering these target layers at every row (an EAGLE-3 drafter's features).
    capture_layer_ids: tuple[int, ...] = ()

    def is_decode_row(self, index: int) -> bool:
        """One new token attending to everything before it: true decodes and 1-token prefill tails. A decode with
        k drafts is one too: it runs as k + 1 decode rows (the runner's docstring says why that is causal)."""
        return self.requests[index].num_new_tokens == 1 and index not in self.observe_windows


@dataclass(frozen=True)
class ModelOutput:
    sampled: tuple[int, ...]  # request indices whose next token was sampled, in order
    # Per sampled index, the request's new tokens: one, or with drafts the accepted drafts and then the target's
    # own token (the correction at the first rejection, or the bonus token after all k were accepted).
    token_ids: tuple[tuple[int, ...], ...]
    logprobs: tuple[tuple[TokenLogprobs | None, ...], ...]  # per sampled index, one per new token
    # The request index of each decode row, in row order (the probe's rows): a decode with k drafts has k + 1.
    decode_rows: tuple[int, ...]
    # With ModelInput.capture_layer_ids: the captured states [T, C*E] of every row of the step, and per request
    # index its first row (its rows are contiguous: known tokens in order, then drafts).
    aux_hidden: torch.Tensor | None = None
    first_rows: tuple[int, ...] = ()


class StepHook(Protocol):
    """A policy that rides along the step (eviction scoring now; any by-product collector later)."""

    def plan(self, scheduler_output: SchedulerOutput) -> ModelInput: ...

    def observe(self, model_input: ModelInput, model_output: ModelOutput) -> None: ...

    def after_update(self, scheduler_output: SchedulerOutput) -> None: ...
