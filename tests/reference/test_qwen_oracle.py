"""The Qwen2.5-Coder GGUFs (the registry's second family: Qwen2 with q/k/v bias, rope theta 1e6) vs Hugging Face
transformers loading the same files (fp32 both sides). The models come from the `qwen` extra's chunk packages,
assembled on first use; a missing package fails here with the pip command, it does not skip.

0.5B (Q5_0/Q8_0/Q4_K/Q6_K): tokenizer and chat template; logits, bound: top-1 identical at >= 99% of positions,
max |logit difference| <= 1e-3 (measured: 3.0e-5 on prose, 4.2e-5 on code, 256 tokens each, top-1 100%; only
summation orders differ); the same bound through the block-quantized linears, every linear and the head read as the
file's blocks, each bit-equal to gguf-py's fp32 weight (measured 7.7e-5 on code, top-1 100%); the engine's greedy
tokens are transformers' argmax at every step and their logprobs agree within 1e-3 (measured <= 1.6e-5; the
closest top-2 margin on these prompts is 0.010); the one-call native decode path equals the module path bit for bit.
1.5B (Q4_K/Q6_K; q/k/v mixed in half the layers): every fused block linear is its fp32 weight exactly, and the
engine's greedy tokens on two short prompts, batched (measured logprob diff 1.4e-5).
Ours runs and is freed before transformers loads: one fp32 copy (6 GB) at a time.

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

from kernels.cpu_native import native_kernels
from kernels.quant_linear import PackedBlockWeight
from tests.reference.test_native_decode import run_mixed_batch
from tests.reference.test_tiny_checkpoints import prefill_logits
from tests.texts import pydoc_passages
from workers.config import EngineConfig
from workers.engine import Engine
from workers.model.block_quant_linear import BlockQuantLinear, quantize_linears
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


def check_block_linears(model, num_layers: int) -> dict[tuple, int]:
    """Every linear and the head read as blocks, each the exact fp32 weight the loader made from gguf-py's
    dequantization (fused parts of different types widened losslessly); returns how many of each (kind, group,
    mins)."""
    swapped = [m for m in model.modules() if isinstance(m, BlockQuantLinear)]
    assert len(swapped) == 4 * num_layers + 1 and isinstance(model.lm_head, BlockQuantLinear)
    formats: dict[tuple, int] = {}
    for module in swapped:
        packed = module.packed
        for start in range(0, packed.quants.shape[0], 256):  # 8192 rows at a time: the 1.5B head is 0.9 GB in fp32
            end = min(start + 256, packed.quants.shape[0])
            rows = PackedBlockWeight(packed.kind, min(end * 32, packed.out_features) - start * 32,
                                     packed.in_features, packed.quants[start:end], packed.scales[start:end],
                                     None if packed.mins is None else packed.mins[start:end])
            assert torch.equal(rows.dequantize(), module.weight[start * 32:end * 32])
        key = (packed.kind, packed.group, packed.mins is not None)
        formats[key] = formats.get(key, 0) + 1
    return formats


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


@pytest.fixture(scope="class")
def code_logits(small, small_oracle) -> tuple[list[int], torch.Tensor]:
    """(256 tokens of Python source, transformers' logits at each): the fp32 and the block path are held to them."""
    hf_model, _ = small_oracle
    token_ids = small.tokenizer.encode(code_text())[:TOKENS_PER_TEXT]
    assert len(token_ids) == TOKENS_PER_TEXT
    with torch.no_grad():
        return token_ids, hf_model(torch.tensor([token_ids])).logits[0]


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

    def test_next_token_logits_agree_on_prose_and_code(self, small, small_oracle, code_logits):
        hf_model, _ = small_oracle
        token_ids = small.tokenizer.encode(pydoc_passages(1)[0])[:TOKENS_PER_TEXT]
        assert len(token_ids) == TOKENS_PER_TEXT
        with torch.no_grad():
            prose = (token_ids, hf_model(torch.tensor([token_ids])).logits[0])
        agree = total = 0
        max_diff = 0.0
        for token_ids, theirs in (prose, code_logits):
            ours = prefill_logits(small, token_ids)
            agree += (ours.argmax(-1) == theirs.argmax(-1)).sum().item()
            total += len(token_ids)
            max_diff = max(max_diff, (ours - theirs).abs().max().item())
        assert agree / total >= 0.99, f"top-1 agreement {agree / total:.4f}"
        assert max_diff <= MAX_LOGIT_DIFF, f"max |logit diff| {max_diff:.2e}"

    def test_block_quantized_linears_are_the_files_weights_and_agree_on_code(self, small, code_logits):
        """Every linear and the head read the file's blocks, exactly (the embedding's blocks too, though it is read
        as fp32); chunks of <= 64 rows multiply by them, and the same bound holds."""
        tensors = small.block_tensors
        assert {t.type_name for t in tensors.values()} == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
        assert len(tensors) == 24 * 7 + 2  # every 2-D weight, the embedding and the head included
        assert torch.equal(tensors["model.embed_tokens.weight"].rows().dequantize(), small.model.embed_tokens.weight)
        quantize_linears(small.model, tensors)  # in place: the engines below find them swapped
        # q/k/v (Q5_0 + Q8_0), o, gate/up (Q5_0), the head (Q8_0): q8 per 32; down: Q4_K (q4) or Q6_K (q8 per 16)
        assert check_block_linears(small.model, 24) == {("q8", 32, False): 73, ("q4", 32, True): 12,
                                                        ("q8", 16, False): 12}
        token_ids, theirs = code_logits
        ours = prefill_logits(small, token_ids, chunk_size=48)
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.99
        assert (ours - theirs).abs().max().item() <= MAX_LOGIT_DIFF

    def test_engine_greedy_matches_transformers(self, small, small_oracle):
        """The engine as served: every linear reads the file's blocks, and pure-decode steps take the one-call
        native path."""
        hf_model, _ = small_oracle
        engine = Engine(EngineConfig(block_size=16, num_kv_blocks=128), loaded=small)
        if native_kernels() is not None:
            assert sum(isinstance(m, BlockQuantLinear) for m in engine.model.modules()) == 24 * 4 + 1
            assert engine.runner.native_decode is not None
        prompts = [small.tokenizer.encode("def quicksort(items):\n"), chat_prompt(small, CODE_PROMPT),
                   small.tokenizer.encode("The capital of France is")]
        completions = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                              logprobs=1))
        for prompt, completion in zip(prompts, completions):
            check_greedy_against_transformers(hf_model, prompt, completion.token_ids,
                                              [lp.logprob for lp in completion.logprobs])
        assert engine.pool.num_used_blocks == 0
        assert "def " in small.tokenizer.decode(completions[1].token_ids)

    def test_native_decode_layers_equal_the_module_path_bit_for_bit(self, small):
        """Qwen2's q/k/v bias rides the fused linear's kernel call on both paths (fp16 pages: test_native_decode.py
        on SmolLM2)."""
        if native_kernels() is None:
            pytest.skip("no native kernels here (no C compiler): the module path runs")
        config = EngineConfig(block_size=16, num_kv_blocks=128)
        native_engine = Engine(config, loaded=small)
        module_engine = Engine(config.model_copy(update={"native_decode_layers": False}), loaded=small)
        assert native_engine.runner.native_decode is not None and module_engine.runner.native_decode is None
        native_outputs, native_steps = run_mixed_batch(native_engine)
        module_outputs, _ = run_mixed_batch(module_engine)
        assert native_steps >= 20
        assert native_outputs == module_outputs


# ---- 1.5B ------------------------------------------------------------------------------------------------------
def test_large_engine_greedy_matches_transformers():
    ours = load_model(LARGE, dtype=torch.float32, device="cpu")
    config = ours.config
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == \
        ("qwen2", 28, 12, 2, 128)
    assert config.qkv_bias and config.rope_theta == 1e6 and config.vocab_size == 151_936
    # Where the native kernels cannot be built, packing would add a second 6 GB copy of the fp32 weights.
    engine = Engine(EngineConfig(block_size=16, num_kv_blocks=16, pack_cpu_weights=False), loaded=ours)
    if native_kernels() is not None:
        # q/k/v: Q4_K, or Q4_K + a Q6_K v (widened to q8 per 16 with mins); o, gate/up: Q4_K; down: Q4_K or Q6_K;
        # the head: Q6_K
        assert check_block_linears(engine.model, 28) == {("q4", 32, True): 28 + 28 + 14 + 14, ("q8", 16, True): 14,
                                                   ("q8", 16, False): 14 + 1}
        assert engine.runner.native_decode is not None
    prompts = [ours.tokenizer.encode("def is_prime(n):\n"), chat_prompt(ours, CODE_PROMPT)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
    results = [(c.token_ids, [lp.logprob for lp in c.logprobs]) for c in engine.generate(prompts, params)]
    del engine, ours
    gc.collect()

    hf_model, _ = load_transformers(LARGE, with_tokenizer=False)
    for prompt, (token_ids, logprobs) in zip(prompts, results):
        check_greedy_against_transformers(hf_model, prompt, token_ids, logprobs)
