"""Draft-model drafting: a smaller model with the target's vocabulary, in the same replica, with its own paged KV.

Each drafting request has a mirror Sequence in the draft model's pool. Before proposing, the mirror takes the
target's tokens (prompt + accepted outputs) and rolls num_computed_tokens back to the longest prefix it computed
that still agrees (its rejected drafts' K/V is overwritten next, as in the target); then k small steps catch it
up and decode k greedy tokens, batched across requests. The first proposal prefills the prompt locally: on a
decode tier that is the draft model's share of the handoff (the prompt's tokens ride the ticket anyway).

The drafts are the draft model's argmax, proposed as point masses: for greedy requests that is what a greedy
draft model proposes; for sampled ones rejection sampling with point masses keeps the target distribution
exactly (workers/spec/verify.py), at some acceptance cost against drafting from q.

The draft pool has no prefix cache: a rolled-back block may be rewritten with other tokens, so no block may be
published under a hash. A request the draft pool cannot hold proposes nothing (drafting never preempts).

# k=drafts per request this step
"""

from __future__ import annotations

from typing import Sequence as Seq

from workers.engine import Engine
from workers.sampling_params import SamplingParams
from workers.scheduler import schedule_record
from workers.sequence import Sequence
from workers.spec.drafter import Draft, DraftRequest
from workers.step import ModelInput

_GREEDY = SamplingParams(max_tokens=1 << 30, temperature=0, ignore_eos=True)


class DraftModelDrafter:
    name = "draft_model"

    def __init__(self, engine: Engine):
        """engine: the draft model's engine (its runner and KV pool are used; its scheduler is not)."""
        if engine.pool.enable_prefix_caching:
            raise ValueError("the draft model's engine must run without a prefix cache")
        self.engine = engine
        self.mirrors: dict[str, Sequence] = {}

    def propose(self, requests: Seq[DraftRequest]) -> list[Draft]:
        active: list[tuple[int, Sequence, int]] = []  # (request index, mirror, drafts wanted)
        for index, request in enumerate(requests):
            mirror = self._sync(request)
            if mirror is not None:
                active.append((index, mirror, request.num_draft_tokens))
        drafts: list[list[int]] = [[] for _ in requests]
        for round_index in range(max((wanted for _, _, wanted in active), default=0)):
            stepping = [(index, mirror) for index, mirror, wanted in active if round_index < wanted]
            scheduled, kept = [], []
            for index, mirror in stepping:
                num_new = mirror.num_tokens - mirror.num_computed_tokens
                if self.engine.kv.allocate_slots(mirror, num_new):
                    scheduled.append(schedule_record(mirror, num_new))
                    kept.append((index, mirror))
                else:
                    self.forget(mirror.request_id)  # the pool is short: this request drafts no further now
            if not scheduled:
                break
            output = self.engine.runner.execute(ModelInput(tuple(scheduled)))
            for (index, mirror), request, token_ids in zip(kept, scheduled, output.token_ids):
                mirror.num_computed_tokens += request.num_new_tokens
                mirror.output_token_ids.append(token_ids[0])
                drafts[index].append(token_ids[0])
            active = [(index, mirror, wanted) for index, mirror, wanted in active if mirror.request_id in self.mirrors]
        return [Draft(tuple(tokens)) for tokens in drafts]

    def _sync(self, request: DraftRequest) -> Sequence | None:
        """The request's mirror, holding the target's tokens and no computed token that disagrees with them."""
        token_ids = list(request.token_ids)
        mirror = self.mirrors.get(request.request_id)
        if mirror is None or mirror.prompt_token_ids != token_ids[:mirror.num_prompt_tokens]:
            if mirror is not None:
                self.forget(request.request_id)
            mirror = Sequence(request_id=request.request_id, prompt_token_ids=token_ids, params=_GREEDY,
                              arrival_time=0.0)
            self.mirrors[request.request_id] = mirror
            return mirror
        known = mirror.token_ids
        agree = 0
        limit = min(len(known), len(token_ids), mirror.num_computed_tokens)
        while agree < limit and known[agree] == token_ids[agree]:
            agree += 1
        mirror.output_token_ids = token_ids[mirror.num_prompt_tokens:]
        mirror.num_computed_tokens = min(agree, len(token_ids) - 1)  # the last token is computed to sample
        return mirror

    def forget(self, request_id: str) -> None:
        mirror = self.mirrors.pop(request_id, None)
        if mirror is not None:
            self.engine.kv.free(mirror)
