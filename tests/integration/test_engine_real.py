"""The engine on the real SmolLM2 model: batch invariance, prefix caching, the async loop, the CLI."""

import asyncio
import os
import subprocess
import sys

import pytest

from tests.texts import pydoc_passages
from workers.async_engine import AsyncEngine
from workers.config import EngineConfig
from workers.engine import Engine
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(real_model):
    return Engine(EngineConfig(num_kv_blocks=1024, max_num_batched_tokens=256), loaded=real_model)


def mixed_prompts(tokenizer, count: int) -> list[list[int]]:
    """Mixed lengths (20..~300 tokens) cut from real text."""
    text = " ".join(pydoc_passages(4))
    token_ids = tokenizer.encode(text)
    return [token_ids[i * 37: i * 37 + 20 + (i * 53) % 280] for i in range(count)]


def test_batch_invariance_with_mid_flight_arrivals(engine, real_model):
    prompts = mixed_prompts(real_model.tokenizer, 16)
    probe = prompts[5]
    alone = engine.generate([probe], GREEDY)[0].token_ids
    engine.pool.reset_prefix_cache()  # the batched run must compute everything itself
    outputs: dict[str, list[int]] = {}
    arrivals = [(f"r{i}", p) for i, p in enumerate(prompts)]
    # Half arrive at once; the rest (the probe among them) join while the first half decodes.
    for request_id, prompt in arrivals[:8]:
        engine.add_request(request_id, prompt_token_ids=prompt, params=GREEDY)
    pending = arrivals[8:] + [("probe", probe)]
    steps = 0
    while engine.has_unfinished() or pending:
        if pending and steps % 3 == 2:
            request_id, prompt = pending.pop(0)
            engine.add_request(request_id, prompt_token_ids=prompt, params=GREEDY)
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.new_token_ids)
        steps += 1
    assert outputs["probe"] == alone
    assert outputs["r5"] == alone
    assert engine.pool.num_used_blocks == 0
    engine.pool.check_invariants()


def test_prefix_cache_hit_same_output_real_model(engine, real_model):
    system = real_model.tokenizer.encode(pydoc_passages(1)[0])[:200]
    prompt = system + real_model.tokenizer.encode(" In short, the answer is")
    engine.pool.reset_prefix_cache()
    cold = engine.generate([prompt], GREEDY)[0]
    warm = engine.generate([prompt], GREEDY)[0]
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens >= 192
    assert warm.token_ids == cold.token_ids


def test_async_engine_streams_and_cancels(real_model):
    engine = Engine(EngineConfig(num_kv_blocks=512), loaded=real_model)
    async_engine = AsyncEngine(engine)
    prompts = mixed_prompts(real_model.tokenizer, 6)

    async def collect(index: int) -> list[int]:
        tokens = []
        async for output in async_engine.generate(f"a{index}", prompt_token_ids=prompts[index], params=GREEDY):
            tokens.extend(output.new_token_ids)
        return tokens

    async def cancel_midway() -> int:
        received = 0
        stream = async_engine.generate("cancel-me", prompt_token_ids=prompts[0],
                                       params=SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        async for output in stream:
            received += len(output.new_token_ids)
            if received >= 5:
                break
        await stream.aclose()
        return received

    async def main():
        return await asyncio.gather(*(collect(i) for i in range(6)), cancel_midway())

    try:
        *streams, received = asyncio.run(main())
        expected = engine_generate_sync(real_model, prompts)
        assert streams == expected
        assert received >= 5
        # The cancelled request's blocks come back once the loop has applied the abort.
        for _ in range(100):
            if engine.pool.num_used_blocks == 0 and engine.num_requests == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert engine.pool.num_used_blocks == 0 and engine.num_requests == 0
    finally:
        async_engine.shutdown()


def engine_generate_sync(real_model, prompts) -> list[list[int]]:
    engine = Engine(EngineConfig(num_kv_blocks=512), loaded=real_model)
    return [c.token_ids for c in engine.generate(prompts, GREEDY)]


def test_cli_run_prints_transformers_greedy_text(real_model, hf_oracle):
    from tests.reference.test_smollm_oracle import hf_greedy

    prompt = "The capital of France is"
    tokenizer = real_model.tokenizer
    expected_ids = hf_greedy(hf_oracle[0], tokenizer.encode(prompt), 40)
    if 2 in expected_ids:
        expected_ids = expected_ids[:expected_ids.index(2)]
    expected = tokenizer.decode(expected_ids, skip_special_tokens=True)
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "run", prompt, "--max-tokens", "40"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected
