"""All decoder layers of a decode step in one native call (workers/model/native_decode.py) against the module path
it replaces, on the real SmolLM2 GGUF: the same kernels in the same order, so tokens and logprobs are identical
bit for bit, for fp32 and fp16 KV pages, with requests of mixed lengths arriving mid-flight and sampled with seeds.
"""

import pytest
import torch

from kernels.cpu_native import native_kernels
from tests.texts import PLAIN_PROMPTS
from workers.attention import AttentionMetadata
from workers.config import EngineConfig
from workers.engine import Engine
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


def run_mixed_batch(engine: Engine) -> tuple[dict[str, list], int]:
    """Six requests (greedy and seeded sampling, with logprobs), two of them added after a few steps; returns every
    output per request and how many steps took the native path."""
    native_steps = 0
    native = engine.runner.native_decode
    if native is not None:
        original = native.forward_captured  # what the runner calls (forward is its capture-free wrapper)

        def counting_forward(*args, **kwargs):
            nonlocal native_steps
            native_steps += 1
            return original(*args, **kwargs)

        native.forward_captured = counting_forward
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode(p) for p in PLAIN_PROMPTS[:3]] + [tokenizer.encode(PLAIN_PROMPTS[0] * 5)]
    params = [SamplingParams(max_tokens=24, temperature=0, logprobs=3, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=11, logprobs=2, ignore_eos=True)]
    outputs: dict[str, list] = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(f"early-{index}", prompt_token_ids=prompt, params=params[index % 2])
    for step in range(40):
        if step == 4:
            for index, prompt in enumerate(prompts[:2]):
                engine.add_request(f"late-{index}", prompt_token_ids=prompt[::-1], params=params[(index + 1) % 2])
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append((output.new_token_ids, output.logprobs))
        if not engine.has_unfinished():
            break
    assert not engine.has_unfinished() and engine.pool.num_used_blocks == 0
    if native is not None:
        native.forward_captured = original
    return outputs, native_steps


@pytest.mark.parametrize("kv_codec", ["auto", "float16"])
def test_native_decode_layers_equal_the_module_path_bit_for_bit(real_model, kv_codec):
    config = EngineConfig(block_size=16, num_kv_blocks=128, kv_codec=kv_codec)
    native_engine = Engine(config, loaded=real_model)
    module_engine = Engine(config.model_copy(update={"native_decode_layers": False}), loaded=real_model)
    library = native_kernels()
    if library is None or (kv_codec == "float16" and not library.native_has_half()):
        pytest.skip("no native kernels here (no C compiler, or fp16 pages without F16C): the module path runs")
    assert native_engine.runner.native_decode is not None and module_engine.runner.native_decode is None
    native_outputs, native_steps = run_mixed_batch(native_engine)
    module_outputs, _ = run_mixed_batch(module_engine)
    assert native_steps >= 20  # most steps are pure decode; steps with a prefill chunk take the module path
    assert native_outputs == module_outputs


def test_native_decode_layers_refuse_tables_outside_the_pool(real_model):
    if native_kernels() is None:
        pytest.skip("no native kernels here: the module path runs")
    engine = Engine(EngineConfig(block_size=16, num_kv_blocks=32), loaded=real_model)
    native = engine.runner.native_decode
    assert native is not None

    def meta(slot: int, block_id: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=torch.tensor([slot]), num_decode_tokens=1,
                                 decode_block_tables=torch.tensor([[block_id]], dtype=torch.int32),
                                 decode_seq_lens=torch.tensor([1], dtype=torch.int32), prefills=())

    ids, positions = torch.tensor([42]), torch.tensor([0])
    assert native.applies(meta(0, 0), 1) and not native.applies(meta(0, 0), native.max_rows + 1)
    with pytest.raises(IndexError, match="layer 0: a block id or slot is outside the pool"):
        native.forward(ids, positions, meta(0, 32))
    with pytest.raises(IndexError, match="layer 0: a block id or slot is outside the pool"):
        native.forward(ids, positions, meta(32 * 16, 0))
    assert torch.isfinite(native.forward(ids, positions, meta(0, 0))).all()


def test_a_step_the_native_call_cannot_finish_runs_through_the_module_path(real_model, monkeypatch):
    """No memory for a kernel's scratch (or a kernel refusing its inputs) is not an error: the step is rerun by the
    module path, whose torch fallbacks take over; K/V rows already written are rewritten with the same values."""
    if native_kernels() is None:
        pytest.skip("no native kernels here: the module path runs")
    config = EngineConfig(block_size=16, num_kv_blocks=64)
    engine = Engine(config, loaded=real_model)
    native = engine.runner.native_decode
    calls = []

    class OutOfMemoryInLayer3:
        def decode_layers(self, *args):
            calls.append(args)
            return (4 << 8) | 1  # layer 3, STATUS_NO_MEMORY

    monkeypatch.setattr(native, "library", OutOfMemoryInLayer3())
    prompts = [engine.tokenizer.encode(p) for p in PLAIN_PROMPTS[:2]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    fallen_back = engine.generate(prompts, params)
    module = Engine(config.model_copy(update={"native_decode_layers": False}), loaded=real_model)
    assert len(calls) >= 6
    assert [c.token_ids for c in fallen_back] == [c.token_ids for c in module.generate(prompts, params)]
