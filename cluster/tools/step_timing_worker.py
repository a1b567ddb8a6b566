"""Time the engine's step on fixed shapes, in whatever tree `workers` is imported from (PYTHONPATH).

Run by `tierserve bench engine --against REV` (cluster/tools/bench_step_ab.py) once per round for each of two
trees, so the new step loop and an old one are timed on the same machine in alternating processes. It uses only
the Engine API both trees share (Engine(EngineConfig), add_request, step, has_unfinished) and imports nothing
from cluster/, so it runs against an old checkout unchanged. Prints one JSON object: shape -> median step seconds.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

# name -> (concurrent requests, prompt tokens, decode steps timed (0: time the prefill step), engine options)
SHAPES: dict[str, tuple[int, int, int, dict]] = {
    "prefill 4x256": (4, 256, 0, {"max_num_batched_tokens": 1024}),
    "chunked prefill 2x512 (256/step)": (2, 512, 0, {"max_num_batched_tokens": 256}),
    "decode b=1": (1, 64, 24, {}),
    "decode b=8": (8, 64, 24, {}),
    "decode b=32": (32, 64, 24, {}),
    "decode b=8, value_aware eviction": (8, 128, 24, {"kv_eviction": {"policy": "value_aware", "budget_blocks": 5,
                                                                      "recent_blocks": 2}}),
}


def _prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    margin = min(100, vocab_size // 4)  # away from special tokens at either end of the vocabulary
    # Distinct first tokens: prefix caching cannot share work between requests.
    return [[(1000 + i) % vocab_size] + torch.randint(margin, vocab_size - margin, (length - 1,),
                                                      generator=generator).tolist()
            for i in range(count)]


def time_shape(engine, vocab_size: int, count: int, prompt_len: int, decode_steps: int, repeats: int,
               seed: int) -> float:
    """Median seconds of the timed steps: the prefill steps (decode_steps == 0) or the decode steps after them."""
    from workers.sampling_params import SamplingParams

    timings: list[float] = []
    for repeat in range(repeats):
        engine.pool.reset_prefix_cache()
        params = SamplingParams(max_tokens=max(1, decode_steps + 1), temperature=0, ignore_eos=True)
        for index, prompt in enumerate(_prompts(vocab_size, count, prompt_len, seed + repeat)):
            engine.add_request(f"ab-{seed}-{repeat}-{index}", prompt_token_ids=prompt, params=params)
        have_first: set[str] = set()
        while engine.has_unfinished():
            started = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - started
            prefilling = len(have_first) < count
            if prefilling == (decode_steps == 0):
                timings.append(elapsed)
            have_first.update(output.request_id for output in outputs)
    return statistics.median(timings)


def main() -> None:
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.model.loader import load_model

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    base = EngineConfig(max_num_seqs=32)
    loaded = load_model(base.model, dtype=base.resolved_dtype(), device=base.resolved_device())
    vocab_size = loaded.config.vocab_size
    result: dict[str, float] = {}
    for seed, (name, (count, prompt_len, decode_steps, options)) in enumerate(SHAPES.items()):
        engine = Engine(EngineConfig(**{**base.model_dump(), **options}), loaded=loaded)  # validated, nested too
        time_shape(engine, vocab_size, count, prompt_len, min(decode_steps, 2), 1, 10_000)  # warm-up
        result[name] = time_shape(engine, vocab_size, count, prompt_len, decode_steps, repeats, seed * 100)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
