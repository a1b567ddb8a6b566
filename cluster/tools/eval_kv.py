"""`tierserve eval kv`: what each KV codec costs in memory and in quality, all measured in one run.

For the fp16 baseline and every preset, on the same model and text:

* KV bytes per token, measured from the engine's allocated pages (not from a formula), and the ratio
  to fp16;
* perplexity of real text with every query attending over the *decoded* cache (exactly what decode
  sees), and its increase over fp16;
* greedy agreement: the fraction of identical tokens over 128-token continuations of N prompts, decoded
  by the engine through the codec's fused decode attention, against the fp16 engine's tokens;
* needle retrieval: a passkey hidden at several depths of a 2K/4K/8K haystack of real text.

Text comes from one token stream (pydoc_data.topics by default, or --text FILE) cut into disjoint
regions: perplexity windows, greedy prompts, haystack. Calibration (Block-GTQ keys, TurboQuant outlier channels)
always uses a separate region of pydoc_data.topics, so calibrating never sees the evaluated text.
Progress on stderr, a table on stdout, JSON with --json, a PNG of ratio vs perplexity increase.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from workers.kv.presets import needs_calibration

BASELINE = "float16"
DEFAULT_PRESETS = ("int8", "tq-k8v4", "tq-k4v4", "tq-k4v3", "tq-k3v3", "tq-k2v2", "tq-k3v4+qjl", "tq-k4.5v4",
                   "tq-k3.5v4", "gtq-k5v4.5", "gtq-k4.5v4.5", "gtq-4.0", "gtq-k4v3", "gtq-k3v4", "gtq-3.0", "gtq-2.5")
NEEDLE = "The secret passkey is {key}. Remember it: {key} is the secret passkey."
QUESTION = "\n\nQuestion: What is the secret passkey mentioned above?\nAnswer: The secret passkey is"


@dataclass
class CodecResult:
    codec: str
    bytes_per_token: float
    ratio_vs_fp16: float
    perplexity: float
    perplexity_increase_pct: float
    greedy_agreement: float  # identical tokens / all compared tokens
    greedy_mean_first_divergence: float  # tokens before the first difference, averaged over prompts
    needle_accuracy: dict[str, float] = field(default_factory=dict)  # context length -> fraction found
    seconds: float = 0.0


def _progress(message: str) -> None:
    print(f"[eval kv] {message}", file=sys.stderr, flush=True)


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


@dataclass(frozen=True)
class TextRegions:
    perplexity_windows: list[list[int]]
    greedy_prompts: list[list[int]]
    haystack: list[int]


def split_text(token_ids: list[int], *, num_windows: int, window_tokens: int, num_prompts: int,
               prompt_tokens: int, haystack_tokens: int) -> TextRegions:
    """Disjoint regions of one token stream; raises ValueError if the text is too short."""
    needed = num_windows * window_tokens + num_prompts * prompt_tokens + haystack_tokens
    if len(token_ids) < needed:
        raise ValueError(f"text has {len(token_ids)} tokens; this eval needs {needed} (use a longer --text or "
                         f"fewer windows/prompts/needle lengths)")
    cursor = 0
    windows = []
    for _ in range(num_windows):
        windows.append(token_ids[cursor:cursor + window_tokens])
        cursor += window_tokens
    prompts = []
    for _ in range(num_prompts):
        prompts.append(token_ids[cursor:cursor + prompt_tokens])
        cursor += prompt_tokens
    return TextRegions(windows, prompts, token_ids[cursor:cursor + haystack_tokens])


def calibration_windows(tokenizer, num_windows: int = 4, window_tokens: int = 512) -> list[list[int]]:
    """The END of pydoc_data.topics (the eval reads from its start)."""
    token_ids = tokenizer.encode(pydoc_text())
    tail = token_ids[-num_windows * window_tokens:]
    return [tail[i * window_tokens:(i + 1) * window_tokens] for i in range(num_windows)]


@torch.inference_mode()
def perplexity(model, codec, windows: list[list[int]], block_size: int = 16) -> float:
    """exp(mean NLL of each next token) with queries attending over the codec's decoded cache."""
    from workers.attention import AttentionMetadata, PrefillChunk

    total_nll, total_tokens = 0.0, 0
    for token_ids in windows:
        num_tokens = len(token_ids)
        num_blocks = -(-num_tokens // block_size)
        pages = [codec.allocate(layer, num_blocks, block_size, model.device) for layer in range(model.config.num_layers)]
        meta = AttentionMetadata(slot_mapping=torch.arange(num_tokens, device=model.device), num_decode_tokens=0,
                                 decode_block_tables=None, decode_seq_lens=None,
                                 prefills=(PrefillChunk(0, num_tokens, 0, torch.arange(num_blocks, device=model.device)),))
        ids = torch.tensor(token_ids, device=model.device)
        hidden = model(ids, torch.arange(num_tokens, device=model.device), pages, codec, meta)
        targets = ids[1:]
        for start in range(0, num_tokens - 1, 512):  # logits in slices: [T, V] at once would be ~GBs
            logits = model.compute_logits(hidden[start:min(start + 512, num_tokens - 1)])
            nll = torch.nn.functional.cross_entropy(logits, targets[start:start + logits.shape[0]], reduction="sum")
            total_nll += float(nll)
        total_tokens += num_tokens - 1
    return math.exp(total_nll / total_tokens)


def needle_prompts(tokenizer, haystack: list[int], lengths: list[int], depths: list[float],
                   seed: int = 0) -> list[tuple[int, float, str, list[int]]]:
    """-> (context length, depth, passkey, prompt token ids) for every length x depth."""
    rng = random.Random(seed)
    question = tokenizer.encode(QUESTION)
    cases = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            needle = tokenizer.encode(" " + NEEDLE.format(key=key) + " ")
            filler = length - len(needle) - len(question)
            at = int(filler * depth)
            cases.append((length, depth, key, haystack[:at] + needle + haystack[at:filler] + question))
    return cases


def build_engine(loaded, codec: str, calibration_path: str | None, max_len: int):
    from workers.config import EngineConfig
    from workers.engine import Engine

    # One chunk per prompt (budget = the longest prompt) keeps prefill on the causal fast path.
    config = EngineConfig(kv_codec=codec, kv_calibration=calibration_path if needs_calibration(codec) else None,
                          max_model_len=max_len, max_num_batched_tokens=max_len, max_num_seqs=16,
                          num_kv_blocks=-(-4 * max_len // 16), enable_prefix_caching=False)
    return Engine(config, loaded=loaded)


def evaluate_codec(loaded, name: str, calibration_path: str | None, regions: TextRegions,
                   needle_cases, baseline_tokens: list[list[int]] | None, max_len: int,
                   greedy_tokens: int) -> tuple[CodecResult, list[list[int]]]:
    from workers.sampling_params import SamplingParams

    started = time.perf_counter()
    engine = build_engine(loaded, name, calibration_path, max_len)
    codec = engine.codec
    allocated = sum(pages.nbytes() for pages in engine.kv_pages)
    bytes_per_token = allocated / (engine.pool.num_blocks * engine.block_size)
    _progress(f"{codec.name}: {bytes_per_token:.0f} bytes/token; perplexity")
    ppl = perplexity(engine.model, codec, regions.perplexity_windows)
    _progress(f"{codec.name}: perplexity {ppl:.3f}; greedy continuations")
    greedy = SamplingParams(max_tokens=greedy_tokens, temperature=0.0, ignore_eos=True)
    tokens = [c.token_ids for c in engine.generate(regions.greedy_prompts, greedy)]
    reference = baseline_tokens or tokens
    same = sum(a == b for ours, theirs in zip(tokens, reference) for a, b in zip(ours, theirs))
    first_divergence = [next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
                        for ours, theirs in zip(tokens, reference)]
    needle: dict[str, list[bool]] = {}
    if needle_cases:
        _progress(f"{codec.name}: {len(needle_cases)} needle prompts")
        # One prompt at a time: alone in the step, a whole prompt is one chunk and takes the causal fast path
        # (batched, the scheduler would split prompts into chunks that need a masked, much slower attention).
        answers = [engine.generate([case[3]], SamplingParams(max_tokens=8, temperature=0.0))[0]
                   for case in needle_cases]
        for (length, _, key, _), answer in zip(needle_cases, answers):
            needle.setdefault(str(length), []).append(key in answer.text.replace(" ", ""))
    result = CodecResult(
        codec=codec.name, bytes_per_token=bytes_per_token, ratio_vs_fp16=0.0, perplexity=ppl,
        perplexity_increase_pct=0.0, greedy_agreement=same / max(1, sum(len(t) for t in reference)),
        greedy_mean_first_divergence=sum(first_divergence) / max(1, len(first_divergence)),
        needle_accuracy={length: sum(found) / len(found) for length, found in needle.items()},
        seconds=time.perf_counter() - started)
    return result, tokens


def length_name(num_tokens: int) -> str:
    """2048 -> "2K": the column label of a context length."""
    return f"{round(num_tokens / 1024)}K" if num_tokens >= 1024 else str(num_tokens)


def _table(results: list[CodecResult], lengths: list[int]) -> str:
    header = (f"{'codec':<24} {'B/token':>8} {'ratio':>6} {'ppl':>8} {'dppl%':>7} {'greedy':>7} {'1st-div':>7} "
              + " ".join(f"{'ndl' + length_name(n):>6}" for n in lengths) + f" {'sec':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        needles = " ".join(f"{r.needle_accuracy.get(str(n), float('nan')):>6.2f}" for n in lengths)
        lines.append(f"{r.codec:<24} {r.bytes_per_token:>8.0f} {r.ratio_vs_fp16:>6.2f} {r.perplexity:>8.3f} "
                     f"{r.perplexity_increase_pct:>+7.2f} {r.greedy_agreement:>7.3f} "
                     f"{r.greedy_mean_first_divergence:>7.1f} {needles} {r.seconds:>6.0f}")
    return "\n".join(lines)


def plot(results: list[CodecResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in results:
        color = "black" if r.codec == BASELINE else ("tab:green" if r.codec.startswith("gtq") else "tab:blue")
        axis.scatter(r.ratio_vs_fp16, r.perplexity_increase_pct, color=color)
        axis.annotate(r.codec.split("@")[0], (r.ratio_vs_fp16, r.perplexity_increase_pct), fontsize=8,
                      xytext=(4, 3), textcoords="offset points")
    axis.axhline(2.0, color="tab:red", linestyle=":", linewidth=1)
    axis.axhline(0.5, color="tab:orange", linestyle=":", linewidth=1)
    axis.set_xlabel("KV compression vs fp16 (x, measured bytes)")
    axis.set_ylabel("perplexity increase (%)")
    axis.set_yscale("symlog", linthresh=1.0)
    axis.set_title("KV codecs: memory vs quality")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_eval_kv(args: argparse.Namespace) -> int:
    from workers.kv.calibration import calibrate
    from workers.model.loader import load_model

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    lengths = [int(n) for n in args.needle_lengths.split(",") if n]
    depths = [float(d) for d in args.needle_depths.split(",") if d]
    presets = [p for p in args.presets.split(",") if p]
    _progress("loading the model")
    loaded = load_model(args.model, dtype=torch.float32, device="cpu")
    tokenizer = loaded.tokenizer
    max_len = min(loaded.config.max_position_embeddings, max(lengths + [args.window_tokens]) + 16)
    if lengths and max(lengths) + 8 > loaded.config.max_position_embeddings:
        raise SystemExit(f"needle length {max(lengths)} does not fit the model's context "
                         f"{loaded.config.max_position_embeddings}")
    text = open(args.text, encoding="utf-8").read() if args.text else pydoc_text()
    regions = split_text(tokenizer.encode(text), num_windows=args.windows, window_tokens=args.window_tokens,
                         num_prompts=args.prompts, prompt_tokens=128, haystack_tokens=max(lengths, default=0))
    calibration_path = args.calibration
    if any(needs_calibration(p) for p in presets) and not calibration_path:
        out_dir = os.path.dirname(os.path.abspath(args.json_out)) if args.json_out else os.getcwd()
        calibration_path = os.path.join(out_dir, "kv-calibration.pt")
        _progress(f"calibrating on 4 x 512 tokens (pydoc_data.topics tail) -> {calibration_path}")
        calibrate(loaded.model, calibration_windows(tokenizer)).save(calibration_path)
    needle_cases = needle_prompts(tokenizer, regions.haystack, lengths, depths)

    results = []
    baseline, baseline_tokens = evaluate_codec(loaded, BASELINE, None, regions, needle_cases, None, max_len,
                                               args.greedy_tokens)
    results.append(baseline)
    for name in presets:
        result, _ = evaluate_codec(loaded, name, calibration_path, regions, needle_cases, baseline_tokens, max_len,
                                   args.greedy_tokens)
        results.append(result)
    for r in results:
        r.ratio_vs_fp16 = baseline.bytes_per_token / r.bytes_per_token
        r.perplexity_increase_pct = 100.0 * (r.perplexity / baseline.perplexity - 1.0)
    print(_table(results, lengths))
    report = {
        "model": args.model or "SmolLM2-135M (default GGUF)",
        "text": args.text or "pydoc_data.topics",
        "perplexity_tokens": args.windows * args.window_tokens,
        "greedy_prompts": args.prompts, "greedy_tokens": args.greedy_tokens,
        "needle_lengths": lengths, "needle_depths": depths, "calibration": calibration_path,
        "machine": {"platform": platform.platform(), "threads": str(torch.get_num_threads())},
        "results": [asdict(r) for r in results],
    }
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(report, handle, indent=2)
        plot_path = os.path.splitext(args.json_out)[0] + ".png"
        plot(results, plot_path)
        _progress(f"wrote {args.json_out} and {plot_path}")
    return 0


def add_eval_kv_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="codecs to compare with fp16")
    parser.add_argument("--text", default=None, help="UTF-8 text file (default: pydoc_data.topics)")
    parser.add_argument("--calibration", default=None, help="existing calibration file (default: calibrate now)")
    parser.add_argument("--windows", type=int, default=3, help="perplexity windows")
    parser.add_argument("--window-tokens", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=4, help="greedy-agreement prompts")
    parser.add_argument("--greedy-tokens", type=int, default=128)
    parser.add_argument("--needle-lengths", default="2048,4096,8000")
    parser.add_argument("--needle-depths", default="0.1,0.5,0.9")
