"""Speculator: the step hook that drafts. Before each schedule it asks the drafter for every decoding request's
next tokens (what the policy allows) and leaves them on the Sequence for the scheduler; after the step it folds
the verification into acceptance statistics.

Who drafts: a running request whose prompt is done and whose one new token is its last (a decode), that did
not opt out (SamplingParams.speculative), is not teacher-forced, and has room: drafts never reach past
max_tokens or the context window, so a verify pass never computes a position the plain decode could not.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.config import EngineConfig
from workers.model.loader import LoadedModel
from workers.sequence import Sequence
from workers.spec.drafter import DraftRequest, Drafter, PromptFeatures
from workers.spec.policy import AcceptanceTracker, SpecPolicy
from workers.step import ModelOutput, SchedulerOutput


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
    def __init__(self, drafter: Drafter, policy: SpecPolicy, max_model_len: int):
        self.drafter = drafter
        self.policy = policy
        self.max_model_len = max_model_len
        self.stats = SpecStats()
        self._trackers: dict[str, AcceptanceTracker] = {}

    def propose(self, running: list[Sequence]) -> None:
        """Set draft_token_ids on every running request (empty where it does not draft this step)."""
        decoding = [seq for seq in running if seq.prefill_done and seq.num_tokens - seq.num_computed_tokens == 1]
        for seq in running:
            seq.draft_token_ids, seq.draft_probs = (), None
        # The batch is every running request: a prefill chunk in the step costs the pass as much as decode rows.
        if not decoding or not self.policy.batch_allows(len(running)):
            return
        asks: list[DraftRequest] = []
        askers: list[Sequence] = []
        for seq in decoding:
            params = seq.params
            if not params.speculative or params.forced_token_ids:
                continue
            room = min(params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens)
            tracker = self._trackers.setdefault(seq.request_id, AcceptanceTracker())
            num_draft_tokens = self.policy.num_draft_tokens(tracker, room)
            if num_draft_tokens:
                asks.append(DraftRequest(seq.request_id, seq.token_ids, num_draft_tokens))
                askers.append(seq)
        if not asks:
            return
        for seq, draft in zip(askers, self.drafter.propose(asks)):
            seq.draft_token_ids, seq.draft_probs = draft.token_ids, draft.probs

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

        return NgramDrafter(spec.ngram_min, spec.ngram_max)
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

        return Eagle3Drafter(load_head_for(loaded, spec.eagle_head))
    raise ValueError(f"unknown speculative method {spec.method!r}")
