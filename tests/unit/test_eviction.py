"""Block eviction: policy rules on synthetic candidates, the scoring pipeline on a synthetic cache, and the
engine (tiny model) under budgets: no leaks, no evicted shared blocks, long generations past the budget."""

import math

import pytest
import torch

from tests.unit.test_disaggregation import disaggregated
from tests.unit.test_engine import assert_no_blocks_held, make_engine, random_prompts
from workers.kv.block_scores import (ScoreCollector, TokenWeightStore, observation_block_mass, output_maps,
                                     value_weights)
from workers.kv.codecs import IdentityCodec
from workers.kv.eviction import POLICY_NAMES, EvictionBudget, EvictionCandidate, make_eviction_policy
from workers.sampling_params import SamplingParams

SCORED = [name for name in POLICY_NAMES if name != "none"]
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def candidate(num_blocks: int, scores=None, shared=(), num_evicted_blocks: int = 0) -> EvictionCandidate:
    return EvictionCandidate(request_id="r", num_blocks=num_blocks, num_evicted_blocks=num_evicted_blocks,
                             shared=tuple(index in shared for index in range(num_blocks)),
                             scores=None if scores is None else torch.tensor(scores, dtype=torch.float32))


@pytest.mark.parametrize("name", SCORED)
def test_sinks_window_and_shared_blocks_are_never_evicted(name):
    budget = EvictionBudget(fraction=0.25, max_blocks=None, sink_blocks=2, recent_blocks=3)
    policy = make_eviction_policy(name, budget)
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        num_blocks = 12 + trial
        # The protected blocks get the lowest scores, so a policy that ignored the rules would pick them first.
        scores = torch.rand(num_blocks, generator=generator) + 1.0
        scores[:2] = 0.0
        scores[-3:] = 0.0
        scores[5] = 0.0
        picked = policy.select(candidate(num_blocks, scores.tolist(), shared={5}))
        assert picked == sorted(set(picked))
        assert not set(picked) & {0, 1, 5, num_blocks - 3, num_blocks - 2, num_blocks - 1}
        keep = max(math.ceil(0.25 * num_blocks), 2 + 3)  # the budget never undercuts the protected blocks
        assert len(picked) == min(num_blocks - keep, num_blocks - 2 - 3 - 1)  # ... and the shared one stays


def test_budget_fraction_counts_evicted_blocks_and_blocks_budget_is_absolute():
    fraction = make_eviction_policy("streaming", EvictionBudget(0.5, None, sink_blocks=1, recent_blocks=1))
    assert fraction.select(candidate(10)) == [1, 2, 3, 4, 5]  # the oldest middle blocks
    # 5 held after 5 evicted: 10 written, half may stay -> nothing more to do; one more written -> one goes.
    assert fraction.select(candidate(5, num_evicted_blocks=5)) == []
    assert fraction.select(candidate(7, num_evicted_blocks=5)) == [1]
    absolute = make_eviction_policy("streaming", EvictionBudget(None, 4, sink_blocks=1, recent_blocks=2))
    assert absolute.select(candidate(4)) == []
    assert absolute.select(candidate(9)) == [1, 2, 3, 4, 5]
    assert make_eviction_policy("none", EvictionBudget(0.1, None, 1, 1)).select(candidate(50)) == []


def test_scored_policies_drop_the_lowest_scores_and_break_ties_by_age():
    policy = make_eviction_policy("h2o", EvictionBudget(None, 5, sink_blocks=1, recent_blocks=2))
    assert policy.select(candidate(8, [9, 5, 1, 7, 1, 3, 0, 0])) == [2, 4, 5]
    assert policy.select(candidate(8)) == [1, 2, 3]  # no votes yet: the oldest go first


def test_value_aware_and_h2o_pick_differently_where_values_differ():
    """Block 3 draws the most attention but its values are ~0; block 5 draws less but its values are large.
    One middle block may stay: h2o keeps 3, value-aware keeps 5 (scores from the real decode pipeline)."""
    S, num_blocks, D = 4, 8, 8
    codec = IdentityCodec(torch.float32, num_kv_heads=1, head_dim=D)
    pages = codec.allocate(0, num_blocks, S, torch.device("cpu"))
    keys = torch.zeros(num_blocks * S, 1, D)
    values = torch.ones(num_blocks * S, 1, D)
    keys[3 * S:4 * S, 0, 0] = 2.0
    values[3 * S:4 * S] = 1e-3
    keys[5 * S:6 * S, 0, 0] = 1.5
    values[5 * S:6 * S] = 10.0
    slots = torch.arange(num_blocks * S)
    codec.write(pages, slots, keys, values)
    store = TokenWeightStore("l1", 1, num_blocks, S, 1, torch.device("cpu"), None)
    store.write(0, slots, values)
    query = torch.zeros(1, 1, D)
    query[0, 0, 0] = 2.0
    tables = torch.arange(num_blocks, dtype=torch.int32)[None]
    lens = torch.tensor([num_blocks * S], dtype=torch.int32)
    picks = {}
    for name, weights in (("h2o", None), ("value_aware", store.arrays[0])):
        collector = ScoreCollector(block_size=S, collect_decode=True, store=None)
        _, mass = codec.decode_attention(query, pages, tables, lens, 1.0, token_weights=weights, with_block_mass=True)
        collector.add_decode(mass)
        policy = make_eviction_policy(name, EvictionBudget(None, 4, sink_blocks=1, recent_blocks=2))
        picks[name] = policy.select(candidate(num_blocks, collector.decode_mass[0].tolist()))
    assert picks["h2o"] == [1, 2, 4, 5]
    assert picks["value_aware"] == [1, 2, 3, 4]


def test_observation_block_mass_matches_a_naive_oracle():
    generator = torch.Generator().manual_seed(3)
    W, H, Hkv, D, Tk, S = 5, 6, 2, 8, 23, 4
    query, key = torch.randn(W, H, D, generator=generator), torch.randn(Tk, Hkv, D, generator=generator)
    weights = torch.rand(Tk, Hkv, generator=generator) + 0.1
    expected = torch.zeros(math.ceil(Tk / S), dtype=torch.float64)
    G = H // Hkv
    for w in range(W):
        visible = Tk - W + w + 1
        for kv_head in range(Hkv):
            votes = sum(torch.softmax(key[:visible, kv_head].double() @ query[w, h].double() * 0.3, 0)
                        for h in range(kv_head * G, (kv_head + 1) * G))
            votes = votes * weights[:visible, kv_head].double()
            votes = votes / votes.sum()
            for t in range(visible):
                expected[t // S] += votes[t]
    got = observation_block_mass(query, key, weights, 0.3, S)  # [Hkv, nb]: one row per voter
    assert got.shape == (Hkv, math.ceil(Tk / S))
    torch.testing.assert_close(got.sum(0).double(), expected, atol=1e-5, rtol=1e-5)
    assert float(got.sum()) == pytest.approx(W * Hkv, rel=1e-5)  # one vote per query and KV head, like decode


def test_output_weighting_is_the_norm_through_each_query_heads_output_columns():
    generator = torch.Generator().manual_seed(4)
    hidden, H, Hkv, D = 12, 4, 2, 8
    weight = torch.randn(hidden, H * D, generator=generator)
    value = torch.randn(5, Hkv, D, generator=generator)
    got = value_weights(value, "output", output_maps([weight], Hkv, D)[0])
    G = H // Hkv
    for t in range(5):
        for h in range(Hkv):
            columns = [weight[:, g * D:(g + 1) * D] for g in range(h * G, (h + 1) * G)]
            expected = math.sqrt(sum(float((w @ value[t, h]).norm()) ** 2 for w in columns))
            assert float(got[t, h]) == pytest.approx(expected, rel=1e-4)


# ---- the engine (tiny model) ----------------------------------------------------------------------------------

def eviction(policy: str, **options) -> dict:
    return {"kv_eviction": {"policy": policy, **options}}


@pytest.mark.parametrize("name", SCORED)
def test_full_budget_gives_exactly_the_no_eviction_tokens(tiny_loaded, name):
    prompts = random_prompts(6, seed=21, min_len=10, max_len=60)
    expected = [c.token_ids for c in make_engine(tiny_loaded).generate(prompts, GREEDY)]
    engine = make_engine(tiny_loaded, **eviction(name, budget=1.0, value_norm="output"))
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == expected
    assert engine.kv_stats().num_evicted_blocks == 0
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("name,codec", [(name, "auto") for name in SCORED] + [("value_aware", "tq-k4v3")])
def test_small_budget_keeps_generating_past_it_without_leaks(tiny_loaded, name, codec):
    budget_blocks = 7
    engine = make_engine(tiny_loaded, kv_codec=codec, **eviction(name, budget_blocks=budget_blocks, recent_blocks=3))
    prompts = random_prompts(3, seed=22, min_len=40, max_len=80)
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)  # ~50 blocks of 4 per sequence
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt_token_ids=prompt, params=params)
    lengths = {f"r{index}": 0 for index in range(3)}
    while engine.has_unfinished():
        for output in engine.step():
            lengths[output.request_id] += len(output.new_token_ids)
        for seq in engine.scheduler.running:
            if seq.num_computed_tokens == seq.num_tokens - 1:  # prefill done: the budget holds
                assert len(seq.block_table) <= budget_blocks
                assert seq.num_cached_kv_tokens + seq.num_evicted_tokens == seq.num_computed_tokens
        engine.pool.check_invariants()
    assert lengths == {f"r{index}": 120 for index in range(3)}
    assert engine.kv_stats().num_evicted_blocks > 100
    assert_no_blocks_held(engine)


def test_shared_prefix_blocks_are_never_evicted_from_under_another_sequence(tiny_loaded):
    engine = make_engine(tiny_loaded, **eviction("streaming", budget_blocks=5, recent_blocks=2))
    prefix = random_prompts(1, seed=23, min_len=48, max_len=48)[0]  # 12 full blocks
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine.add_request("a", prompt_token_ids=prefix + [5, 6], params=params)
    engine.step()  # a's prompt is computed and its full blocks published
    engine.add_request("b", prompt_token_ids=prefix + [7, 8, 9], params=params)
    shared = None
    while engine.has_unfinished():
        engine.step()
        tables = {seq.request_id: seq.block_table for seq in engine.scheduler.running}
        if shared is None and "b" in tables and len(tables) == 2:
            # b's prefix hit: blocks a still holds are shared (a already evicted the others down to its budget;
            # those stayed in the prefix cache and b revived them as its own).
            shared = set(tables["a"]) & set(tables["b"])
            assert len(shared) >= 2
        if len(tables) == 2:
            assert shared <= set(tables["a"]) and shared <= set(tables["b"])  # neither evicts a shared block
        engine.pool.check_invariants()
    assert_no_blocks_held(engine)


def test_preemption_resets_eviction_state_and_recomputes(tiny_loaded):
    """A pool too small for everyone forces preemption; recomputed sequences start from full K/V again."""
    engine = make_engine(tiny_loaded, num_kv_blocks=40, **eviction("value_aware", budget=0.5, recent_blocks=2))
    prompts = random_prompts(4, seed=24, min_len=30, max_len=40)
    completions = engine.generate(prompts, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    assert all(len(c.token_ids) == 60 for c in completions)
    assert engine.scheduler.num_preemptions > 0
    assert_no_blocks_held(engine)


def test_prefill_tier_computes_the_decode_tiers_observation_votes(tiny_loaded):
    """Disaggregated: the decode tier's votes come from the prefill tier and equal the unified engine's,
    so the decode tier evicts the same blocks and generates the same tokens."""
    options = eviction("value_aware", budget=0.3, recent_blocks=2, value_norm="output")
    prompts = random_prompts(3, seed=25, min_len=50, max_len=70)
    unified_engine = make_engine(tiny_loaded, **options)
    unified = [c.token_ids for c in unified_engine.generate(prompts, GREEDY)]
    prefill = make_engine(tiny_loaded, role="prefill", max_num_batched_tokens=16, **options)
    decode = make_engine(tiny_loaded, role="decode", **options)
    for index, prompt in enumerate(prompts):
        result = disaggregated(prefill, decode, f"r{index}", prompt, GREEDY, score_spec=decode.score_spec)
        assert result.tokens == unified[index]
    assert decode.kv_stats().num_evicted_blocks == unified_engine.kv_stats().num_evicted_blocks > 0
    assert prefill.kv_stats().num_evicted_blocks == 0
    assert_no_blocks_held(prefill)
    assert_no_blocks_held(decode)


def test_a_prefix_cached_prompt_gets_the_same_observation_votes(tiny_loaded):
    """The prefix hit stops short of the observation window, so its queries are computed and vote again."""
    engine = make_engine(tiny_loaded, **eviction("snapkv", budget=0.5, observe_window=10, recent_blocks=2))
    prompt = random_prompts(1, seed=26, min_len=61, max_len=61)[0]
    votes = []
    for request_id in ("first", "again"):
        engine.add_request(request_id, prompt_token_ids=prompt, params=SamplingParams(max_tokens=3, temperature=0))
        seq = engine.scheduler.requests[request_id]
        engine.step()
        votes.append(engine.eviction.scores_of(request_id))
        assert seq.num_cached_tokens == (0 if request_id == "first" else 48)  # 61 - 10 = 51 -> 12 full blocks
    torch.testing.assert_close(votes[1], votes[0], atol=1e-5, rtol=1e-5)
    assert float(votes[0].sum()) > 0


@pytest.mark.parametrize("name", ["h2o", "snapkv", "value_aware"])
def test_prefill_chunking_changes_neither_votes_nor_tokens(tiny_loaded, name):
    """A prompt split so that its last chunk is one token (and one that stops a token short of the end) votes
    and evicts exactly like one unchunked prefill: eviction waits until the whole prompt has been computed."""
    prompt = random_prompts(1, seed=27, min_len=33, max_len=33)[0]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    options = eviction(name, budget=0.4, observe_window=8, recent_blocks=2)
    runs = []
    for budget_tokens in (64, 32, 16):  # one chunk; 32 + 1; 16 + 16 + 1
        engine = make_engine(tiny_loaded, max_num_batched_tokens=budget_tokens, **options)
        engine.add_request("r", prompt_token_ids=prompt, params=params)
        seq, votes, tokens = engine.scheduler.requests["r"], None, []
        while engine.has_unfinished():
            tokens += [t for output in engine.step() for t in output.new_token_ids]
            if votes is None and seq.prefill_done:
                votes = engine.eviction.scores_of("r")
        runs.append((votes, tokens, engine.kv_stats().num_evicted_blocks))
    for votes, tokens, num_evicted in runs[1:]:
        torch.testing.assert_close(votes, runs[0][0], atol=1e-5, rtol=1e-5)
        assert tokens == runs[0][1] and num_evicted == runs[0][2] > 0


def test_max_aggregation_keeps_a_block_one_voter_needs():
    """Voter 0 spreads its votes broadly; voter 1 (a retrieval head) puts most of its smaller total on block 3.
    Summed, block 3 loses to the broad blocks; by largest share, voter 1's pick survives."""
    broad = [1.0, 6.0, 5.0, 1.0, 4.0, 1.0, 1.0, 1.0]
    focused = [0.1, 0.1, 0.1, 3.0, 0.1, 0.1, 0.1, 0.1]
    budget = EvictionBudget(None, 4, sink_blocks=1, recent_blocks=2)
    scores = [broad, focused]
    assert make_eviction_policy("h2o", budget, aggregate="sum").select(candidate(8, scores)) == [2, 3, 4, 5]
    assert make_eviction_policy("h2o", budget).select(candidate(8, scores)) == [1, 2, 4, 5]  # max: the default


def test_a_step_that_only_preempts_still_drops_the_preempted_scores(tiny_loaded):
    """Blocks reserved for an import leave the lone running request no room: it preempts itself and the step
    schedules nothing. Its votes must still go (a recompute votes afresh over a table without evictions)."""
    engine = make_engine(tiny_loaded, num_kv_blocks=6, **eviction("h2o", budget=1.0))
    engine.add_request("r", prompt_token_ids=[5, 6, 7, 8, 9, 10, 11],
                       params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    engine.step()  # prefill: 2 blocks
    reserved = engine.make_sequence("imp", prompt_token_ids=[5] * 16, params=SamplingParams(max_tokens=1))
    assert engine.reserve_import(reserved) is not None  # the other 4 blocks
    engine.step()  # a decode: h2o votes
    assert engine.eviction.scores_of("r") is not None
    assert engine.step() == [] and engine.scheduler.num_preemptions == 1  # no block for position 8
    assert engine.eviction.scores_of("r") is None
    assert engine.release_kv("imp")
    while engine.has_unfinished():
        engine.step()
    assert_no_blocks_held(engine)
