"""Scheduler: owns the request lifecycle. Continuous batching under a per-step token budget, chunked prefill,
preemption by recompute; advancing, stops and finishing after each step; the holds and reservations of a
disaggregated handoff.

One rule drives everything (vLLM v1): each step, a sequence's num_computed_tokens catches up toward
its token count. A decode is a 1-token catch-up; a long prompt catches up in chunks; a prefix-cache
hit starts the count above zero. Running sequences are served first, in arrival order; when blocks
run out the newest running sequence is preempted (blocks freed, recomputed later from its tokens).

Lifecycle: waiting -> running -> finished (blocks freed) | held (prefill role: blocks kept for export);
reserved (decode role: blocks for an imported prompt) -> running. A request id names one of them at a time.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from workers.kv.manager import KVCacheManager
from workers.model.tokenizer import Tokenizer
from workers.outputs import RequestOutput, TextState
from workers.sampling_params import InvalidRequestError
from workers.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprobs
from workers.step import ModelOutput, ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, tokenizer: Tokenizer,
                 max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}  # waiting or running
        self.held: dict[str, Sequence] = {}  # prefill role: finished, blocks awaiting export
        self.reserved: dict[str, Sequence] = {}  # decode role: blocks reserved, KV bytes in flight
        self._text: dict[str, TextState] = {}
        self.num_preemptions = 0  # lifetime count (a metric)

    # ---- admission --------------------------------------------------------------------------------
    def check_new_id(self, request_id: str) -> None:
        if request_id in self.requests or request_id in self.held or request_id in self.reserved:
            raise InvalidRequestError("request_id", f"request {request_id!r} is already running")

    def add(self, seq: Sequence) -> None:
        self.check_new_id(seq.request_id)
        self._start(seq)
        self.waiting.append(seq)

    def _start(self, seq: Sequence) -> None:
        self.requests[seq.request_id] = seq
        self._text[seq.request_id] = TextState(self.tokenizer, seq.prompt_token_ids, seq.params)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            # A decode with drafts (workers/spec) computes them in the same pass: their slots come with it, if the
            # budget and the pool allow; otherwise the decode runs alone (drafting never preempts anyone).
            num_drafts = min(len(seq.draft_token_ids), budget - num_new) if num_new == 1 else 0
            if num_drafts and not self.kv.allocate_slots(seq, num_new + num_drafts):
                num_drafts = 0
            while not num_drafts and not self.kv.allocate_slots(seq, num_new):
                victim = self.running.pop()  # the newest arrival gives way
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                scheduled.append(schedule_record(seq, num_new, seq.draft_token_ids[:num_drafts],
                                                 seq.draft_parents[:num_drafts]))
                budget -= num_new + num_drafts
                index += 1
        if preempted:
            return SchedulerOutput(tuple(scheduled), tuple(preempted))  # memory is tight: admit nothing new
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
            scheduled.append(schedule_record(seq, num_new))
            budget -= num_new
        return SchedulerOutput(tuple(scheduled))

    def update(self, scheduler_output: SchedulerOutput, model_output: ModelOutput) -> list[RequestOutput]:
        """The step ran: advance every scheduled request, publish its full blocks, append the sampled tokens.

        A decode with drafts advances past its accepted drafts only: the rejected ones' K/V stays in slots past
        num_computed_tokens, never published, and the next step overwrites it (its blocks stay the request's)."""
        scheduled = scheduler_output.scheduled
        new_tokens = dict(zip(model_output.sampled, zip(model_output.token_ids, model_output.logprobs)))
        for index, request in enumerate(scheduled):
            seq = self.requests[request.request_id]
            accepted = new_tokens[index][0][:-1] if request.draft_token_ids else ()
            seq.num_computed_tokens += request.num_new_tokens + len(accepted)
            seq.prefill_done = seq.num_computed_tokens >= seq.num_tokens
            self.kv.cache_full_blocks(seq, seq.token_ids + list(accepted) if accepted else None)
            if request.draft_token_ids:
                seq.num_draft_tokens += len(request.draft_token_ids)
                seq.num_accepted_tokens += len(accepted)
        outputs = []
        for index, (token_ids, logprobs) in new_tokens.items():
            seq = self.requests[scheduled[index].request_id]
            outputs.append(self._append_tokens(seq, token_ids, logprobs))
        return outputs

    def _append_tokens(self, seq: Sequence, token_ids: tuple[int, ...],
                       logprobs: tuple[TokenLogprobs | None, ...]) -> RequestOutput:
        """One step's tokens for a request (several after accepted drafts), as one RequestOutput; tokens after a
        stop are dropped (a stop string or max_tokens can land inside an accepted run)."""
        output = self.append_token(seq, token_ids[0], logprobs[0])
        for token_id, entry in zip(token_ids[1:], logprobs[1:]):
            if output.finished:
                break
            output = _merge(output, self.append_token(seq, token_id, entry))
        return output

    def append_token(self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        """A new token for a running request: the stop checks, then its text; finishes the request on a stop."""
        seq.output_token_ids.append(token_id)
        params = seq.params
        logprob_list = [logprobs] if logprobs is not None else []
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in seq.eos_token_ids):
            return self._finish(seq, FinishReason.STOP, [token_id], "", logprob_list)
        text_delta, hit_stop_string = self._text[seq.request_id].add_token(token_id)
        if hit_stop_string:
            return self._finish(seq, FinishReason.STOP, [token_id], text_delta, logprob_list)
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, FinishReason.LENGTH, [token_id], text_delta, logprob_list)
        return _output(seq, [token_id], text_delta, logprob_list, finished=False)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a waiting or running request now (holds and reservations are released by detach)."""
        seq = self.requests.get(request_id)
        return self._finish(seq, FinishReason.ABORT, [], "", []) if seq is not None else None

    def _finish(self, seq: Sequence, reason: FinishReason, new_token_ids: list[int], text_delta: str,
                logprobs: list[TokenLogprobs]) -> RequestOutput:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.hold_kv and reason is not FinishReason.ABORT:
            self.held[seq.request_id] = seq  # the blocks hold the prompt's K/V (the sampled token is not computed)
        else:
            self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        text_state = self._text.pop(seq.request_id)
        if reason is not FinishReason.STOP or not seq.params.stop:
            text_delta += text_state.finish()
        del self.requests[seq.request_id]
        return _output(seq, new_token_ids, text_delta, logprobs, finished=True)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.draft_token_ids, seq.draft_parents = (), ()
        seq.num_computed_tokens = 0
        seq.prefill_done = False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    # ---- disaggregation ---------------------------------------------------------------------------
    def reserve_import(self, seq: Sequence) -> list[int] | None:
        """Reserve blocks for a prompt whose KV will be imported; None if the pool is short."""
        self.check_new_id(seq.request_id)
        if not self.kv.allocate_slots(seq, seq.num_prompt_tokens):
            return None
        self.reserved[seq.request_id] = seq
        return list(seq.block_table)

    def commit_import(self, request_id: str) -> Sequence:
        """The prompt's K/V is in the reserved blocks: the sequence joins the running batch, prefill done."""
        seq = self.reserved.pop(request_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.kv.cache_full_blocks(seq)
        self._start(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return seq

    def detach(self, request_id: str, owner: Sequence | None = None) -> Sequence | None:
        """Take a held or reserved request off its id without freeing its blocks (the id may be reused at once);
        with `owner`, only if that sequence is the one holding it (never another request that took the id)."""
        source = self.held if request_id in self.held else self.reserved
        seq = source.get(request_id)
        if seq is None or (owner is not None and seq is not owner):
            return None
        del source[request_id]
        return seq


def _merge(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one (the later one's counters and finish state)."""
    return dataclasses.replace(then, new_token_ids=first.new_token_ids + then.new_token_ids,
                               new_text=first.new_text + then.new_text, logprobs=first.logprobs + then.logprobs)


def schedule_record(seq: Sequence, num_new_tokens: int, draft_token_ids: tuple[int, ...] = (),
                    draft_parents: tuple[int, ...] = ()) -> ScheduledRequest:
    """A scheduled sequence as the plain record the runner reads (after its slots were allocated); a draft model's
    mirrors are scheduled by the same rule (workers/spec/draft_model.py). A tree cut short keeps its first drafts:
    they are in topological order, so they are still a tree."""
    start = seq.num_computed_tokens
    if num_new_tokens == 1:  # a decode: index the token, don't build the whole token list
        num_prompt = seq.num_prompt_tokens
        token_ids = (seq.prompt_token_ids[start] if start < num_prompt else seq.output_token_ids[start - num_prompt],)
    else:
        token_ids = tuple(seq.token_ids[start:start + num_new_tokens])
    return ScheduledRequest(
        request_id=seq.request_id, token_ids=token_ids, start_position=start, block_table=tuple(seq.block_table),
        num_evicted_tokens=seq.num_evicted_tokens, num_known_tokens=seq.num_tokens, in_prefill=not seq.prefill_done,
        params=seq.params, generator=seq.generator, forced_token_id=seq.forced_next_token,
        draft_token_ids=draft_token_ids, draft_parents=draft_parents,
        draft_probs=seq.draft_probs[:len(draft_token_ids)] if draft_token_ids and seq.draft_probs is not None else None)


def _output(seq: Sequence, new_token_ids: list[int], text_delta: str, logprobs: list[TokenLogprobs],
            finished: bool) -> RequestOutput:
    return RequestOutput(
        request_id=seq.request_id, new_token_ids=new_token_ids, new_text=text_delta, finished=finished,
        finish_reason=seq.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens, num_output_tokens=seq.num_output_tokens, logprobs=logprobs,
        num_draft_tokens=seq.num_draft_tokens, num_accepted_tokens=seq.num_accepted_tokens)
