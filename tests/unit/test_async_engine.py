"""AsyncEngine on a tiny model: streams, calls on the loop thread, the async KV handoff, failures."""

import asyncio

import pytest

from tests.unit.test_engine import make_engine, random_prompts
from workers.async_engine import AsyncEngine
from workers.kv.transfer import pack_blocks, unpack_blocks
from workers.sampling_params import InvalidRequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture
def engines(tiny_loaded):
    prefill, decode = AsyncEngine(make_engine(tiny_loaded)), AsyncEngine(make_engine(tiny_loaded))
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


async def collect(stream) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]


def test_async_handoff_matches_plain_generation(engines, tiny_loaded):
    prefill, decode = engines
    prompt = random_prompts(1, seed=21)[0]
    expected = make_engine(tiny_loaded).generate([prompt], GREEDY)[0].token_ids

    async def main():
        async for _ in prefill.generate("r", prompt_token_ids=prompt,
                                        params=SamplingParams(max_tokens=1, temperature=0), hold_kv=True):
            pass
        held = await prefill.call(lambda e: e.held_kv("r"))
        seq = decode.engine.make_sequence("r", prompt_token_ids=prompt, params=GREEDY)
        block_ids = await decode.call(lambda e: e.reserve_import(seq))
        unpack_blocks(pack_blocks(prefill.engine.kv_pages, list(held.block_ids)), decode.engine.kv_pages, block_ids)
        assert await prefill.call(lambda e: e.release_kv("r"))
        return await collect(decode.stream_imported("r", held.first_token_id))

    assert asyncio.run(main()) == expected
    assert prefill.engine.pool.num_used_blocks == 0 and decode.engine.pool.num_used_blocks == 0


def test_call_propagates_errors_and_bad_input_raises_before_queueing(engines):
    prefill, _ = engines

    async def main():
        with pytest.raises(ZeroDivisionError):
            await prefill.call(lambda e: 1 / 0)
        with pytest.raises(InvalidRequestError):
            await collect(prefill.generate("bad", prompt_token_ids=[]))
        assert await prefill.call(lambda e: e.num_requests) == 0

    asyncio.run(main())
    assert prefill.is_alive


def test_duplicate_request_id_fails_only_that_stream(engines):
    prefill, _ = engines

    async def main():
        first = prefill.generate("dup", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=50, temperature=0))
        first_output = await first.__anext__()
        with pytest.raises(InvalidRequestError, match="already running"):
            await collect(prefill.generate("dup", prompt_token_ids=[5, 6], params=GREEDY))
        await first.aclose()  # cancels -> abort
        return first_output

    assert asyncio.run(main()).new_token_ids
    for _ in range(100):
        if prefill.engine.pool.num_used_blocks == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert prefill.engine.pool.num_used_blocks == 0
