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

With tree_width W > 1 it drafts a tree (EAGLE-2's dynamic tree): the root's top-W tokens, then at each depth every
frontier node proposes its top-W children, scored by the path's summed log-probability, and the W best become the
next frontier; the num_draft_tokens best nodes overall are the tree (a path's score never rises, so they are one).
Speculative nodes' K/V sits in slots past the true positions, one per node, and each row attends to the true
prefix and its own ancestors through an explicit mask. Expansion stops early once no frontier node could still
enter the final selection.

# n=known tokens - 1, P=pending positions, E=hidden, C*Et=captured width, Hkv=KV heads, D=head dim
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from workers.attention import causal_attention
from workers.spec.drafter import Draft, DraftRequest
from workers.spec.eagle3 import Eagle3Head
from workers.spec.tree import ROOT
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

    def __init__(self, head: Eagle3Head, max_pending: int = 8192, tree_width: int = 1):
        self.head = head
        self.capture_layer_ids = head.config.aux_layer_ids
        self.max_pending = max_pending
        self.tree_width = tree_width
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
        if self.tree_width > 1:
            return self._propose_trees(requests)
        head = self.head
        drafts: list[list[int]] = [[] for _ in requests]
        ready, rows = self._catch_up(requests)
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

    def _catch_up(self, requests: Sequence[DraftRequest]) -> tuple[list, list]:
        """The requests whose features are all in, as (request index, state, last) and their catch-up rows."""
        head = self.head
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
        return ready, rows

    # ---- trees ---------------------------------------------------------------------------------------------------
    def _propose_trees(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        head = self.head
        width = self.tree_width
        drafts = [Draft(()) for _ in requests]
        ready, rows = self._catch_up(requests)
        if not rows:
            return drafts
        trees = []
        for (index, state, last), (fed, logits) in zip(ready, self._step(rows)):
            tree = _DraftTree(state, last, requests[index].num_draft_tokens)
            tree.expand([(ROOT, fed[-1], logits[-1])], width, head)
            trees.append((index, tree))
        while True:
            growing = [tree for _, tree in trees if tree.frontier]
            if not growing:
                break
            entries = [tree.frontier_rows() for tree in growing]
            results = self._tree_step(entries)
            for tree, (fed, logits) in zip(growing, results):
                tree.expand([(node, fed[row], logits[row]) for row, node in enumerate(tree.frontier)], width, head)
        for index, tree in trees:
            drafts[index] = tree.draft()
        return drafts

    def _tree_step(self, entries: list[tuple[_HeadState, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tree rows of several requests at once: per request (state, token_ids [n], hidden [n, E], positions [n],
        slots [n] (K/V rows, relative to state.base), mask [n, L] bool over K/V rows 0..L-1) -> (fed [n, E],
        logits [n, Vd])."""
        head = self.head
        hidden = torch.cat([entry[2] for entry in entries])
        query, key, value = head.qkv(torch.cat([entry[1] for entry in entries]), hidden,
                                     torch.cat([entry[3] for entry in entries]))
        outs = []
        offset = 0
        for state, token_ids, _, _, slots, mask in entries:
            count = token_ids.shape[0]
            self._reserve(state, int(slots.max()) + 1)
            state.keys[slots] = key[offset:offset + count]
            state.values[slots] = value[offset:offset + count]
            length = mask.shape[1]
            out = F.scaled_dot_product_attention(
                query[offset:offset + count].transpose(0, 1).unsqueeze(0),
                state.keys[:length].transpose(0, 1).unsqueeze(0), state.values[:length].transpose(0, 1).unsqueeze(0),
                attn_mask=mask, scale=head.scale, enable_gqa=True)  # [1, H, n, D]
            outs.append(out.squeeze(0).transpose(0, 1))  # [n, H, D]
            offset += count
        out = torch.cat(outs)
        fed, logits = head.finish(hidden, out.reshape(out.shape[0], -1))
        sizes = [entry[1].shape[0] for entry in entries]
        return list(zip(fed.split(sizes), logits.split(sizes)))

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


class _DraftTree:
    """One request's tree while it grows: nodes (target token, parent node, summed log-probability, depth), the
    frontier still to expand, and each frontier node's fed-back head state. Node n's head K/V sits at row
    (last - base) + n of the request's K/V."""

    def __init__(self, state: _HeadState, last: int, budget: int):
        self.state = state
        self.last = last
        self.budget = budget
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []
        self.depths: list[int] = []
        self.frontier: list[int] = []
        self.fed: dict[int, torch.Tensor] = {}  # frontier node -> the head state its row feeds from

    def expand(self, expanded: list[tuple[int, torch.Tensor, torch.Tensor]], width: int, head: Eagle3Head) -> None:
        """(node, its fed-back state [E], its draft logits [Vd]) for every node just run: their best children
        become nodes, the `width` best of those the next frontier."""
        candidates = []  # (score, parent, target token, the parent's fed state)
        for node, fed, logits in expanded:
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            top = log_probs.topk(min(width, log_probs.shape[0]))
            base = self.scores[node] if node != ROOT else 0.0
            for log_prob, draft_id in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((base + log_prob, node, int(head.to_target_ids(torch.tensor(draft_id))), fed))
        candidates.sort(key=lambda candidate: -candidate[0])
        # A node the final selection cannot take is not worth a row: stop at the budget-th best score so far.
        cutoff = sorted(self.scores, reverse=True)[self.budget - 1] if len(self.scores) >= self.budget else None
        self.frontier, self.fed = [], {}
        for score, parent, token, fed in candidates[:width]:
            if cutoff is not None and score <= cutoff:
                break
            node = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.scores.append(score)
            self.depths.append(1 if parent == ROOT else self.depths[parent] + 1)
            if self.depths[node] < self.budget:
                self.frontier.append(node)
                self.fed[node] = fed

    def frontier_rows(self) -> tuple:
        """The frontier's rows for Eagle3Drafter._tree_step: node n feeds (its token, its parent's fed state) at
        position last + depth - 1, into K/V row (last - base) + n, seeing the true prefix and its ancestors."""
        state, first_slot = self.state, self.last - self.state.base
        nodes = self.frontier
        length = first_slot + len(self.tokens)
        mask = torch.zeros(len(nodes), length, dtype=torch.bool)
        mask[:, :first_slot] = True
        for row, node in enumerate(nodes):
            ancestor = node
            while ancestor != ROOT:
                mask[row, first_slot + ancestor] = True
                ancestor = self.parents[ancestor]
        return (state, torch.tensor([self.tokens[node] for node in nodes]),
                torch.stack([self.fed[node] for node in nodes]),
                torch.tensor([self.last + self.depths[node] - 1 for node in nodes]),
                torch.tensor([first_slot + node for node in nodes]), mask)

    def draft(self) -> Draft:
        """The budget best nodes, breadth first (parents before children), as a Draft with parents."""
        chosen = sorted(range(len(self.tokens)), key=lambda node: (-self.scores[node], node))[:self.budget]
        order = sorted(chosen, key=lambda node: (self.depths[node], -self.scores[node], node))
        position = {node: index for index, node in enumerate(order)}
        return Draft(tuple(self.tokens[node] for node in order),
                     parents=tuple(ROOT if self.parents[node] == ROOT else position[self.parents[node]]
                                   for node in order))
