"""Speculator: the step hook that drafts. Before each schedule it asks the drafter for every decoding request's
next tokens (what the policy allows) and leaves them on the Sequence for the scheduler; after the step it folds
the verification into acceptance statistics.

Who drafts: a running request whose prompt is done and whose one new token is its last (a decode), that did
not opt out (SamplingParams.speculative), is not teacher-forced, and has room: drafts never reach past
max_tokens or the context window, so a verify pass never computes a position the plain decode could not. How
many: the policy's plan (workers/spec/policy.py), from each request's acceptance rate and the step cost model
the engine feeds with every decode step's time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from workers.config import EngineConfig
from workers.model.loader import LoadedModel
from workers.sequence import Sequence
from workers.spec.drafter import DraftRequest, Drafter, PromptFeatures
from workers.spec.policy import AcceptanceTracker, Candidate, CostAwarePolicy, FixedPolicy, StepCostModel
from workers.spec.tree import check_parents, is_chain
from workers.step import ModelOutput, SchedulerOutput


# A request's acceptance before any of its drafts was verified, and where a request that stopped drafting drifts
# back to. Optimistic on purpose: each request's own text decides (a code edit and a chat answer on one tier
# differ by 3x), and a policy that never drafts never learns that it should.
OPTIMISTIC_ACCEPTANCE = 0.8


@dataclass
class SpecStats:
    """Lifetime counters of one engine (the tier's metrics)."""

    num_verify_passes: int = 0  # request-steps that verified drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # tokens those passes produced (accepted + one each)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verify pass (1 = drafting bought nothing; k + 1 = every draft accepted)."""
        return self.num_emitted_tokens / self.num_verify_passes if self.num_verify_passes else 0.0


class Speculator:
    def __init__(self, drafter: Drafter, policy: FixedPolicy | CostAwarePolicy, max_model_len: int,
                 cost: StepCostModel | None = None):
        self.drafter = drafter
        self.policy = policy
        self.max_model_len = max_model_len
        self.cost = cost or StepCostModel()
        self.stats = SpecStats()
        self.acceptance = AcceptanceTracker(rate=OPTIMISTIC_ACCEPTANCE, decay=0.98)  # across requests (a metric)
        self._trackers: dict[str, AcceptanceTracker] = {}

    def propose(self, running: list[Sequence]) -> None:
        """Set draft_token_ids on every running request (empty where it does not draft this step)."""
        decoding = [seq for seq in running if seq.prefill_done and seq.num_tokens - seq.num_computed_tokens == 1]
        for seq in running:
            seq.draft_token_ids, seq.draft_probs, seq.draft_parents = (), None, ()
        candidates: list[Candidate] = []
        askers: list[Sequence] = []
        for seq in decoding:
            params = seq.params
            if not params.speculative or params.forced_token_ids:
                continue
            room = min(params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens)
            if room <= 0:
                continue
            tracker = self._trackers.setdefault(seq.request_id, AcceptanceTracker(rate=OPTIMISTIC_ACCEPTANCE))
            candidates.append(Candidate(tracker.rate, room))
            askers.append(seq)
        num_rows = sum(min(seq.num_tokens - seq.num_computed_tokens, 1) for seq in running)
        plan = self.policy.plan(candidates, len(running), num_rows)
        asks = []
        drafting = []
        for seq, candidate, num_drafts in zip(askers, candidates, plan):
            if num_drafts:
                asks.append(DraftRequest(seq.request_id, seq.token_ids, num_drafts))
                drafting.append(seq)
            else:  # not drafting teaches nothing: drift back up, so that it is tried again before long
                tracker = self._trackers[seq.request_id]
                tracker.rate += 0.05 * (OPTIMISTIC_ACCEPTANCE - tracker.rate)
        if not asks:
            return
        started = time.perf_counter()
        drafts = self.drafter.propose(asks)
        self.cost.add_drafting(sum(len(d.token_ids) for d in drafts), time.perf_counter() - started)
        for seq, draft in zip(drafting, drafts):
            seq.draft_token_ids, seq.draft_probs = draft.token_ids, draft.probs
            if draft.parents and not is_chain(draft.parents):
                check_parents(draft.parents, len(draft.token_ids))
                if draft.probs is not None:
                    raise ValueError(f"drafter {self.drafter.name!r}: a draft tree's drafts must be point masses")
                seq.draft_parents = draft.parents

    def step_timed(self, num_rows: int, seconds: float, decode_only: bool) -> None:
        """The engine's forward pass took `seconds` for `num_rows` rows: what the cost model learns from."""
        if decode_only:
            self.cost.add_step(num_rows, seconds)

    @property
    def capture_layer_ids(self) -> tuple[int, ...]:
        """Target layers whose input the drafter reads (EAGLE-3); () for drafters that read tokens only."""
        return getattr(self.drafter, "capture_layer_ids", ())

    def observe(self, scheduler_output: SchedulerOutput, model_output: ModelOutput) -> None:
        """Fold the step's verifications into the per-request trackers and the engine's counters; hand the step's
        by-products (captured states) to a drafter that reads them."""
        drafter_observe = getattr(self.drafter, "observe", None)
        if drafter_observe is not None:
            drafter_observe(scheduler_output, model_output)
        scheduled = scheduler_output.scheduled
        for index, token_ids in zip(model_output.sampled, model_output.token_ids):
            request = scheduled[index]
            num_drafts = len(request.draft_token_ids)
            if not num_drafts:
                continue
            num_accepted = len(token_ids) - 1
            self.stats.num_verify_passes += 1
            self.stats.num_draft_tokens += num_drafts
            self.stats.num_accepted_tokens += num_accepted
            self.stats.num_emitted_tokens += len(token_ids)
            self.acceptance.add(num_drafts, num_accepted)
            tracker = self._trackers.get(request.request_id)
            if tracker is not None:
                tracker.add(num_drafts, num_accepted)

    def imported(self, request_id: str, features: PromptFeatures) -> None:
        """A prompt prefilled elsewhere joined: give the drafter what the prefill tier captured for it."""
        add_features = getattr(self.drafter, "add_features", None)
        if add_features is not None:
            add_features(request_id, features.start_position, features.features)

    def forget(self, request_id: str) -> None:
        self._trackers.pop(request_id, None)
        self.drafter.forget(request_id)


def make_drafter(config: EngineConfig, loaded: LoadedModel) -> Drafter:
    """The drafter `config.speculative` names, for an engine of this config over this loaded target."""
    spec = config.speculative
    vocab_size = loaded.config.vocab_size
    if spec.method == "ngram":
        from workers.spec.ngram import NgramDrafter

        return NgramDrafter(spec.ngram_min, spec.ngram_max, spec.tree_width)
    if spec.method == "draft_model":
        from workers.config import EvictionConfig, SpeculativeConfig
        from workers.engine import Engine
        from workers.spec.draft_model import DraftModelDrafter

        draft = Engine(config.model_copy(update={
            "model": spec.draft_model, "kv_cache_memory_mb": spec.draft_kv_cache_memory_mb, "num_kv_blocks": None,
            "enable_prefix_caching": False, "speculative": SpeculativeConfig(), "freeze_gc_heap": False,
            "kv_eviction": EvictionConfig(), "kv_codec": "auto", "kv_calibration": None, "kv_exclude_layers": ()}))
        draft_vocab = draft.loaded.config.vocab_size
        if draft_vocab != vocab_size:
            raise ValueError(f"speculative.draft_model has a {draft_vocab}-token vocabulary; the target's has "
                             f"{vocab_size}: a draft model must share the target's tokenizer")
        return DraftModelDrafter(draft)
    if spec.method == "eagle3":
        from workers.spec.eagle3 import load_head_for
        from workers.spec.eagle3_drafter import Eagle3Drafter

        return Eagle3Drafter(load_head_for(loaded, spec.eagle_head), tree_width=spec.tree_width)
    raise ValueError(f"unknown speculative method {spec.method!r}")


def make_policy(config: EngineConfig, cost: StepCostModel) -> FixedPolicy | CostAwarePolicy:
    spec = config.speculative
    if spec.policy == "fixed":
        return FixedPolicy(spec.num_speculative_tokens, spec.max_batch_size)
    return CostAwarePolicy(spec.num_speculative_tokens, spec.max_batch_size, cost)
