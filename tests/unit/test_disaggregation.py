"""Prefill engine -> encoded blocks -> decode engine gives exactly the unified engine's tokens."""

from dataclasses import dataclass, field

import pytest

from tests.unit.test_engine import assert_no_blocks_held, make_engine, random_prompts
from workers.handoff.local import import_held, prefill_and_hold
from workers.sampling_params import SamplingParams
from workers.sequence import FinishReason


@dataclass
class Handoff:
    tokens: list[int] = field(default_factory=list)
    prefill_cached_tokens: int = 0
    finish_reason: FinishReason | None = None


def disaggregated(prefill, decode, request_id: str, prompt: list[int], params: SamplingParams,
                  score_spec=None) -> Handoff:
    """The tier handoff in one process: prefill holds its blocks, decode reserves, bytes move, decode runs."""
    result = Handoff()
    held = prefill_and_hold(prefill, request_id, prompt, params, score_spec)
    result.prefill_cached_tokens = held.num_cached_tokens
    assert held.num_tokens == len(prompt)
    output = import_held(prefill, held, decode, prompt, params)
    assert prefill.release_kv(request_id)
    result.tokens.extend(output.new_token_ids)
    while not output.finished:
        for output in decode.step():  # the decode engine serves only this request here
            result.tokens.extend(output.new_token_ids)
    result.finish_reason = output.finish_reason
    return result


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0.8, top_k=40, seed=7),
])
def test_disaggregated_equals_unified(tiny_loaded, params):
    prompts = random_prompts(5, seed=11, min_len=3, max_len=50)
    unified = [make_engine(tiny_loaded).generate([p], params)[0].token_ids for p in prompts]
    # A small prefill token budget: the prefill tier chunks long prompts.
    prefill = make_engine(tiny_loaded, max_num_batched_tokens=16)
    decode = make_engine(tiny_loaded)
    for index, prompt in enumerate(prompts):
        assert disaggregated(prefill, decode, f"r{index}", prompt, params).tokens == unified[index]
    assert_no_blocks_held(prefill)
    assert_no_blocks_held(decode)


def test_prefill_prefix_cache_serves_repeated_prompts(tiny_loaded):
    prefill = make_engine(tiny_loaded)
    decode = make_engine(tiny_loaded)
    prompt = random_prompts(1, seed=12, min_len=30, max_len=30)[0]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    first = disaggregated(prefill, decode, "a", prompt, params)
    second = disaggregated(prefill, decode, "b", prompt, params)
    assert first.tokens == second.tokens
    assert first.prefill_cached_tokens == 0 and second.prefill_cached_tokens == 28  # 7 full blocks of 4
    assert prefill.pool.num_used_blocks == 0


def test_abort_and_failed_import_free_blocks_on_both_sides(tiny_loaded):
    prefill = make_engine(tiny_loaded)
    decode = make_engine(tiny_loaded)
    prompt = random_prompts(1, seed=13)[0]
    prefill.add_sequence(prefill.make_sequence("x", prompt_token_ids=prompt,
                                               params=SamplingParams(max_tokens=1, temperature=0), hold_kv=True))
    while prefill.held_kv("x") is None:
        prefill.step()
    assert prefill.pool.num_used_blocks > 0
    seq = decode.make_sequence("x", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4, temperature=0))
    assert decode.reserve_import(seq)
    # Transfer failed: the decode side gives its reservation back, the prefill side times out its hold.
    assert decode.abort("x") is None and prefill.abort("x") is None
    assert_no_blocks_held(prefill)
    assert_no_blocks_held(decode)


def test_reserve_import_reports_a_short_pool(tiny_loaded):
    decode = make_engine(tiny_loaded, num_kv_blocks=4)  # 16 tokens of room
    seq = decode.make_sequence("big", prompt_token_ids=[5] * 15, params=SamplingParams(max_tokens=1))
    assert decode.reserve_import(seq) is not None
    other = decode.make_sequence("more", prompt_token_ids=[5] * 8, params=SamplingParams(max_tokens=1))
    assert decode.reserve_import(other) is None  # caller backs off or recomputes; nothing leaked
    decode.release_kv("big")
    assert_no_blocks_held(decode)


def test_first_token_can_finish_the_request(tiny_loaded):
    prefill = make_engine(tiny_loaded)
    decode = make_engine(tiny_loaded)
    prompt = random_prompts(1, seed=14)[0]
    handoff = disaggregated(prefill, decode, "one", prompt, SamplingParams(max_tokens=1, temperature=0))
    assert len(handoff.tokens) == 1
    assert handoff.finish_reason is FinishReason.LENGTH  # max_tokens=1 ends on the imported token itself
    assert_no_blocks_held(decode)
