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
        """Catch every ready request up over its new positions, then draft k tokens; the head's matmuls run once
        per draft depth for all requests together (only the attention is per request: each has its own K/V)."""
        head = self.head
        drafts: list[list[int]] = [[] for _ in requests]
        ready = []  # (request index, state, last)
        rows = []
        for index, request in enumerate(requests):
            state = self.states.get(request.request_id)
            last = len(request.token_ids) - 1  # n: the known token the next target step computes
            if state is None or not state.pending or state.pending_start != state.num_cached or \
                    state.pending_end != last:
                continue  # features missing (not captured, or arriving from elsewhere): no draft this step
            start = state.num_cached
            features = torch.cat(state.pending)
            state.pending, state.pending_start = [], last
            ready.append((index, state, last))
            rows.append((state, torch.tensor(request.token_ids[start + 1:last + 1], dtype=torch.long),
                         head.fuse(features), torch.arange(start, last), True))
        depth = 0
        while rows:
            results = self._step(rows)
            next_rows = []
            for (index, state, last), (fed, logits) in zip(ready, results):
                drafts[index].append(int(head.to_target_ids(logits[-1].argmax())))
                if len(drafts[index]) < requests[index].num_draft_tokens:
                    next_rows.append((state, torch.tensor([drafts[index][-1]]), fed[-1:],
                                      torch.tensor([last + depth]), False))
            ready = [entry for entry in ready if len(drafts[entry[0]]) < requests[entry[0]].num_draft_tokens]
            rows = next_rows
            depth += 1
        return [Draft(tuple(tokens)) for tokens in drafts]

    def _step(self, rows: list[tuple[_HeadState, torch.Tensor, torch.Tensor, torch.Tensor, bool]]
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the head's layer over several requests' rows at once: per request (state, token_ids [n], hidden
        [n, E], positions [n] consecutive, cached) -> (fed-back states [n, E], draft logits [n, Vd]). A request's
        rows attend to its K/V before them and to each other causally; cached=True: they come from true
        features, and their K/V stays."""
        head = self.head
        hidden = torch.cat([row[2] for row in rows])
        query, key, value = head.qkv(torch.cat([row[1] for row in rows]), hidden,
                                     torch.cat([row[3] for row in rows]))
        outs = []
        offset = 0
        for state, token_ids, _, positions, cached in rows:
            count = token_ids.shape[0]
            first, end = int(positions[0]) - state.base, int(positions[-1]) + 1 - state.base
            self._reserve(state, end)
            state.keys[first:end] = key[offset:offset + count]
            state.values[first:end] = value[offset:offset + count]
            if cached:
                state.num_cached = end + state.base
            outs.append(causal_attention(query[offset:offset + count], state.keys[:end], state.values[:end],
                                         head.scale))  # [n, H, D]
            offset += count
        out = torch.cat(outs)
        fed, logits = head.finish(hidden, out.reshape(out.shape[0], -1))
        sizes = [row[1].shape[0] for row in rows]
        return list(zip(fed.split(sizes), logits.split(sizes)))

    def _rows(self, state: _HeadState, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
              cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's rows (what _step does for many)."""
        return self._step([(state, token_ids, hidden, positions, cached)])[0]

    @staticmethod
    def _reserve(state: _HeadState, end: int) -> None:
        if end > state.keys.shape[0]:
            grown = max(end, 2 * state.keys.shape[0])
            state.keys = torch.cat([state.keys, state.keys.new_empty(grown - state.keys.shape[0],
                                                                     *state.keys.shape[1:])])
            state.values = torch.cat([state.values, state.values.new_empty(grown - state.values.shape[0],
                                                                           *state.values.shape[1:])])

    def forget(self, request_id: str) -> None:
        self.states.pop(request_id, None)
