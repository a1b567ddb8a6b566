"""The real SmolLM2-135M GGUF vs Hugging Face transformers loading the same file (fp32 both sides).

Bound we hold: top-1 identical at >= 99% of positions and max |logit difference| <= 1e-3.
(Measured: 7.8e-5 on the fp32 prefill path, 1.7e-4 on the block-quantized decode path; only summation orders differ.)
"""

import pytest
import torch

from tests.reference.test_tiny_checkpoints import prefill_logits
from tests.texts import CHAT_PROMPTS, PLAIN_PROMPTS, pydoc_passages
from workers.config import EngineConfig
from workers.engine import Engine
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

MAX_LOGIT_DIFF = 1e-3
TOKENS_PER_TEXT = 512


def test_next_token_logits_agree_on_real_text(real_model, hf_oracle):
    hf_model, _ = hf_oracle
    agree = total = 0
    max_diff = 0.0
    for passage in pydoc_passages(3):
        token_ids = real_model.tokenizer.encode(passage)[:TOKENS_PER_TEXT]
        assert len(token_ids) == TOKENS_PER_TEXT
        ours = prefill_logits(real_model, token_ids)
        with torch.no_grad():
            theirs = hf_model(torch.tensor([token_ids])).logits[0]
        agree += (ours.argmax(-1) == theirs.argmax(-1)).sum().item()
        total += len(token_ids)
        max_diff = max(max_diff, (ours - theirs).abs().max().item())
    assert agree / total >= 0.99, f"top-1 agreement {agree / total:.4f}"
    assert max_diff <= MAX_LOGIT_DIFF, f"max |logit diff| {max_diff:.2e}"


def test_block_quantized_linears_agree_on_real_text(real_model, hf_oracle):
    """Decode-sized batches (<= 64 rows) multiply by the file's Q4_1/Q8_0 blocks: the same bound holds there."""
    from workers.model.block_quant_linear import BlockQuantLinear, quantize_linears

    quantize_linears(real_model.model, real_model.block_tensors)
    assert sum(isinstance(m, BlockQuantLinear) for m in real_model.model.modules()) == 30 * 4 + 1
    hf_model, _ = hf_oracle
    token_ids = real_model.tokenizer.encode(pydoc_passages(1)[0])[:256]
    ours = prefill_logits(real_model, token_ids, chunk_size=48)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([token_ids])).logits[0]
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.99
    assert (ours - theirs).abs().max().item() <= MAX_LOGIT_DIFF


@pytest.fixture(scope="module")
def engine(real_model):
    return Engine(EngineConfig(block_size=16, num_kv_blocks=512), loaded=real_model)


def hf_greedy(hf_model, token_ids: list[int], num_tokens: int) -> list[int]:
    """argmax of transformers' logits step by step (its KV cache), EOS not special: like ignore_eos."""
    generated: list[int] = []
    with torch.no_grad():
        out = hf_model(torch.tensor([token_ids]), use_cache=True)
        for _ in range(num_tokens):
            next_token = int(out.logits[0, -1].argmax())
            generated.append(next_token)
            out = hf_model(torch.tensor([[next_token]]), past_key_values=out.past_key_values, use_cache=True)
    return generated


def test_greedy_continuations_match_transformers(engine, real_model, hf_oracle):
    hf_model, _ = hf_oracle
    tokenizer = real_model.tokenizer
    prompts = [tokenizer.encode(p) for p in PLAIN_PROMPTS]
    prompts += [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]))
                for p in CHAT_PROMPTS]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    # All prompts in one batch: the engine's batched path must still give each prompt HF's tokens.
    completions = engine.generate(prompts, params)
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == hf_greedy(hf_model, prompt, 64), tokenizer.decode(prompt)
    assert engine.pool.num_used_blocks == 0


def test_chat_template_matches_transformers(real_model, hf_oracle):
    _, hf_tokenizer = hf_oracle
    messages = [{"role": "user", "content": CHAT_PROMPTS[0]}]
    ours = real_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours == theirs
