"""The Qwen2.5-Coder GGUFs (the registry's second family: Qwen2 with q/k/v bias, rope theta 1e6) vs Hugging Face
transformers loading the same files (fp32 both sides). The models come from the `qwen` extra's chunk packages,
assembled on first use; a missing package fails here with the pip command, it does not skip.

0.5B (Q5_0/Q8_0/Q4_K/Q6_K): tokenizer and chat template; logits, bound: top-1 identical at >= 99% of positions,
max |logit difference| <= 1e-3 (measured: 3.0e-5 on prose, 4.2e-5 on code, 256 tokens each, top-1 100%; only
summation orders differ); the engine's greedy tokens are transformers' argmax at every step and their logprobs
agree within 1e-3 (measured <= 2.0e-5; the closest top-2 margin on these prompts is 0.010).
1.5B (Q4_K/Q6_K): the same for the engine's greedy tokens on two short prompts (measured logprob diff 2.2e-6).
Ours runs and is freed before transformers loads: one fp32 copy (6 GB) at a time; the file peaks at ~9.3 GB RSS.

"Greedy equal" is checked teacher-forced: one transformers forward over prompt + our tokens must put its argmax on
our next token at every position: that is transformers' greedy decode of our tokens (up to the rounding between its
cached and full forwards), for one forward instead of one per token.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import textwrap
from collections.abc import Iterator

import pytest
import torch

from tests.reference.test_tiny_checkpoints import prefill_logits
from tests.texts import pydoc_passages
from workers.config import EngineConfig
from workers.engine import Engine
from workers.model.block_quant_linear import BlockQuantLinear
from workers.model.loader import LoadedModel, load_model, resolve_model_path
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

SMALL, LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
MAX_LOGIT_DIFF = 1e-3
MAX_LOGPROB_DIFF = 1e-3
TOKENS_PER_TEXT = 256
CODE_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


def code_text() -> str:
    """Python source that ships with Python: code for the code model."""
    return inspect.getsource(textwrap)


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """transformers parses a GGUF's metadata (for Qwen, 300k tokens and merges: ~8 s on 2 cores) once for the config,
    once for the tokenizer and once for the weights; let it reuse one parse. Only time changes: the reader is gguf-py's
    either way, and it only reads the file."""
    import gguf

    original, parsed = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in parsed:
            parsed[key] = original(path, mode)
        return parsed[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def load_transformers(name: str, with_tokenizer: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file_name = os.path.split(resolve_model_path(name))
    with one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name) if with_tokenizer else None
    return model, tokenizer


def chat_prompt(loaded: LoadedModel, content: str) -> list[int]:
    tokenizer = loaded.tokenizer
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}]))


def check_greedy_against_transformers(hf_model, prompt: list[int], completion: list[int],
                                      logprobs: list[float] | None = None) -> None:
    """transformers' argmax after prompt + completion[:i] is completion[i], for every i (teacher-forced)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + completion[:-1]])).logits[0, len(prompt) - 1:]
    assert logits.argmax(-1).tolist() == completion
    if logprobs is not None:
        theirs = torch.log_softmax(logits, -1)[torch.arange(len(completion)), completion]
        assert (theirs - torch.tensor(logprobs)).abs().max().item() <= MAX_LOGPROB_DIFF


# ---- 0.5B ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="class")
def small():
    loaded = load_model(SMALL, dtype=torch.float32, device="cpu")
    yield loaded
    del loaded
    gc.collect()


@pytest.fixture(scope="class")
def small_oracle():
    model, tokenizer = load_transformers(SMALL, with_tokenizer=True)
    yield model, tokenizer
    del model, tokenizer
    gc.collect()


class TestSmall:
    """Both 0.5B models live for this class only (~2 GB each): freed before the 1.5B test."""

    def test_config_is_qwen2(self, small):
        config = small.config
        assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == \
            ("qwen2", 24, 14, 2, 64)
        assert config.qkv_bias and config.rope_theta == 1e6 and config.vocab_size == 151_936

    def test_tokenizer_matches_transformers(self, small, small_oracle):
        _, hf_tokenizer = small_oracle
        texts = [code_text()[:3000], pydoc_passages(1)[0][:2000],
                 "Ünïcödé 数字 12345 and   spaces\n\n\ttabs\r\n  indented()  ",
                 "<|im_start|>user\nhi<|im_end|>\n<|fim_prefix|>def f(x):<|fim_suffix|>\n<|fim_middle|>"]
        for text in texts:
            ours = small.tokenizer.encode(text)
            assert ours == hf_tokenizer.encode(text), text[:60]
            assert small.tokenizer.decode(ours) == text

    def test_chat_template_matches_transformers(self, small, small_oracle):
        _, hf_tokenizer = small_oracle
        messages = [{"role": "system", "content": "You write short Python."},
                    {"role": "user", "content": CODE_PROMPT},
                    {"role": "assistant", "content": "def fib(n):\n    return n"},
                    {"role": "user", "content": "Now make it iterative."}]
        for conversation in (messages[1:2], messages):
            ours = small.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
            theirs = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            assert ours == theirs
            assert small.tokenizer.encode(ours) == hf_tokenizer.encode(theirs)
        assert small.tokenizer.stop_token_ids == {151643, 151645}  # <|endoftext|>, <|im_end|>

    def test_next_token_logits_agree_on_prose_and_code(self, small, small_oracle):
        hf_model, _ = small_oracle
        agree = total = 0
        max_diff = 0.0
        for text in (pydoc_passages(1)[0], code_text()):
            token_ids = small.tokenizer.encode(text)[:TOKENS_PER_TEXT]
            assert len(token_ids) == TOKENS_PER_TEXT
            ours = prefill_logits(small, token_ids)
            with torch.no_grad():
                theirs = hf_model(torch.tensor([token_ids])).logits[0]
            agree += (ours.argmax(-1) == theirs.argmax(-1)).sum().item()
            total += len(token_ids)
            max_diff = max(max_diff, (ours - theirs).abs().max().item())
        assert agree / total >= 0.99, f"top-1 agreement {agree / total:.4f}"
        assert max_diff <= MAX_LOGIT_DIFF, f"max |logit diff| {max_diff:.2e}"

    def test_engine_greedy_matches_transformers(self, small, small_oracle):
        """The engine as served: its only 32-weight block linear is the Q8_0 head; Q5_0/Q4_K/Q6_K stay fp32."""
        hf_model, _ = small_oracle
        engine = Engine(EngineConfig(block_size=16, num_kv_blocks=128), loaded=small)
        block_linears = [name for name, m in engine.model.named_modules() if isinstance(m, BlockQuantLinear)]
        assert block_linears == ["lm_head"]
        assert engine.runner.native_decode is None  # it needs every linear in blocks
        prompts = [small.tokenizer.encode("def quicksort(items):\n"), chat_prompt(small, CODE_PROMPT),
                   small.tokenizer.encode("The capital of France is")]
        completions = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                              logprobs=1))
        for prompt, completion in zip(prompts, completions):
            check_greedy_against_transformers(hf_model, prompt, completion.token_ids,
                                              [lp.logprob for lp in completion.logprobs])
        assert engine.pool.num_used_blocks == 0
        assert "def " in small.tokenizer.decode(completions[1].token_ids)


# ---- 1.5B ------------------------------------------------------------------------------------------------------
def test_large_engine_greedy_matches_transformers():
    ours = load_model(LARGE, dtype=torch.float32, device="cpu")
    config = ours.config
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == \
        ("qwen2", 28, 12, 2, 128)
    assert config.qkv_bias and config.rope_theta == 1e6 and config.vocab_size == 151_936
    # Packing would add a second 6 GB copy of the weights; one stream never takes the packed path anyway.
    engine = Engine(EngineConfig(block_size=16, num_kv_blocks=16, pack_cpu_weights=False), loaded=ours)
    assert not any(isinstance(m, BlockQuantLinear) for m in engine.model.modules())  # Q4_K/Q6_K: fp32
    prompts = [ours.tokenizer.encode("def is_prime(n):\n"), chat_prompt(ours, CODE_PROMPT)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
    # One stream at a time: on CPU a 1-row step is a GEMV, 2-3 rows a GEMM several times slower (docs/models.md).
    results = [(c.token_ids, [lp.logprob for lp in c.logprobs])
               for prompt in prompts for c in engine.generate([prompt], params)]
    del engine, ours
    gc.collect()

    hf_model, _ = load_transformers(LARGE, with_tokenizer=False)
    for prompt, (token_ids, logprobs) in zip(prompts, results):
        check_greedy_against_transformers(hf_model, prompt, token_ids, logprobs)
