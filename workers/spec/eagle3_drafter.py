"""EAGLE-3 drafting: the head (workers/spec/eagle3.py) over the target's captured states, with its own KV.

Alignment (as vLLM's proposer): the head's row for position i takes (embed(token i+1), fused target features of
position i) and predicts token i+2. So once the target has computed positions < n and token n is known (the
one the next step computes), the head catches up over the positions it has not seen, and its last row gives the
first draft; each further draft feeds back the head's own state at the next position.

Per request the drafter keeps the head's K/V (one layer: [positions, Hkv, D]) for positions computed from TRUE
target features, and the features the target produced since the last proposal. Speculative positions (the
head's own drafts) are written past that and overwritten by the next catch-up: the rollback is a length.
Features arrive with every target step (ModelOutput.aux_hidden, asked for through capture_layer_ids); a request
whose unread features pile past `max_pending` (it has not drafted for that long) stops drafting.

# n=known tokens - 1, P=pending positions, E=hidden, C*Et=captured width, Hkv=KV heads, D=head dim
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from workers.attention import causal_attention
from workers.spec.drafter import Draft, DraftRequest
from workers.spec.eagle3 import Eagle3Head
from workers.step import ModelOutput, SchedulerOutput


@dataclass
class _HeadState:
    keys: torch.Tensor  # [capacity, Hkv, D], row p - base holds position p
    values: torch.Tensor
    base: int  # the first position the head has (a prefix-cache hit computes no features before it)
    num_cached: int  # positions < this have head K/V from true target features
    pending_start: int  # position of the first pending feature
    pending: list[torch.Tensor] = field(default_factory=list)  # [rows, C*Et] chunks, contiguous from pending_start

    @property
    def pending_end(self) -> int:
        return self.pending_start + sum(chunk.shape[0] for chunk in self.pending)


class Eagle3Drafter:
    name = "eagle3"

    def __init__(self, head: Eagle3Head, max_pending: int = 8192):
        self.head = head
        self.capture_layer_ids = head.config.aux_layer_ids
        self.max_pending = max_pending
        self.states: dict[str, _HeadState] = {}

    # ---- features in ---------------------------------------------------------------------------------------------
    def observe(self, scheduler_output: SchedulerOutput, model_output: ModelOutput) -> None:
        """Keep the captured features of every position the step computed for good (accepted drafts included)."""
        if model_output.aux_hidden is None:
            return
        accepted = {index: len(tokens) - 1 for index, tokens in zip(model_output.sampled, model_output.token_ids)}
        for index, request in enumerate(scheduler_output.scheduled):
            num_rows = request.num_new_tokens + (accepted.get(index, 0) if request.draft_token_ids else 0)
            first = model_output.first_rows[index]
            self.add_features(request.request_id, request.start_position,
                              model_output.aux_hidden[first:first + num_rows])

    def add_features(self, request_id: str, start_position: int, features: torch.Tensor) -> None:
        """features [rows, C*Et] of positions start_position... (a prefill tier's, on import)."""
        state = self.states.get(request_id)
        if state is None or start_position < state.base:
            # The head attends over the positions it has features for: from here on (a prefix-cache hit's
            # positions were never computed, so neither tier has their features).
            config = self.head.config
            capacity = max(64, features.shape[0] * 2)
            state = _HeadState(keys=torch.empty(capacity, config.num_kv_heads, config.head_dim),
                               values=torch.empty(capacity, config.num_kv_heads, config.head_dim),
                               base=start_position, num_cached=start_position, pending_start=start_position)
            self.states[request_id] = state
        if start_position < state.pending_end:  # a recompute (preemption) or a rollback: forget what follows
            self._truncate(state, start_position)
        if start_position != state.pending_end:
            self.forget(request_id)  # a gap: the head could not attend over it
            return
        state.pending.append(features.detach().to(torch.float32))
        if state.pending_end - state.pending_start > self.max_pending:
            self.forget(request_id)

    def _truncate(self, state: _HeadState, position: int) -> None:
        state.num_cached = min(state.num_cached, position)
        if position <= state.pending_start:
            state.pending, state.pending_start = [], min(state.pending_start, position)
            return
        kept = torch.cat(state.pending)[:position - state.pending_start]
        state.pending = [kept]

    # ---- drafts out ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [Draft(self._draft(request)) for request in requests]

    def _draft(self, request: DraftRequest) -> tuple[int, ...]:
        state = self.states.get(request.request_id)
        last = len(request.token_ids) - 1  # n: the known token the next target step computes
        if state is None or state.pending_start != state.num_cached or state.pending_end != last:
            return ()  # features missing (not captured, or arriving from elsewhere): no draft this step
        head = self.head
        features = torch.cat(state.pending) if state.pending else None
        if features is None:
            return ()
        start = state.num_cached
        token_ids = torch.tensor(request.token_ids[start + 1:last + 1], dtype=torch.long)
        hidden = head.fuse(features)  # [P, E], the layer's residual input
        fed, logits = self._rows(state, token_ids, hidden, torch.arange(start, last), cached=True)
        state.pending, state.pending_start = [], last
        drafts = [int(head.to_target_ids(logits[-1].argmax()))]
        state_in = fed[-1:]
        for step in range(1, request.num_draft_tokens):
            fed, logits = self._rows(state, torch.tensor([drafts[-1]]), state_in,
                                     torch.tensor([last + step - 1]), cached=False)
            drafts.append(int(head.to_target_ids(logits[-1].argmax())))
            state_in = fed
        return tuple(drafts)

    def _rows(self, state: _HeadState, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
              cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the head's layer for rows at consecutive positions (attending to its K/V before them and to each
        other causally); cached=True: they come from true features, their K/V stays."""
        head = self.head
        query, key, value = head.qkv(token_ids, hidden, positions)
        first, end = int(positions[0]) - state.base, int(positions[-1]) + 1 - state.base
        if end > state.keys.shape[0]:
            grown = max(end, 2 * state.keys.shape[0])
            state.keys = torch.cat([state.keys, state.keys.new_empty(grown - state.keys.shape[0],
                                                                     *state.keys.shape[1:])])
            state.values = torch.cat([state.values, state.values.new_empty(grown - state.values.shape[0],
                                                                           *state.values.shape[1:])])
        state.keys[first:end], state.values[first:end] = key, value
        if cached:
            state.num_cached = end + state.base
        out = causal_attention(query, state.keys[:end], state.values[:end], head.scale)  # [rows, H, D]
        return head.finish(hidden, out.reshape(out.shape[0], -1))

    def forget(self, request_id: str) -> None:
        self.states.pop(request_id, None)
