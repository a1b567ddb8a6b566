"""`tierserve eval longctx`: how little KV a long context can keep, per eviction policy and budget, in one run.

Configurations: the full cache (fp16 pages, no eviction) as the baseline; every policy x budget on fp16 pages;
value-aware eviction at every budget on top of each compressed codec (the two ratios multiply).

Each prompt is prefilled once per (codec, score spec) by a prefill engine and handed to one decode engine per
configuration through the tiers' own handoff (workers/handoff/local.py): the decode engine evicts right after
the import, as a decode tier does, and decodes under its budget. The prefill engine's prefix cache means a
prompt's next score spec only recomputes the observation window.

Per configuration:
* perplexity of the continuation of long real texts: C context tokens, then K tokens teacher-forced through
  decode with eviction active throughout (the first continuation token comes from prefill, before any eviction,
  so it is the same everywhere and left out);
* needle retrieval: a passkey at several depths of real-text haystacks of several lengths (greedy, 8 tokens);
* KV memory held: the most bytes the request holds between decode steps (pages + value weights, measured from
  the engine's blocks, after each step's eviction), and the ratio to what the full fp16 cache held for the same
  request in the same run. Transients are not in it: the import needs the whole prompt's blocks for a moment,
  and a step may take one block before its eviction.
Progress on stderr, a table on stdout, JSON with --json and a PNG heatmap of the needle grid beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from cluster.tools.eval_kv import length_name, needle_prompts, pydoc_text
from workers.config import EvictionConfig

BASELINE_CODEC = "float16"
NEEDLE_TOKENS = 8


@dataclass(frozen=True)
class LongCtxConfig:
    policy: str  # an eviction policy name, then options: "value_aware:l1" (||v||_1 weights), ":sum" (aggregate)
    budget: float  # fraction of blocks kept (1.0 with policy none: the full cache)
    codec: str

    @property
    def label(self) -> str:
        if self.policy == "none":
            name = "full cache"
        else:
            name = f"{self.policy}@{self.budget:g}"
        return name if self.codec == BASELINE_CODEC else f"{name}+{self.codec}"

    def eviction(self, observe_window: int) -> dict:
        if self.policy == "none":
            return {}
        policy, *options = self.policy.split(":")
        eviction = {"policy": policy, "budget": self.budget, "observe_window": observe_window}
        for option in options:
            eviction["aggregate" if option in ("sum", "max") else "value_norm"] = option
        return eviction


@dataclass
class LongCtxResult:
    label: str
    policy: str
    budget: float
    codec: str
    perplexity: float = float("nan")
    perplexity_increase_pct: float = float("nan")
    window_perplexity: list[float] = field(default_factory=list)  # per perplexity window, for paired comparisons
    needle: dict[str, bool] = field(default_factory=dict)  # "length@depth" -> found
    needle_accuracy: dict[str, float] = field(default_factory=dict)  # length -> fraction found
    needle_overall: float = float("nan")
    kv_bytes_held: float = 0.0  # mean over requests of the most bytes held while decoding
    memory_ratio_vs_fp16_full: float = 0.0  # mean over requests of (full fp16 cache's bytes held / bytes held)
    seconds: float = 0.0
    _ratios: list[float] = field(default_factory=list, repr=False)
    _held: list[float] = field(default_factory=list, repr=False)


def _progress(message: str) -> None:
    print(f"[eval longctx] {message}", file=sys.stderr, flush=True)


class Harness:
    """One prefill engine per codec, one decode engine per configuration; every request goes through all."""

    def __init__(self, loaded, configs: list[LongCtxConfig], max_len: int, observe_window: int):
        from workers.config import EngineConfig
        from workers.engine import Engine

        self.configs = configs
        block_size = 16
        prompt_blocks = -(-max_len // block_size) + 2
        common = dict(max_model_len=max_len, max_num_batched_tokens=max_len, max_num_seqs=4)
        self.prefill = {codec: Engine(EngineConfig(kv_codec=codec, role="prefill", num_kv_blocks=2 * prompt_blocks,
                                                   **common), loaded=loaded)
                        for codec in dict.fromkeys(config.codec for config in configs)}
        # A decode engine receives the whole prompt before it evicts, so its pool holds one full request.
        self.decode = {config.label: Engine(EngineConfig(kv_codec=config.codec, role="decode", num_kv_blocks=prompt_blocks,
                                                         enable_prefix_caching=False,
                                                         kv_eviction=config.eviction(observe_window), **common),
                                            loaded=loaded)
                       for config in configs}
        assert configs[0].codec == BASELINE_CODEC and configs[0].policy == "none", "the full fp16 cache comes first"
        self.results = {config.label: LongCtxResult(config.label, config.policy, config.budget, config.codec)
                        for config in configs}
        self._next_id = 0

    def run(self, prompt: list[int], params) -> dict[str, list]:
        """Every configuration's outputs for one request (prefilled once per codec and score spec)."""
        from workers.handoff.local import import_held, prefill_and_hold

        groups: dict[tuple, list[LongCtxConfig]] = {}
        for config in self.configs:
            groups.setdefault((config.codec, self.decode[config.label].score_spec), []).append(config)
        outputs: dict[str, list] = {}
        held_bytes: dict[str, int] = {}  # the most bytes each configuration held for this request
        for (codec, score_spec), group in groups.items():
            prefill = self.prefill[codec]
            request_id = f"longctx-{self._next_id}"
            self._next_id += 1
            held = prefill_and_hold(prefill, request_id, prompt, params, score_spec)
            try:
                for config in group:
                    started = time.perf_counter()
                    decode = self.decode[config.label]
                    stream = [import_held(prefill, held, decode, prompt, params)]
                    peak_blocks = decode.pool.num_used_blocks  # after the import's eviction
                    while not stream[-1].finished:
                        stream.extend(decode.step())
                        peak_blocks = max(peak_blocks, decode.pool.num_used_blocks)
                    held_bytes[config.label] = peak_blocks * decode.kv_stats().bytes_per_block
                    self.results[config.label].seconds += time.perf_counter() - started
                    outputs[config.label] = stream
            finally:
                prefill.release_kv(request_id)
        full_cache = held_bytes[self.configs[0].label]  # the same request, measured the same way
        for label, nbytes in held_bytes.items():
            self.results[label]._held.append(nbytes)
            self.results[label]._ratios.append(full_cache / nbytes)
        return outputs

    def finish(self) -> list[LongCtxResult]:
        results = list(self.results.values())
        for result in results:
            result.kv_bytes_held = sum(result._held) / max(1, len(result._held))
            result.memory_ratio_vs_fp16_full = sum(result._ratios) / max(1, len(result._ratios))
            if result.needle:
                result.needle_overall = sum(result.needle.values()) / len(result.needle)
        return results


def perplexity_windows(token_ids: list[int], num_windows: int, context: int, continuation: int) -> list[list[int]]:
    size = context + continuation
    if len(token_ids) < num_windows * size:
        raise ValueError(f"text has {len(token_ids)} tokens; {num_windows} perplexity windows of {size} need more")
    return [token_ids[i * size:(i + 1) * size] for i in range(num_windows)]


def measure_perplexity(harness: Harness, windows: list[list[int]], context: int) -> None:
    from workers.sampling_params import SamplingParams

    nll = {label: 0.0 for label in harness.results}
    count = 0
    for index, window in enumerate(windows):
        prompt, continuation = window[:context], window[context:]
        _progress(f"perplexity window {index + 1}/{len(windows)}: {len(prompt)} context + {len(continuation)} tokens")
        params = SamplingParams(max_tokens=len(continuation), temperature=0, ignore_eos=True, logprobs=1,
                                forced_token_ids=tuple(continuation))
        for label, stream in harness.run(prompt, params).items():
            logprobs = [lp.logprob for output in stream[1:] for lp in output.logprobs]  # [0] came from prefill
            assert len(logprobs) == len(continuation) - 1
            nll[label] -= sum(logprobs)
            harness.results[label].window_perplexity.append(math.exp(-sum(logprobs) / len(logprobs)))
        count += len(continuation) - 1
    baseline = math.exp(nll[harness.configs[0].label] / count)
    for label, result in harness.results.items():
        result.perplexity = math.exp(nll[label] / count)
        result.perplexity_increase_pct = 100.0 * (result.perplexity / baseline - 1.0)


def measure_needles(harness: Harness, cases) -> None:
    from workers.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=NEEDLE_TOKENS, temperature=0)
    for index, (length, depth, key, prompt) in enumerate(cases):
        _progress(f"needle {index + 1}/{len(cases)}: {len(prompt)} tokens, depth {depth:g}")
        for label, stream in harness.run(prompt, params).items():
            text = "".join(output.new_text for output in stream)
            harness.results[label].needle[f"{length}@{depth:g}"] = key in text.replace(" ", "")
    for result in harness.results.values():
        by_length: dict[str, list[bool]] = {}
        for cell, found in result.needle.items():
            by_length.setdefault(cell.split("@")[0], []).append(found)
        result.needle_accuracy = {length: sum(found) / len(found) for length, found in by_length.items()}


def _table(results: list[LongCtxResult], lengths: list[int]) -> str:
    header = (f"{'config':<30} {'held MB':>8} {'vs fp16':>7} {'ppl':>8} {'dppl%':>7} "
              + " ".join(f"{'ndl' + length_name(n):>6}" for n in lengths) + f" {'ndl':>5} {'sec':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        needles = " ".join(f"{r.needle_accuracy.get(str(n), float('nan')):>6.2f}" for n in lengths)
        lines.append(f"{r.label:<30} {r.kv_bytes_held / 2**20:>8.1f} {r.memory_ratio_vs_fp16_full:>6.1f}x "
                     f"{r.perplexity:>8.3f} {r.perplexity_increase_pct:>+7.2f} {needles} {r.needle_overall:>5.2f} "
                     f"{r.seconds:>6.0f}")
    return "\n".join(lines)


def plot(results: list[LongCtxResult], cells: list[str], path: str) -> None:
    """Heatmap: configurations x (length, depth) needle cells, found or not; memory and perplexity per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[1.0 if r.needle.get(cell) else 0.0 for cell in cells] for r in results]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(cells) + 4.5), 0.38 * len(results) + 1.8))
    axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(len(cells)))
    axis.set_xticklabels([f"{length_name(int(c.split('@')[0]))}@{c.split('@')[1]}" for c in cells], rotation=60,
                         fontsize=7)
    axis.set_yticks(range(len(results)))
    axis.set_yticklabels([f"{r.label}  ({r.memory_ratio_vs_fp16_full:.1f}x, ppl {r.perplexity_increase_pct:+.1f}%)"
                          for r in results], fontsize=7)
    axis.set_xlabel("needle: context length @ depth (green = retrieved)")
    axis.set_title("Long-context KV eviction: needle retrieval per configuration")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_configs(policies: list[str], budgets: list[float], codecs: list[str]) -> list[LongCtxConfig]:
    configs = [LongCtxConfig("none", 1.0, BASELINE_CODEC)]
    configs += [LongCtxConfig(policy, budget, BASELINE_CODEC) for budget in budgets for policy in policies]
    configs += [LongCtxConfig("value_aware", budget, codec) for codec in codecs for budget in budgets]
    return configs


def run_eval_longctx(args: argparse.Namespace) -> int:
    from workers.model.loader import load_model

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    lengths = [int(n) for n in args.needle_lengths.split(",") if n]
    depths = [float(d) for d in args.needle_depths.split(",") if d]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    policies = [p for p in args.policies.split(",") if p]
    codecs = [c for c in args.compound_codecs.split(",") if c]
    _progress("loading the model")
    loaded = load_model(args.model, dtype=torch.float32, device="cpu")
    context_window = loaded.config.max_position_embeddings
    max_len = max([n + NEEDLE_TOKENS for n in lengths] + [args.ppl_context + args.ppl_continuation]) + 16
    if max_len > context_window:
        raise ValueError(f"needle lengths / perplexity windows need {max_len} tokens; the model's context is "
                         f"{context_window}")
    text = open(args.text, encoding="utf-8").read() if args.text else pydoc_text()
    token_ids = loaded.tokenizer.encode(text)
    windows = perplexity_windows(token_ids, args.ppl_windows, args.ppl_context, args.ppl_continuation)
    haystack = token_ids[len(windows) * (args.ppl_context + args.ppl_continuation):]
    if lengths and len(haystack) < max(lengths):
        raise ValueError(f"text leaves {len(haystack)} tokens for haystacks; the longest needle length is {max(lengths)}")
    cases = needle_prompts(loaded.tokenizer, haystack, lengths, depths)
    configs = build_configs(policies, budgets, codecs)
    _progress(f"{len(configs)} configurations: {', '.join(c.label for c in configs)}")
    harness = Harness(loaded, configs, max_len, args.observe_window)
    if windows:
        measure_perplexity(harness, windows, args.ppl_context)
    measure_needles(harness, cases)
    results = harness.finish()
    print(_table(results, lengths))
    report = {
        "model": args.model or "SmolLM2-135M (default GGUF)",
        "text": args.text or "pydoc_data.topics",
        "perplexity": {"windows": args.ppl_windows, "context": args.ppl_context,
                       "continuation": args.ppl_continuation},
        "needle_lengths": lengths, "needle_depths": depths, "budgets": budgets, "observe_window": args.observe_window,
        "baseline": "full cache, fp16 pages, no eviction",
        "machine": {"platform": platform.platform(), "threads": str(torch.get_num_threads())},
        "results": [{k: v for k, v in asdict(r).items() if not k.startswith("_")} for r in results],
    }
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as handle:
            json.dump(report, handle, indent=2)
        plot_path = os.path.splitext(args.json_out)[0] + ".png"
        plot(results, [f"{length}@{depth:g}" for length in lengths for depth in depths], plot_path)
        _progress(f"wrote {args.json_out} and {plot_path}")
    return 0


def add_eval_longctx_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("longctx")
    group.add_argument("--policies", default="streaming,h2o,snapkv,value_aware",
                       help="eviction policies, options after ':' (value_aware:l1 weighs votes by ||v||_1 instead "
                            "of ||W_O v||; h2o:sum adds the (layer, head) votes instead of taking the largest share)")
    group.add_argument("--budgets", default="0.5,0.25,0.125", help="fractions of each request's blocks kept")
    group.add_argument("--compound-codecs", default="tq-k4v4",
                       help="codecs run under value_aware at every budget (compound ratio); empty for none")
    group.add_argument("--ppl-windows", type=int, default=2, help="perplexity texts")
    group.add_argument("--ppl-context", type=int, default=4096, help="context tokens before each continuation")
    group.add_argument("--ppl-continuation", type=int, default=256, help="continuation tokens scored")
    group.add_argument("--observe-window", type=int, default=EvictionConfig.model_fields["observe_window"].default,
                       help="prompt queries that score blocks")
