"""Sequence: the one small record per request. The scheduler writes it, the model runner reads it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from workers.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled by the caller


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), best first


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # grows while running; cleared on preemption
    num_computed_tokens: int = 0  # tokens whose K/V were computed (evicted ones included)
    # Eviction drops whole full blocks from the middle of the table, so token p's K/V sits at table index
    # (p - num_evicted_tokens) // S; positions (RoPE) are unchanged, the keys were rotated when written.
    num_evicted_tokens: int = 0
    # Every known token has been computed since the sequence (re)started: prefill, or recompute after preemption,
    # is over (an observation window has voted), and eviction may start.
    prefill_done: bool = False
    # A prefix-cache hit leaves at least this many last prompt tokens to compute: one for its logits, or a whole
    # observation window, whose queries vote (so a cached prompt is scored exactly like a fresh one).
    min_uncached_tokens: int = 1
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule only)
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None  # per-request RNG: same seed, same tokens, whatever the batch
    hold_kv: bool = False  # prefill role: keep the blocks after the first token, for export to a decode tier
    # Speculative decoding (workers/spec): the drafter's proposal for the next step (the scheduler takes what the
    # budget allows), with q per draft when the drafter sampled them ([k, V]; None = point masses).
    draft_token_ids: tuple[int, ...] = ()
    draft_probs: torch.Tensor | None = None
    draft_parents: tuple[int, ...] = ()  # a draft tree's parents (workers/spec/tree.py); () for a chain
    num_draft_tokens: int = 0  # drafts verified so far (lifetime; the acceptance statistics)
    num_accepted_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def forced_next_token(self) -> int | None:
        """The teacher-forced token for the next output position, if the request forces one."""
        forced = self.params.forced_token_ids
        return forced[self.num_output_tokens] if self.num_output_tokens < len(forced) else None

    @property
    def num_cached_kv_tokens(self) -> int:
        """Tokens whose K/V the held blocks hold now."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]
