"""EvictionHook: value-aware (and every other) KV eviction as one hook on the engine step (workers/step.py).

It owns everything eviction needs beside the block tables: which requests keep scores and how (their
ScoreSpec), their block scores, the per-token value weights, and the policy. Through the step:
  plan         which chunks' last queries vote (the observation window) and a probe for the attention;
  observe      fold the probe's votes (window and decode mass) into the requests' scores;
  after_update evict the blocks over budget of every request still running, once its prefill is over.
Attention, the runner, the scheduler and Sequence know nothing of it (the runner only routes the rows
`observe_windows` names through the prefill path).

# V=voters (layers x KV heads), nb=blocks a vote covers
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from workers.kv.block_scores import ScoreCollector, ScoreSpec, TokenWeightStore
from workers.kv.codecs import KVCodec, LayerPages
from workers.kv.eviction import EvictionCandidate, EvictionPolicy
from workers.kv.manager import KVCacheManager
from workers.sequence import Sequence
from workers.step import ModelInput, ModelOutput, SchedulerOutput


class EvictionHook:
    def __init__(self, policy: EvictionPolicy, kv: KVCacheManager, requests: Mapping[str, Sequence],
                 weight_store: TokenWeightStore | None, output_maps: list[torch.Tensor] | None):
        self.policy = policy
        self.kv = kv
        self.block_size = kv.block_size
        self.requests = requests  # the scheduler's live (waiting or running) requests, read-only here
        self.weight_store = weight_store  # value weights written with every token, when votes are weighted
        self.output_maps = output_maps
        self._specs: dict[str, ScoreSpec] = {}  # requests that keep scores
        self._scores: dict[str, torch.Tensor] = {}  # request id -> [V, <= held blocks] float32 votes
        self.num_evicted_blocks = 0  # lifetime count (a metric)

    # ---- requests ---------------------------------------------------------------------------------
    def track(self, seq: Sequence, spec: ScoreSpec | None) -> None:
        """A new request; `spec` says how its scores are fed (None: it keeps none)."""
        self._scores.pop(seq.request_id, None)
        if spec is None:
            self._specs.pop(seq.request_id, None)
            return
        self._specs[seq.request_id] = spec
        # A prefix-cache hit must leave the window's tokens to compute: their queries vote.
        seq.min_uncached_tokens = max(1, spec.observe_window)

    def forget(self, request_id: str) -> None:
        self._specs.pop(request_id, None)
        self._scores.pop(request_id, None)

    def scores_of(self, request_id: str) -> torch.Tensor | None:
        """[V, nb] a copy of the request's votes (a held prompt's, for the decode tier), or None."""
        scores = self._scores.get(request_id)
        return scores.clone() if scores is not None else None

    def imported(self, seq: Sequence, block_scores: torch.Tensor | None, codec: KVCodec,
                 kv_pages: list[LayerPages], device: torch.device) -> None:
        """An imported prompt joined: take the prefill tier's votes; derive its value weights from the pages."""
        if block_scores is not None and seq.request_id in self._specs:
            self._scores[seq.request_id] = block_scores.float().cpu()
        if self.weight_store is not None:
            # Value weights are written with the K/V; imported pages were written elsewhere, so derive them from
            # the decoded pages once, here.
            block_ids = torch.tensor(seq.block_table, dtype=torch.long, device=device)
            for layer, pages in enumerate(kv_pages):
                self.weight_store.write_blocks(layer, seq.block_table, codec.gather(pages, block_ids)[1])

    # ---- the step ---------------------------------------------------------------------------------
    def plan(self, scheduler_output: SchedulerOutput) -> ModelInput:
        for request_id in scheduler_output.preempted_ids:
            self._scores.pop(request_id, None)  # its blocks are gone; a recompute votes afresh
        requests = scheduler_output.scheduled
        if not self._specs and self.weight_store is None:
            return ModelInput(requests)
        windows: dict[int, int] = {}
        for index, request in enumerate(requests):
            spec = self._specs.get(request.request_id)
            if spec is not None and request.in_prefill:
                # The window is the last W known tokens' queries; chunked prefill may split it, and each chunk
                # votes with its share (causal, so the sum is what one unchunked window would give).
                window_start = max(request.start_position, request.num_known_tokens - spec.observe_window)
                windows[index] = max(0, request.end_position - window_start)
        model_input = ModelInput(requests, windows)
        weightings = {index: self._specs[requests[index].request_id].weighting
                      for index, window in windows.items() if window}
        collect_decode = any(model_input.is_decode_row(index) and request.request_id in self._specs
                             for index, request in enumerate(requests))
        if self.weight_store is None and not weightings and not collect_decode:
            return model_input
        probe = ScoreCollector(block_size=self.block_size, collect_decode=collect_decode, store=self.weight_store,
                               maps=self.output_maps, weightings=weightings)
        return ModelInput(requests, windows, probe)

    def observe(self, model_input: ModelInput, model_output: ModelOutput) -> None:
        probe = model_input.probe
        if probe is None:
            return
        requests = model_input.requests
        for observer in probe.observed_layers:
            self._add(requests[observer].request_id, probe.observed(observer).cpu())
        decode_mass = probe.decode_mass
        if decode_mass is None:
            return
        decode_mass = decode_mass.cpu()
        previous = -1
        for row, index in enumerate(model_output.decode_rows):
            # Decode rows are true decodes here: plan() sends a scored request's prefill through the prefill path.
            # A decode with drafts votes with its first row only (the token it decodes; drafts may be rejected).
            if index == previous:
                continue
            previous = index
            request = requests[index]
            spec = self._specs.get(request.request_id)
            if spec is not None and spec.accumulate_decode:
                self._add(request.request_id, decode_mass[row, :, :len(request.block_table)])

    def after_update(self, scheduler_output: SchedulerOutput) -> None:
        for request in scheduler_output.scheduled:
            seq = self.requests.get(request.request_id)  # None: it finished this step
            if seq is not None:
                self.evict_over_budget(seq)

    def evict_over_budget(self, seq: Sequence) -> None:
        """Evict once prefill is done (the window has voted and a token was sampled), while the sequence runs."""
        if seq.is_finished or seq.hold_kv or not seq.prefill_done:
            return
        table = seq.block_table
        num_evicted_blocks = seq.num_evicted_tokens // self.block_size
        # Checked first: under budget (most steps), no candidate is built (its shared flags walk the whole table).
        if self.policy.num_over_budget(len(table), num_evicted_blocks) <= 0:
            return
        scores = self._scores.get(seq.request_id)
        candidate = EvictionCandidate(
            request_id=seq.request_id, num_blocks=len(table), num_evicted_blocks=num_evicted_blocks,
            shared=tuple(self.kv.is_shared(block) for block in table),
            scores=_fit(scores, len(table)) if scores is not None else None)
        indices = self.policy.select(candidate)
        if not indices:
            return
        self.kv.evict(seq, indices)
        if scores is not None:
            dropped = set(indices)
            keep = torch.tensor([index not in dropped for index in range(scores.shape[-1])])
            self._scores[seq.request_id] = scores[:, keep]
        self.num_evicted_blocks += len(indices)

    def _add(self, request_id: str, votes: torch.Tensor) -> None:
        """votes [V, nb] over the request's first nb held blocks."""
        previous = self._scores.get(request_id)
        if previous is None:
            self._scores[request_id] = votes.clone()
        else:
            length = max(previous.shape[-1], votes.shape[-1])
            self._scores[request_id] = _fit(previous, length) + _fit(votes, length)


def _fit(scores: torch.Tensor, length: int) -> torch.Tensor:
    """Scores [V, n] padded with zeros (blocks written since the last vote) or cut to `length` blocks."""
    if scores.shape[-1] >= length:
        return scores[:, :length]
    return torch.cat([scores, scores.new_zeros(scores.shape[0], length - scores.shape[-1])], dim=-1)
