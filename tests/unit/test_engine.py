"""The real Engine (scheduler + paged cache + runner + sampler) on a tiny random checkpoint: fast and exact."""

import random

import pytest
import torch

from workers.config import EngineConfig
from workers.engine import Engine
from workers.sampling_params import InvalidRequestError, SamplingParams
from workers.sequence import FinishReason

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def make_engine(loaded, **overrides) -> Engine:
    options = dict(model=loaded.path, block_size=4, num_kv_blocks=256, max_num_batched_tokens=64)
    options.update(overrides)
    return Engine(EngineConfig(**options), loaded=loaded)


def random_prompts(count: int, seed: int, min_len: int = 3, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def assert_no_blocks_held(engine: Engine) -> None:
    engine.pool.check_invariants()
    assert engine.pool.num_used_blocks == 0
    assert engine.num_requests == 0 and not engine.has_unfinished()


def test_chunked_prefill_and_batching_match_single_runs(tiny_loaded):
    prompts = random_prompts(8, seed=1)
    alone = [make_engine(tiny_loaded, enable_prefix_caching=False).generate([p], GREEDY)[0].token_ids
             for p in prompts]
    # A tiny token budget forces chunked prefill and mixing of prefill chunks with decodes.
    engine = make_engine(tiny_loaded, max_num_batched_tokens=7, enable_prefix_caching=False)
    batched = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    assert batched == alone
    assert_no_blocks_held(engine)


def test_requests_arriving_mid_flight(tiny_loaded):
    prompts = random_prompts(6, seed=2)
    alone = [make_engine(tiny_loaded).generate([p], GREEDY)[0].token_ids for p in prompts]
    engine = make_engine(tiny_loaded)
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:  # one new arrival every step while others are decoding
            index, prompt = pending.pop(0)
            engine.add_request(f"r{index}", prompt_token_ids=prompt, params=GREEDY)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == alone
    assert_no_blocks_held(engine)


def test_prefix_cache_hit_gives_cold_output(tiny_loaded):
    shared = random_prompts(1, seed=3, min_len=30, max_len=30)[0]
    engine = make_engine(tiny_loaded)
    cold = engine.generate([shared + [5, 6, 7]], GREEDY)[0]
    warm = engine.generate([shared + [5, 6, 7]], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    assert warm.num_cached_tokens == 32  # 8 full blocks of 4; the last token is always recomputed
    assert warm.token_ids == cold.token_ids
    other = engine.generate([shared + [9, 9]], GREEDY)[0]
    assert other.num_cached_tokens == 28
    assert other.token_ids == make_engine(tiny_loaded, enable_prefix_caching=False).generate(
        [shared + [9, 9]], GREEDY)[0].token_ids
    assert_no_blocks_held(engine)


def test_preemption_recomputes_and_leaks_nothing(tiny_loaded):
    prompts = random_prompts(6, seed=4, min_len=10, max_len=20)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [make_engine(tiny_loaded).generate([p], params)[0].token_ids for p in prompts]
    # 6 sequences of up to 60 tokens need up to 90 blocks of 4; 24 blocks force repeated preemption.
    engine = make_engine(tiny_loaded, num_kv_blocks=24)
    completions = engine.generate(prompts, params)
    assert [c.token_ids for c in completions] == expected
    assert engine.scheduler.num_preemptions > 0
    assert_no_blocks_held(engine)


def test_abort_frees_blocks_everywhere(tiny_loaded):
    engine = make_engine(tiny_loaded)
    for index, prompt in enumerate(random_prompts(4, seed=5)):
        engine.add_request(f"r{index}", prompt_token_ids=prompt, params=SamplingParams(max_tokens=100, temperature=0))
    engine.step()
    engine.step()
    assert engine.pool.num_used_blocks > 0
    for index in range(4):
        output = engine.abort(f"r{index}")
        assert output.finished and output.finish_reason is FinishReason.ABORT
    assert engine.abort("unknown") is None
    assert_no_blocks_held(engine)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_loaded):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    prompt = random_prompts(1, seed=6)[0]
    alone = make_engine(tiny_loaded).generate([prompt], params)[0].token_ids
    others = random_prompts(5, seed=7)
    engine = make_engine(tiny_loaded)
    mixed = engine.generate(others[:2] + [prompt] + others[2:],
                            SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234))
    assert mixed[2].token_ids == alone
    different_seed = make_engine(tiny_loaded).generate(
        [prompt], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=99))[0].token_ids
    assert different_seed != alone


def test_stop_conditions(tiny_loaded):
    engine = make_engine(tiny_loaded)
    prompt = random_prompts(1, seed=8)[0]
    reference = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert reference.finish_reason is FinishReason.LENGTH and len(reference.token_ids) == 30
    # Stop token id: generation ends at its first occurrence, inclusive.
    stop_token = reference.token_ids[10]
    first = reference.token_ids.index(stop_token)
    stopped = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(stop_token,)))[0]
    assert stopped.finish_reason is FinishReason.STOP and stopped.token_ids == reference.token_ids[:first + 1]
    # Stop string: text is cut before it and never streamed past it.
    if len(reference.text) > 12:
        stop_str = reference.text[8:11]
        cut = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop=(stop_str,)))[0]
        assert cut.finish_reason is FinishReason.STOP
        assert cut.text == reference.text[:reference.text.index(stop_str)]
    assert_no_blocks_held(engine)


def test_context_window_ends_generation(tiny_loaded):
    engine = make_engine(tiny_loaded, max_model_len=32)
    completion = engine.generate([list(range(3, 23))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert completion.finish_reason is FinishReason.LENGTH
    assert completion.num_prompt_tokens + len(completion.token_ids) == 32


def test_logprobs_are_log_softmax_of_the_model(tiny_loaded):
    engine = make_engine(tiny_loaded)
    completion = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0, logprobs=5))[0]
    assert len(completion.logprobs) == 3
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        assert entry.token_id == token_id
        assert len(entry.top) == 5
        assert entry.top[0][0] == token_id  # greedy picks the top-1
        assert entry.logprob == pytest.approx(entry.top[0][1])
        assert all(a[1] >= b[1] for a, b in zip(entry.top, entry.top[1:]))


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt_token_ids=[]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, 10**9]), "prompt_token_ids"),
    (dict(prompt_token_ids=[-1]), "prompt_token_ids"),
    (dict(prompt_token_ids=[5] * 600), "prompt"),
])
def test_bad_requests_name_the_field(tiny_loaded, kwargs, field):
    engine = make_engine(tiny_loaded)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", params=GREEDY, **kwargs)
    assert info.value.field == field
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(logprobs=100), "logprobs"), (dict(stop=("",)), "stop"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_duplicate_request_id_rejected(tiny_loaded):
    engine = make_engine(tiny_loaded)
    engine.add_request("same", prompt_token_ids=[5, 6], params=GREEDY)
    with pytest.raises(InvalidRequestError, match="already running"):
        engine.add_request("same", prompt_token_ids=[5, 6], params=GREEDY)
    engine.abort("same")
    assert_no_blocks_held(engine)


def test_forced_tokens_are_emitted_and_scored_like_a_prompt(tiny_loaded):
    """Teacher forcing (evals): the forced continuation comes out as given, and each forced token's logprob equals
    the log-softmax of the model's logits at that position when the whole text is scored in one prefill."""
    from workers.attention import AttentionMetadata, PrefillChunk

    prompt, continuation = random_prompts(2, seed=31, min_len=20, max_len=20)
    engine = make_engine(tiny_loaded)
    params = SamplingParams(max_tokens=len(continuation), temperature=0, ignore_eos=True, logprobs=1,
                            forced_token_ids=continuation)
    completion = engine.generate([prompt], params)[0]
    assert completion.token_ids == continuation
    text = prompt + continuation
    model, codec = engine.model, engine.codec
    num_blocks = -(-len(text) // 4)
    pages = [codec.allocate(layer, num_blocks, 4, model.device) for layer in range(model.config.num_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(len(text)), num_decode_tokens=0, decode_block_tables=None,
                             decode_seq_lens=None, prefills=(PrefillChunk(0, len(text), 0, torch.arange(num_blocks)),))
    with torch.inference_mode():
        hidden = model(torch.tensor(text), torch.arange(len(text)), pages, codec, meta)
        expected = torch.log_softmax(model.compute_logits(hidden[len(prompt) - 1:-1]).float(), dim=-1)
    got = [logprobs.logprob for logprobs in completion.logprobs]
    want = [float(expected[step, token]) for step, token in enumerate(continuation)]
    assert got == pytest.approx(want, abs=1e-4)


def test_forced_token_ids_outside_the_vocabulary_are_rejected(tiny_loaded):
    engine = make_engine(tiny_loaded)
    with pytest.raises(InvalidRequestError) as error:
        engine.make_sequence("r", prompt_token_ids=[5, 6], params=SamplingParams(forced_token_ids=(3, 10**6)))
    assert error.value.field == "forced_token_ids"
