"""`tierserve bench spec`: speculative decoding against plain decoding, in the same run, per drafter, prompt family
and stream count.

For each drafter (--spec-methods) two engines share one loaded model: plain, and speculating. They alternate
(--rounds; these machines drift by tens of percent over minutes, so only interleaved ratios mean anything) on the
same greedy prompts; the decode rate counts the tokens emitted after every stream has its first token, over the
time since then (prefill excluded). Every round also checks that the speculating engine's tokens are exactly
plain decoding's. Progress goes to stderr, the table to stdout, JSON (+ a PNG beside it) to --json.

# c=streams (concurrency), F=prompt families
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from cluster.tools.spec_prompts import FAMILIES, family_prompts


@dataclass
class SpecCell:
    method: str
    family: str
    streams: int
    plain_decode_tok_s: float  # medians over the rounds
    spec_decode_tok_s: float
    speedup: float  # spec / plain, the median of the per-round ratios
    mean_acceptance_length: float  # tokens per verify pass (1 + accepted drafts)
    acceptance_rate: float  # accepted / drafted
    greedy_exact: bool  # every round's tokens equal plain decoding's
    output_tokens: int  # per round, all streams
    runs: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class SpecBenchResult:
    model: str
    max_tokens: int
    rounds: int
    threads: int
    num_speculative_tokens: int
    max_batch_size: int
    cells: list[SpecCell]
    policy: str = "cost"
    llama_server: list[dict] = field(default_factory=list)  # the llama.cpp baseline, when --llama-server was given
    machine: dict[str, str] = field(default_factory=dict)


def _progress(message: str) -> None:
    print(f"[bench spec] {message}", file=sys.stderr, flush=True)


def decode_run(engine, prompts: list[str], params) -> tuple[list[list[int]], float, int]:
    """Run the prompts to completion together: (tokens per prompt, decode tok/s after the last first token, the
    tokens counted in that rate)."""
    request_ids = [f"bench-spec-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(request_ids, prompts):
        engine.add_request(request_id, prompt=prompt, params=params)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
    decode_start: float | None = None
    decode_tokens = 0
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if decode_start is not None:
                decode_tokens += len(output.new_token_ids)
            tokens[output.request_id].extend(output.new_token_ids)
        if decode_start is None and all(tokens.values()):
            decode_start = now
    elapsed = time.perf_counter() - decode_start if decode_start is not None else 0.0
    return [tokens[request_id] for request_id in request_ids], decode_tokens / max(elapsed, 1e-9), decode_tokens


def _make_engines(args: argparse.Namespace, methods: list[str]):
    from cluster.flags import engine_config
    from workers.config import SpeculativeConfig
    from workers.engine import Engine
    from workers.model.loader import load_model

    base = engine_config(args)
    loaded = load_model(base.model, dtype=base.resolved_dtype(), device=base.resolved_device())
    streams = max(int(c) for c in args.concurrency.split(","))
    base = base.model_copy(update={"max_num_seqs": max(base.max_num_seqs, streams)})
    plain = Engine(base.model_copy(update={"speculative": SpeculativeConfig()}), loaded=loaded)
    spec = {method: Engine(base.model_copy(update={"speculative": _speculative(base.speculative, method)}),
                           loaded=loaded) for method in methods}
    return loaded, base, plain, spec


# A drafter name with this suffix drafts a token tree (e.g. ngram-tree): --speculative-tree-width, or this.
TREE_SUFFIX, DEFAULT_TREE_WIDTH = "-tree", 3


def _speculative(spec, method: str):
    """The engine's speculative config for one measured drafter name."""
    update = {"method": method, "tree_width": 1}
    if method.endswith(TREE_SUFFIX):
        width = spec.tree_width if spec.tree_width > 1 else DEFAULT_TREE_WIDTH
        update = {"method": method[:-len(TREE_SUFFIX)], "tree_width": width}
    return type(spec).model_validate({**spec.model_dump(), **update})  # validated: a tree is for ngram only


def run_spec_bench(args: argparse.Namespace) -> int:
    from workers.sampling_params import SamplingParams

    methods = [m for m in args.spec_methods.split(",") if m]
    families = [f for f in args.families.split(",") if f]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    loaded, base, plain, spec_engines = _make_engines(args, methods)
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    _progress(f"model {loaded.path}; drafters {methods}; families {families}; streams {concurrencies}; "
              f"{args.rounds} rounds")
    decode_run(plain, family_prompts("chat", loaded.tokenizer, 1), params)  # warm-up (first-call costs)
    cells = []
    for method, engine in spec_engines.items():
        decode_run(engine, family_prompts("code", loaded.tokenizer, 1), params)
        for family in families:
            for streams in concurrencies:
                cells.append(_measure_cell(plain, engine, method, family, streams, loaded.tokenizer, params,
                                           args.rounds))
    spec = base.speculative
    baseline = []
    if args.llama_server:
        from dataclasses import asdict as as_dict

        from cluster.tools.llama_baseline import run_llama_baseline
        from workers.model.loader import resolve_model_path

        draft = args.llama_draft_model or spec.draft_model
        _progress(f"llama-server baseline ({args.llama_server}), draft model {draft}")
        baseline = [as_dict(r) for r in run_llama_baseline(
            args.llama_server, loaded.path, resolve_model_path(draft) if draft else None,
            {family: family_prompts(family, loaded.tokenizer, 1) for family in families}, args.decode_tokens,
            __import__("torch").get_num_threads(), args.no_repack)]
    result = SpecBenchResult(
        model=os.path.basename(loaded.path), max_tokens=args.decode_tokens, rounds=args.rounds,
        threads=__import__("torch").get_num_threads(), num_speculative_tokens=spec.num_speculative_tokens,
        max_batch_size=spec.max_batch_size, cells=cells, policy=spec.policy, llama_server=baseline,
        machine={"platform": platform.platform(), "cpus": str(os.cpu_count())})
    print(format_table(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(asdict(result), f, indent=2)
        write_plot(result, os.path.splitext(args.json_out)[0] + ".png")
        _progress(f"wrote {args.json_out}")
    return 0 if all(cell.greedy_exact for cell in cells) else 1


def _measure_cell(plain, engine, method: str, family: str, streams: int, tokenizer, params, rounds: int) -> SpecCell:
    prompts = family_prompts(family, tokenizer, streams)
    runs: dict[str, list[float]] = {"plain": [], "spec": [], "ratio": []}
    exact = True
    stats = engine.speculator.stats
    before = (stats.num_verify_passes, stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_emitted_tokens)
    output_tokens = 0
    for _ in range(rounds):
        plain_tokens, plain_rate, _ = decode_run(plain, prompts, params)
        spec_tokens, spec_rate, _ = decode_run(engine, prompts, params)
        exact &= spec_tokens == plain_tokens
        output_tokens = sum(len(t) for t in spec_tokens)
        runs["plain"].append(plain_rate)
        runs["spec"].append(spec_rate)
        runs["ratio"].append(spec_rate / plain_rate)
    passes, drafts, accepted, emitted = (now - then for now, then in zip(
        (stats.num_verify_passes, stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_emitted_tokens),
        before))
    cell = SpecCell(method=method, family=family, streams=streams,
                    plain_decode_tok_s=statistics.median(runs["plain"]),
                    spec_decode_tok_s=statistics.median(runs["spec"]), speedup=statistics.median(runs["ratio"]),
                    mean_acceptance_length=emitted / passes if passes else 1.0,
                    acceptance_rate=accepted / drafts if drafts else 0.0, greedy_exact=exact,
                    output_tokens=output_tokens, runs=runs)
    _progress(f"{method} {family} c={streams}: plain {cell.plain_decode_tok_s:.1f} tok/s, spec "
              f"{cell.spec_decode_tok_s:.1f} tok/s ({cell.speedup:.2f}x), acceptance length "
              f"{cell.mean_acceptance_length:.2f}, exact {exact}")
    return cell


def format_table(result: SpecBenchResult) -> str:
    lines = [f"bench spec: {result.model}, {result.max_tokens} greedy tokens per stream, {result.rounds} rounds, "
             f"{result.threads} threads, k<={result.num_speculative_tokens}, {result.policy} policy, none above "
             f"{result.max_batch_size} requests",
             f"{'drafter':<12}{'family':<11}{'streams':>8}{'plain tok/s':>13}{'spec tok/s':>12}{'speedup':>9}"
             f"{'accept len':>12}{'accept %':>10}{'exact':>7}"]
    for cell in result.cells:
        lines.append(f"{cell.method:<12}{cell.family:<11}{cell.streams:>8}{cell.plain_decode_tok_s:>13.1f}"
                     f"{cell.spec_decode_tok_s:>12.1f}{cell.speedup:>8.2f}x{cell.mean_acceptance_length:>12.2f}"
                     f"{100 * cell.acceptance_rate:>9.0f}%{'yes' if cell.greedy_exact else 'NO':>7}")
    for entry in result.llama_server:
        acceptance = entry["draft_acceptance"]
        lines.append(f"llama-server {'(-md draft)' if entry['draft'] else '(plain)':<12} {entry['family']:<11} "
                     + (f"failed: {entry['error']}" if entry.get("error") else
                        f"1 stream: {entry['decode_tok_s']:.1f} tok/s"
                        + (f", acceptance {100 * acceptance:.0f}%" if acceptance is not None else "")))
    return "\n".join(lines)


def write_plot(result: SpecBenchResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({cell.method for cell in result.cells})
    if not methods:  # a baseline-only run (--spec-methods ""): the table and JSON say it all
        return
    figure, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), squeeze=False)
    for axis, method in zip(axes[0], methods):
        cells = [cell for cell in result.cells if cell.method == method]
        streams = sorted({cell.streams for cell in cells})
        width = 0.8 / max(1, len(streams))
        families = [f for f in FAMILIES if any(cell.family == f for cell in cells)]
        for offset, count in enumerate(streams):
            speedups = [next((c.speedup for c in cells if c.family == f and c.streams == count), 0.0)
                        for f in families]
            axis.bar([i + offset * width for i in range(len(families))], speedups, width, label=f"{count} streams")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([i + width * (len(streams) - 1) / 2 for i in range(len(families))], families)
        axis.set_ylabel("decode speed-up vs plain (same run)")
        axis.set_title(f"{result.model}: {method}")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec-methods", default="ngram",
                        help="spec: drafters to measure (comma list; a -tree suffix drafts token trees: ngram-tree)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="spec: prompt families (comma list)")
    parser.add_argument("--llama-server", default=None, metavar="PATH",
                        help="spec: also time llama.cpp's llama-server on the same GGUF, plain and with its own "
                             "draft-model speculation (-md), single stream")
    parser.add_argument("--llama-draft-model", default=None,
                        help="spec: llama-server's draft model (default: --speculative-draft-model)")
    parser.add_argument("--no-repack", action="store_true",
                        help="spec: pass --no-repack to llama-server (its repacked weights crash on AMX CPUs)")
