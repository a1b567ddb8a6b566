"""Eviction on the real model: decoding after an eviction is exactly attention without the evicted tokens
(checked against transformers with those tokens masked out), and long prompts run under a budget."""

import pytest
import torch

from tests.texts import pydoc_passages
from workers.config import EngineConfig
from workers.engine import Engine
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


def test_decode_after_eviction_equals_transformers_with_the_evicted_tokens_masked(real_model, hf_oracle):
    hf_model, _ = hf_oracle
    engine = Engine(EngineConfig(block_size=16, num_kv_blocks=64), loaded=real_model)
    prompt = real_model.tokenizer.encode(" ".join(pydoc_passages(2)))[:90]  # 6 blocks, the last one partial
    num_steps = 4
    engine.add_request("r", prompt_token_ids=prompt,
                       params=SamplingParams(max_tokens=1 + num_steps, temperature=0, ignore_eos=True, logprobs=5))
    first = engine.step()[0]
    seq = engine.scheduler.requests["r"]
    evicted_blocks = [1, 3]  # tokens 16..31 and 48..63 leave every layer; positions of the rest are unchanged
    engine.kv.evict(seq, evicted_blocks)
    assert seq.num_evicted_tokens == 32 and len(seq.block_table) == 4
    outputs = [first] + [engine.step()[0] for _ in range(num_steps)]
    tokens = [output.new_token_ids[0] for output in outputs]

    # transformers, one pass: queries from position len(prompt) on (computed after the eviction) must not see
    # the evicted tokens; the prompt's own rows are untouched (its K/V was computed with everything visible).
    all_ids = prompt + tokens[:-1]
    total = len(all_ids)
    allowed = torch.ones(total, total, dtype=torch.bool).tril()
    for block in evicted_blocks:
        allowed[len(prompt):, block * 16:(block + 1) * 16] = False
    mask = torch.zeros(1, 1, total, total)
    mask[0, 0][~allowed] = torch.finfo(torch.float32).min
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([all_ids]), attention_mask=mask).logits[0].float(), -1)
    for step, output in enumerate(outputs[1:]):
        row = logprobs[len(prompt) + step]
        assert tokens[step + 1] == int(row.argmax())
        for token_id, logprob in output.logprobs[0].top:
            assert logprob == pytest.approx(float(row[token_id]), abs=2e-3)
    assert engine.pool.num_used_blocks == 0


@pytest.mark.parametrize("policy", ["streaming", "value_aware"])
def test_long_prompt_under_a_quarter_budget(real_model, policy):
    """A 1.5K-token prompt and 64 new tokens held in a quarter of the blocks; text stays text, nothing leaks."""
    engine = Engine(EngineConfig(num_kv_blocks=256, kv_eviction={"policy": policy, "budget": 0.25}),
                    loaded=real_model)
    prompt = real_model.tokenizer.encode(" ".join(pydoc_passages(6)))[:1500]
    completion = engine.generate([prompt], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))[0]
    assert len(completion.token_ids) == 64 and completion.text.strip()
    stats = engine.kv_stats()
    written = -(-(1500 + 63) // 16)
    assert stats.num_evicted_blocks >= written - -(-written // 4) - 1
    assert stats.num_used_blocks == 0
