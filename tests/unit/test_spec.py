"""Speculative decoding (workers/spec) on a tiny random checkpoint: verification is lossless.

Greedy output with drafts is token-for-token plain decoding's, whatever the drafts are (all right, all wrong,
or mixed), with chunked prefill, preemption, prefix caching and eviction around it; rejected drafts leave no
block behind; stops and max_tokens hold inside an accepted run. Rejection sampling keeps the target
distribution (a statistical test on a small vocabulary).
"""

import random
from typing import Sequence

import pytest
import torch

from tests.unit.test_engine import GREEDY, assert_no_blocks_held, make_engine, random_prompts
from workers.config import EngineConfig, SpeculativeConfig
from workers.engine import Engine
from workers.sampling_params import SamplingParams
from workers.sequence import FinishReason
from workers.spec.drafter import Draft, DraftRequest
from workers.spec.ngram import NgramDrafter, lookup
from workers.spec.policy import FixedPolicy
from workers.spec.speculator import Speculator
from workers.spec.verify import verify_drafts


class ScriptedDrafter:
    """Proposes from known continuations (prompt tuple -> plain decoding's tokens), corrupting each proposed token
    with probability `error_rate`: 0 = every draft accepted, 1 = every draft rejected."""

    name = "scripted"

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], error_rate: float, seed: int = 0,
                 vocab_size: int = 200):
        self.continuations = continuations
        self.error_rate = error_rate
        self.rng = random.Random(seed)
        self.vocab_size = vocab_size
        self.num_proposed = 0

    @classmethod
    def for_runs(cls, prompts: list[list[int]], outputs: list[list[int]], error_rate: float, seed: int = 0):
        """Proposes from these prompts' known outputs."""
        return cls({tuple(prompt): output for prompt, output in zip(prompts, outputs)}, error_rate, seed)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        drafts = []
        for request in requests:
            tokens = list(request.token_ids)
            proposal: tuple[int, ...] = ()
            for prompt, continuation in self.continuations.items():
                if tuple(tokens[:len(prompt)]) == prompt:
                    done = len(tokens) - len(prompt)
                    proposal = tuple(continuation[done:done + request.num_draft_tokens])
            proposal = tuple(self.rng.randrange(3, self.vocab_size) if self.rng.random() < self.error_rate else t
                             for t in proposal)
            self.num_proposed += len(proposal)
            drafts.append(Draft(proposal))
        return drafts

    def forget(self, request_id: str) -> None:
        pass


def with_drafter(engine: Engine, drafter, num_speculative_tokens: int = 4, max_batch_size: int = 64) -> Engine:
    engine.speculator = Speculator(drafter, FixedPolicy(num_speculative_tokens, max_batch_size),
                                   engine.max_model_len)
    return engine


def plain_outputs(tiny_loaded, prompts, params=GREEDY, **overrides) -> list[list[int]]:
    return [c.token_ids for c in make_engine(tiny_loaded, **overrides).generate(prompts, params)]


@pytest.mark.parametrize("error_rate", [0.0, 0.3, 1.0])
def test_greedy_output_is_plain_decoding_whatever_the_drafts(tiny_loaded, error_rate):
    prompts = random_prompts(6, seed=5)
    plain = plain_outputs(tiny_loaded, prompts)
    drafter = ScriptedDrafter.for_runs(prompts, plain, error_rate, seed=1)
    engine = with_drafter(make_engine(tiny_loaded, max_num_batched_tokens=16), drafter)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == plain
    stats = engine.speculator.stats
    assert stats.num_draft_tokens > 50
    if error_rate == 0.0:
        assert stats.num_accepted_tokens == stats.num_draft_tokens
        assert stats.mean_acceptance_length > 3  # k = 4: nearly every pass emits 5 tokens
    if error_rate == 1.0:
        assert stats.num_accepted_tokens < stats.num_draft_tokens * 0.05
    assert_no_blocks_held(engine)


def test_thousands_of_rejections_leak_no_block(tiny_loaded):
    """A small pool, many requests, wrong drafts only: every rejected slot is rolled back; preemption (the pool is
    short) and chunked prefill run around the verify passes."""
    prompts = random_prompts(24, seed=9)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = plain_outputs(tiny_loaded, prompts, params)
    drafter = ScriptedDrafter({}, error_rate=1.0)
    drafter.propose = lambda requests: [Draft(tuple(random.Random(len(r.token_ids)).randrange(3, 200)
                                                    for _ in range(r.num_draft_tokens))) for r in requests]
    engine = with_drafter(make_engine(tiny_loaded, num_kv_blocks=48, max_num_batched_tokens=24), drafter)
    assert [c.token_ids for c in engine.generate(prompts, params)] == plain
    assert engine.speculator.stats.num_draft_tokens - engine.speculator.stats.num_accepted_tokens > 2000
    assert engine.scheduler.num_preemptions > 0
    assert_no_blocks_held(engine)


def test_prefix_cache_never_serves_rejected_drafts(tiny_loaded):
    """Blocks written while drafts were rejected are published with the accepted tokens only: a later request whose
    prompt is an earlier prompt + its output hits the cache and continues exactly as a cold run does."""
    prompt = random_prompts(1, seed=11, min_len=30, max_len=30)[0]
    first = plain_outputs(tiny_loaded, [prompt])[0]
    engine = with_drafter(make_engine(tiny_loaded), ScriptedDrafter({tuple(prompt): first}, error_rate=0.5))
    assert engine.generate([prompt], GREEDY)[0].token_ids == first
    follow_up = prompt + first
    cold = plain_outputs(tiny_loaded, [follow_up], enable_prefix_caching=False)[0]
    completion = engine.generate([follow_up], GREEDY)[0]
    assert completion.num_cached_tokens >= len(prompt)
    assert completion.token_ids == cold
    assert_no_blocks_held(engine)


def test_stops_and_max_tokens_inside_an_accepted_run(tiny_loaded):
    prompts = random_prompts(4, seed=12)
    long_plain = plain_outputs(tiny_loaded, prompts)
    drafter = ScriptedDrafter.for_runs(prompts, long_plain, error_rate=0.0)
    # max_tokens 7 with k = 4: the second pass would emit 5 tokens past the 5th; only 2 may land.
    engine = with_drafter(make_engine(tiny_loaded), drafter)
    short = engine.generate(prompts, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in short] == [out[:7] for out in long_plain]
    assert all(c.finish_reason is FinishReason.LENGTH for c in short)
    # A stop token that plain decoding emits at index 3: the output ends there, however many drafts were accepted.
    stop_token = long_plain[0][3]
    first_stop = long_plain[0].index(stop_token)
    stopped = engine.generate([prompts[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                           stop_token_ids=(stop_token,)))[0]
    assert stopped.token_ids == long_plain[0][:first_stop + 1]
    assert stopped.finish_reason is FinishReason.STOP
    assert_no_blocks_held(engine)


def test_opt_out_and_batch_backoff(tiny_loaded):
    prompts = random_prompts(4, seed=13)
    plain = plain_outputs(tiny_loaded, prompts)
    drafter = ScriptedDrafter.for_runs(prompts, plain, error_rate=0.0)
    engine = with_drafter(make_engine(tiny_loaded), drafter)
    opted_out = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, speculative=False)
    assert [c.token_ids for c in engine.generate(prompts, opted_out)] == plain
    assert drafter.num_proposed == 0 and engine.speculator.stats.num_verify_passes == 0
    # Four running requests (all admitted in the first step), max_batch_size 3: the policy backs off throughout.
    engine = with_drafter(make_engine(tiny_loaded, max_num_batched_tokens=256), drafter, max_batch_size=3)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == plain
    assert engine.speculator.stats.num_verify_passes == 0
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="yes")


def test_seeded_sampling_with_drafts_repeats_itself(tiny_loaded):
    prompts = random_prompts(3, seed=14)
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7, logprobs=2, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = with_drafter(make_engine(tiny_loaded), NgramDrafter(1, 3))
        completions = engine.generate(prompts, params)
        runs.append([(c.token_ids, [lp.token_id for lp in c.logprobs]) for c in completions])
        assert all(len(c.token_ids) == 24 and len(c.logprobs) == 24 for c in completions)
        assert_no_blocks_held(engine)
    assert runs[0] == runs[1]
    assert all(tokens == logprob_tokens for tokens, logprob_tokens in runs[0])


def test_ngram_config_builds_a_speculating_engine(tiny_loaded):
    config = EngineConfig(model=tiny_loaded.path, block_size=4, num_kv_blocks=256,
                          speculative=SpeculativeConfig(method="ngram", ngram_min=1, ngram_max=3))
    engine = Engine(config, loaded=tiny_loaded)
    prompts = random_prompts(4, seed=15)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == plain_outputs(tiny_loaded, prompts)
    assert engine.speculator.stats.num_verify_passes > 0  # a random tiny model repeats itself: lookups hit
    prefill = Engine(config.model_copy(update={"role": "prefill"}), loaded=tiny_loaded)
    assert prefill.speculator is None
    with pytest.raises(ValueError, match="ngram_min"):
        SpeculativeConfig(method="ngram", ngram_min=4, ngram_max=2)


def test_eviction_with_drafts_runs_clean(tiny_loaded):
    """Value-aware eviction drops blocks from the middle of the table while drafts are verified: the held-position
    arithmetic of the verify rows stays in bounds and nothing leaks."""
    from workers.config import EvictionConfig

    prompts = random_prompts(4, seed=16, min_len=30, max_len=40)
    eviction = EvictionConfig(policy="value_aware", budget_blocks=6, sink_blocks=1, recent_blocks=2,
                              observe_window=8)
    engine = with_drafter(make_engine(tiny_loaded, kv_eviction=eviction), NgramDrafter(1, 3))
    completions = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert all(len(c.token_ids) == 40 for c in completions)
    assert engine.num_evicted_blocks > 0 and engine.speculator.stats.num_verify_passes > 0
    assert_no_blocks_held(engine)


# ---- the pieces -------------------------------------------------------------------------------------------------
def test_ngram_lookup_takes_the_longest_most_recent_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(tokens, 1, 3, 3) == (7, 8, 5)  # suffix (2, 3): most recent earlier match at 5
    assert lookup([5, 1, 2, 6, 0, 1, 2], 2, 2, 4) == (6, 0, 1, 2)
    assert lookup([1, 2, 3, 4], 1, 3, 2) == ()  # nothing recurs
    assert lookup([4, 4, 4], 1, 2, 5) == (4,)  # overlapping match: only what follows exists
    assert lookup([7], 1, 3, 2) == ()


def test_greedy_verification_accepts_the_matching_prefix():
    vocab = 6
    logits = torch.full((4, vocab), -5.0)
    targets = [2, 4, 1, 5]
    for row, token in enumerate(targets):
        logits[row, token] = 5.0
    greedy = logits.argmax(-1).tolist()
    params = SamplingParams(temperature=0, logprobs=1)
    assert verify_drafts(logits, greedy, (2, 4, 1), params, None).token_ids == (2, 4, 1, 5)  # + bonus
    verified = verify_drafts(logits, greedy, (2, 3, 1), params, None)
    assert verified.token_ids == (2, 4) and verified.num_accepted == 1  # the correction replaces draft 2
    assert [entry.token_id for entry in verified.logprobs] == [2, 4]
    assert verify_drafts(logits, greedy, (0, 4, 1), params, None).token_ids == (2,)


def _first_token_histogram(logits, draft_token_ids, params, draft_probs, trials, seed):
    """Where draft_probs is given, each trial draws its drafts from them (as a sampling drafter does)."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.shape[1])
    greedy = logits.argmax(-1).tolist()
    for _ in range(trials):
        if draft_probs is not None:
            draft_token_ids = tuple(torch.multinomial(draft_probs, 1, generator=generator)[:, 0].tolist())
        counts[verify_drafts(logits, greedy, draft_token_ids, params, generator, draft_probs).token_ids[0]] += 1
    return counts / trials


@pytest.mark.parametrize("point_mass", [True, False])
def test_rejection_sampling_keeps_the_target_distribution(point_mass):
    """The first emitted token is distributed as the target's filtered distribution (temperature, top-k), whatever
    the drafter: a point mass (here on a token top-k excludes) or a distribution of its own the drafts are drawn
    from. With 8,000 draws the total variation distance stays within sampling noise (~0.015 here)."""
    torch.manual_seed(3)
    vocab, num_drafts = 8, 3
    logits = torch.randn(num_drafts + 1, vocab) * 1.5
    params = SamplingParams(temperature=0.8, top_k=6)
    from workers.sampler import filtered_probs

    target = filtered_probs(logits[:1], [params])[0]
    drafts, draft_probs = (int(target.argmin()), 1, 2), None
    if not point_mass:
        draft_probs = torch.softmax(torch.randn(num_drafts, vocab), dim=-1)
    histogram = _first_token_histogram(logits, drafts, params, draft_probs, trials=8000, seed=1)
    total_variation = 0.5 * (histogram - target).abs().sum().item()
    assert total_variation < 0.035, (histogram, target)
    assert histogram[target == 0].sum() == 0  # filtered-out tokens never appear


# ---- draft model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_draft_dir(tmp_path_factory):
    """Another tiny model with the same vocabulary (other random weights): it agrees with the target sometimes."""
    from tests.checkpoints import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny-draft"), "llama", seed=1)


@pytest.mark.parametrize("draft", ["same", "other"])
def test_draft_model_drafts_are_verified_losslessly(tiny_loaded, tiny_llama_dir, tiny_draft_dir, draft):
    """The target itself as its own draft model: every greedy draft is accepted. Another model: some are. Either
    way the output is plain decoding's, the mirrors roll back and catch up, and both pools end empty."""
    draft_path = str(tiny_llama_dir if draft == "same" else tiny_draft_dir)
    prompts = random_prompts(5, seed=21)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = plain_outputs(tiny_loaded, prompts, params)
    config = EngineConfig(model=tiny_loaded.path, block_size=4, num_kv_blocks=256, max_num_batched_tokens=64,
                          speculative=SpeculativeConfig(method="draft_model", draft_model=draft_path,
                                                        num_speculative_tokens=3, draft_kv_cache_memory_mb=4))
    engine = Engine(config, loaded=tiny_loaded)
    assert [c.token_ids for c in engine.generate(prompts, params)] == plain
    stats = engine.speculator.stats
    assert stats.num_verify_passes > 0
    if draft == "same":
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    else:
        assert stats.num_accepted_tokens < stats.num_draft_tokens
    assert_no_blocks_held(engine)
    drafter = engine.speculator.drafter
    assert not drafter.mirrors and drafter.engine.pool.num_used_blocks == 0
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig(method="draft_model")


# ---- inside the P/D split ---------------------------------------------------------------------------------------
class RecordingDrafter:
    """Wraps a drafter; keeps each request's first non-empty proposal."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.first: dict[str, tuple[int, ...]] = {}

    def propose(self, requests):
        drafts = self.inner.propose(requests)
        for request, draft in zip(requests, drafts):
            if draft.token_ids:
                self.first.setdefault(request.request_id, (len(request.token_ids), draft.token_ids))
        return drafts

    def forget(self, request_id):
        self.inner.forget(request_id)

    def __getattr__(self, name):  # observe, add_features, capture_layer_ids: the inner drafter's
        return getattr(self.inner, name)


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle3"])
def test_decode_tier_first_draft_equals_the_unified_runs(tiny_loaded, tiny_draft_dir, tmp_path, method):
    """What the drafter needs after the prompt reaches the decode tier with the handoff (the prompt's tokens; the
    draft model prefills them locally; EAGLE-3's captured states ride the ticket): its first draft there is the
    unified engine's first draft, and the tokens are the same."""
    from tests.unit.test_disaggregation import disaggregated
    from tests.unit.test_eagle3 import random_head

    random_head(tiny_loaded).save(str(tmp_path))
    spec = SpeculativeConfig(method=method, ngram_min=1, ngram_max=3, draft_model=str(tiny_draft_dir),
                             draft_kv_cache_memory_mb=4, eagle_head=str(tmp_path), policy="fixed")
    prompts = random_prompts(4, seed=23, min_len=10, max_len=40)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    def speculating(role: str) -> tuple[Engine, RecordingDrafter]:
        config = EngineConfig(model=tiny_loaded.path, block_size=4, num_kv_blocks=256, role=role, speculative=spec)
        engine = Engine(config, loaded=tiny_loaded)
        engine.speculator.drafter = RecordingDrafter(engine.speculator.drafter)
        return engine, engine.speculator.drafter

    unified, unified_drafts = speculating("unified")
    decode, decode_drafts = speculating("decode")
    prefill = Engine(EngineConfig(model=tiny_loaded.path, block_size=4, num_kv_blocks=256, role="prefill",
                                  max_num_batched_tokens=16, speculative=spec), loaded=tiny_loaded)  # chunked
    assert prefill.speculator is None
    for index, prompt in enumerate(prompts):
        alone = unified.generate([prompt], params)[0]
        unified_first = unified_drafts.first.pop(alone.request_id)
        split = disaggregated(prefill, decode, f"r{index}", prompt, params)
        assert split.tokens == alone.token_ids
        assert decode_drafts.first[f"r{index}"] == unified_first  # (at the same length, the same tokens)
    assert_no_blocks_held(decode)
    assert_no_blocks_held(prefill)


# ---- the policy ---------------------------------------------------------------------------------------------------
def test_step_cost_model_fits_the_machine_and_starts_from_the_prior():
    from workers.spec.policy import StepCostModel

    model = StepCostModel(row_cost_prior=0.5)
    assert model.estimate() == (1.0, 0.5)
    for _ in range(20):
        model.add_step(4, 0.03)  # the rows never varied: the prior splits the step (1 row = 0.03 / 2.5)
    fixed, per_row = model.estimate()
    assert per_row == pytest.approx(0.5 * 0.012) and fixed + 4 * per_row == pytest.approx(0.03)
    for _ in range(10):
        for rows in range(1, 30):
            model.add_step(rows, 0.01 + 0.002 * rows)
    fixed, per_row = model.estimate()
    assert per_row == pytest.approx(0.002, rel=0.05) and fixed == pytest.approx(0.01, rel=0.1)


def test_cost_aware_policy_drafts_where_drafts_pay():
    from workers.spec.policy import Candidate, CostAwarePolicy, StepCostModel

    def plan(per_row_fraction, acceptances, num_running=None):
        cost = StepCostModel(row_cost_prior=per_row_fraction)
        cost.add_step(1, 1.0)
        policy = CostAwarePolicy(num_speculative_tokens=4, max_batch_size=16, cost=cost)
        candidates = [Candidate(a, 10) for a in acceptances]
        running = num_running or len(candidates)
        return policy.plan(candidates, running, running)

    # Rows nearly free (a GPU, or a big model's weights on a CPU): everyone drafts deep, even at low acceptance.
    assert plan(0.01, [0.9, 0.5]) == [4, 4]
    # Rows as dear as the step's fixed part (a small model on a CPU): only reliable drafters draft, less deep.
    assert plan(0.5, [0.9, 0.2]) == [2, 0]
    assert plan(0.5, [0.2, 0.2]) == [0, 0]
    # More requests: the step already yields more tokens, so a draft must gain more to pay.
    assert sum(plan(0.3, [0.7] * 8)) < 8 * sum(plan(0.3, [0.7]))
    assert plan(0.01, [0.9] * 17) == [0] * 17  # above max_batch_size: the guard
