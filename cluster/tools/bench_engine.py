"""`tierserve bench engine`: prefill and decode throughput of the in-process engine vs transformers.

Everything is measured in one run on the same machine, and ours and the baseline alternate in rounds (these
machines are shared and their speed drifts by tens of percent over minutes, so only interleaved, same-run ratios
mean anything; medians of the rounds are reported, every round is in the JSON). Progress goes to stderr, the table
to stdout, JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class EngineBenchResult:
    model: str
    dtype: str
    threads: int
    prompt_len: int
    decode_tokens: int
    rounds: int  # ours and transformers alternate this many times; every rate below is the median
    matmul_roofline_gflops: float  # model GEMM shapes at batch 32: the fastest of the GEMMs below
    matmul_gflops_by_kernel: dict[str, float]  # torch, mkl_packed, block_quant (where each is available)
    roofline_decode_tok_s: float  # what that roofline allows for decode (2 FLOPs per weight per token)
    prefill_tok_s: float
    single_stream_decode_tok_s: float
    aggregate_decode_tok_s: dict[int, float]
    peak_rss_mb: float
    hf_prefill_tok_s: float | None = None
    hf_single_stream_decode_tok_s: float | None = None
    hf_batch_decode_tok_s: dict[int, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    runs: dict[str, list[float]] = field(default_factory=dict)  # every round's rate, by metric
    machine: dict[str, str] = field(default_factory=dict)


def _progress(message: str) -> None:
    print(f"[bench engine] {message}", file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_matmul_roofline(model_config, dtype: torch.dtype, batch: int = 32, seconds: float = 3.0
                            ) -> dict[str, float]:
    """GFLOP/s of each fp32 GEMM this machine offers on this model's weight shapes at `batch` rows: torch's matmul,
    MKL with the weight packed once, and the native block-quantized kernel (fp32 multiply-adds on weights it
    dequantizes; random Q4 blocks here). The roofline is the best of them: the most a decode step's matmuls could do.
    Variants alternate round by round, so the machine's drift hits all of them alike."""
    shapes = [
        (model_config.num_heads * model_config.head_dim + 2 * model_config.num_kv_heads * model_config.head_dim,
         model_config.hidden_size),
        (model_config.hidden_size, model_config.num_heads * model_config.head_dim),
        (2 * model_config.intermediate_size, model_config.hidden_size),
        (model_config.hidden_size, model_config.intermediate_size),
        (model_config.vocab_size, model_config.hidden_size),
    ]
    from torch import nn

    from kernels.quant_linear import BlockQuantRows, PackedBlockWeight, native_block_quant_linear
    from workers.model.packed_linear import MklPackedLinear, mkl_packing_available

    weights = [torch.randn(shape, dtype=dtype) for shape in shapes]
    inputs = [torch.randn(batch, shape[1], dtype=dtype) for shape in shapes]
    variants = {"torch": [lambda x, w=weight: torch.nn.functional.linear(x, w) for weight in weights]}
    if dtype == torch.float32 and mkl_packing_available():
        variants["mkl_packed"] = [MklPackedLinear(nn.Linear(k, n, bias=False).requires_grad_(False)) for n, k in shapes]
    # Random blocks in SmolLM2's kinds: Q4 linears, the (tied) head in Q8.
    blocks = [PackedBlockWeight.pack(
        BlockQuantRows("q8", torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // 32), None)
        if n == model_config.vocab_size else
        BlockQuantRows("q4", torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // 32),
                       torch.rand(n, k // 32)))
        for n, k in shapes if k % 32 == 0]
    if dtype == torch.float32 and len(blocks) == len(shapes) and \
            native_block_quant_linear(inputs[0], blocks[0]) is not None:
        variants["block_quant"] = [lambda x, w=weight: native_block_quant_linear(x, w) for weight in blocks]
    flops_per_round = sum(2 * batch * n * k for n, k in shapes)
    best = dict.fromkeys(variants, 0.0)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, linears in variants.items():
            started = time.perf_counter()
            for linear, x in zip(linears, inputs):
                linear(x)
            best[name] = max(best[name], flops_per_round / (time.perf_counter() - started) / 1e9)
    return best


def _prompts(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Distinct first tokens so prefix caching cannot share work between requests.
    first = 1000 if vocab_size > 1000 + count else 0
    margin = min(100, vocab_size // 4)  # away from special tokens at either end of the vocabulary
    return [[(first + i) % vocab_size] + torch.randint(margin, vocab_size - margin, (length - 1,),
                                                       generator=generator).tolist()
            for i in range(count)]


def bench_ours(engine, prompts: list[list[int]], decode_tokens: int) -> tuple[float, float]:
    """Runs len(prompts) concurrent requests; returns (time to all first tokens, decode tok/s after that)."""
    from workers.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)
    engine.pool.reset_prefix_cache()
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt_token_ids=prompt, params=params)
    # The decode window opens once every request has its first token (prefill done for all).
    have_first_token: set[str] = set()
    decode_started = None
    decoded = 0
    while engine.has_unfinished():
        outputs = engine.step()
        if decode_started is None:
            have_first_token.update(o.request_id for o in outputs)
            if len(have_first_token) == len(prompts):
                decode_started = time.perf_counter()
        else:
            decoded += sum(len(o.new_token_ids) for o in outputs)
    finished = time.perf_counter()
    return decode_started - started, decoded / (finished - decode_started)


class TransformersBaseline:
    """transformers `generate` on the same checkpoint, dtype and prompt length: the baseline, loaded once and
    measured in rounds interleaved with ours."""

    def __init__(self, model_path: str, dtype: torch.dtype, prompt_len: int, decode_tokens: int, vocab_size: int):
        from transformers import AutoModelForCausalLM

        directory, name = os.path.split(model_path)
        if os.path.isdir(model_path):
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype).eval()
        self.prompt_len, self.decode_tokens, self.vocab_size = prompt_len, decode_tokens, vocab_size

    def generate_seconds(self, batch: int, new_tokens: int) -> float:
        ids = torch.tensor(_prompts(self.vocab_size, batch, self.prompt_len, seed=1))
        started = time.perf_counter()
        with torch.no_grad():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started

    def warm_up(self, batch: int) -> None:
        # The first generate calls of a shape are several times slower (lazy kernel setup).
        self.generate_seconds(batch, 4)
        self.generate_seconds(batch, 4)

    def measure(self, batch: int) -> tuple[float, float]:
        """(prefill seconds: the best of two 1-token generates, decode tok/s: the extra time for decode_tokens
        more tokens, so prefill cancels out)."""
        one = min(self.generate_seconds(batch, 1), self.generate_seconds(batch, 1))
        full = self.generate_seconds(batch, self.decode_tokens + 1)
        return one, batch * self.decode_tokens / (full - one)


def run_engine_bench(args: argparse.Namespace) -> int:
    if args.against:
        from cluster.tools.bench_step_ab import run_step_ab_bench

        return run_step_ab_bench(args)
    from cluster.flags import engine_config
    from workers.engine import Engine

    # 1 stream is always measured in the rounds: the single-stream ratio is a median like every other.
    concurrency = sorted({1, *(int(c) for c in args.concurrency.split(","))})
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    config = engine_config(args)
    _progress("loading the model")
    engine = Engine(config.model_copy(update={
        "max_num_seqs": max(max(concurrency), config.max_num_seqs),
        "max_num_batched_tokens": max(config.max_num_batched_tokens, args.prompt_len),
    }))
    model_config = engine.loaded.config
    dtype = engine.model.dtype
    threads = torch.get_num_threads()
    params_per_token = sum(p.numel() for n, p in engine.model.named_parameters() if "embed_tokens" not in n) \
        + (model_config.vocab_size * model_config.hidden_size if model_config.tie_word_embeddings else 0)
    _progress("measuring the matmul roofline")
    matmul_gflops = measure_matmul_roofline(model_config, dtype)
    roofline = max(matmul_gflops.values())
    vocab = model_config.vocab_size
    baseline = None
    hf_batches = concurrency  # the same workload through transformers at every concurrency (batched generate)
    if not args.skip_baseline:
        _progress("loading the baseline: transformers (same checkpoint, same dtype)")
        baseline = TransformersBaseline(engine.loaded.path, dtype, args.prompt_len, args.decode_tokens, vocab)

    _progress("warm-up")
    bench_ours(engine, _prompts(vocab, 2, args.prompt_len, seed=9), 4)
    for count in concurrency:
        bench_ours(engine, _prompts(vocab, count, 16, seed=100 + count), 4)  # each batch shape once
    for batch in hf_batches if baseline else ():
        baseline.warm_up(batch)
    # Rounds alternate ours and theirs, so both see the same drift of a shared machine; medians are reported.
    prefill_runs: list[float] = []
    decode_runs: dict[int, list[float]] = {count: [] for count in concurrency}
    hf_prefill_runs: list[float] = []
    hf_decode_runs: dict[int, list[float]] = {batch: [] for batch in hf_batches}
    for round_index in range(args.rounds):
        _progress(f"round {round_index + 1}/{args.rounds}: ours")
        prefill_runs.append(args.prompt_len / bench_ours(engine, _prompts(vocab, 1, args.prompt_len, seed=2), 2)[0])
        for count in concurrency:
            decode_runs[count].append(bench_ours(engine, _prompts(vocab, count, args.prompt_len, seed=3 + count),
                                                 args.decode_tokens)[1])
        if baseline:
            _progress(f"round {round_index + 1}/{args.rounds}: transformers")
            for batch in hf_batches:
                prefill_seconds, rate = baseline.measure(batch)
                hf_decode_runs[batch].append(rate)
                if batch == 1:
                    hf_prefill_runs.append(args.prompt_len / prefill_seconds)
    aggregate = {count: statistics.median(runs) for count, runs in decode_runs.items()}
    result = EngineBenchResult(
        model=engine.loaded.path, dtype=str(dtype).removeprefix("torch."), threads=threads,
        prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, rounds=args.rounds,
        matmul_roofline_gflops=roofline, matmul_gflops_by_kernel=matmul_gflops,
        roofline_decode_tok_s=roofline * 1e9 / (2 * params_per_token),
        prefill_tok_s=statistics.median(prefill_runs),
        single_stream_decode_tok_s=aggregate[1],
        aggregate_decode_tok_s=aggregate, peak_rss_mb=_peak_rss_mb(),
        runs={"prefill_tok_s": prefill_runs, **{f"decode_tok_s_{c}": r for c, r in decode_runs.items()},
              **({"hf_prefill_tok_s": hf_prefill_runs} if baseline else {}),
              **{f"hf_decode_tok_s_{b}": r for b, r in hf_decode_runs.items() if baseline}},
        machine={"cpu": platform.processor() or platform.machine(), "cpus": str(os.cpu_count()),
                 "torch": torch.__version__},
    )
    if baseline:
        hf_single = statistics.median(hf_decode_runs[1])
        hf_batch = {batch: statistics.median(runs) for batch, runs in hf_decode_runs.items()}
        result.hf_prefill_tok_s = statistics.median(hf_prefill_runs)
        result.hf_single_stream_decode_tok_s = hf_single
        result.hf_batch_decode_tok_s = hf_batch
        result.ratios = {
            "prefill_vs_hf": result.prefill_tok_s / result.hf_prefill_tok_s,
            "single_stream_vs_hf": result.single_stream_decode_tok_s / hf_single,
            **{f"aggregate_{c}_vs_hf_single": rate / hf_single for c, rate in aggregate.items()},
            **{f"aggregate_{c}_vs_hf_batch_{c}": aggregate[c] / hf_batch[c] for c in hf_batch if c in aggregate},
        }
    result.ratios["aggregate_max_vs_roofline"] = aggregate[max(concurrency)] / result.roofline_decode_tok_s
    print(format_table(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(asdict(result), f, indent=2)
        _progress(f"wrote {args.json_out}")
    return 0


def format_table(result: EngineBenchResult) -> str:
    hf = result.hf_batch_decode_tok_s
    rows = [("metric", "tierserve", "transformers", "ratio")]

    def row(name: str, ours: float, theirs: float | None) -> None:
        rows.append((name, f"{ours:.1f}", f"{theirs:.1f}" if theirs else "-",
                     f"{ours / theirs:.2f}x" if theirs else "-"))

    row(f"prefill tok/s ({result.prompt_len}-token prompt)", result.prefill_tok_s, result.hf_prefill_tok_s)
    row("decode tok/s, 1 stream", result.single_stream_decode_tok_s, result.hf_single_stream_decode_tok_s)
    for count, rate in result.aggregate_decode_tok_s.items():
        if count == 1:
            continue
        row(f"decode tok/s, {count} streams (vs HF 1 stream)", rate, result.hf_single_stream_decode_tok_s)
        if count in hf:
            row(f"decode tok/s, {count} streams (vs HF batch {count})", rate, hf[count])
    kernels = ", ".join(f"{name} {gflops:.0f}" for name, gflops in result.matmul_gflops_by_kernel.items())
    rows.append(("matmul roofline GFLOP/s (model shapes, M=32)", f"{result.matmul_roofline_gflops:.1f}", "-",
                 f"best of: {kernels}"))
    rows.append(("roofline decode tok/s", f"{result.roofline_decode_tok_s:.1f}", "-",
                 f"{result.ratios.get('aggregate_max_vs_roofline', 0):.0%} reached"))
    rows.append(("peak RSS MB (engine + baseline)", f"{result.peak_rss_mb:.0f}", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    header = f"tierserve bench engine: {result.model} ({result.dtype}, {result.threads} threads)"
    return header + "\n" + "\n".join(lines)
