"""`tierserve bench moe`: an MoE model's serving speed one process against an expert-parallel group, under free
routing and dMoE block routing, built and REAP-pruned; table + JSON.

Every configuration runs the same streams (greedy, real text prompts) on the same cores: the single process gets
all of them as torch threads (the baseline, measured in this run), the group one process per rank with an equal
share. Each row: tokens per second over the whole batch (prefill + decode) and over its decode phase, distinct
experts per block of a step's tokens (dMoE's measure), and for the group the all-to-all bytes per routed token
(a token counts once per MoE layer) and the ranks' load imbalance. Perplexity lives in `tierserve eval moe`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROUTINGS = ("free", "dmoe")


def _progress(message: str) -> None:
    print(f"[bench moe] {message}", file=sys.stderr, flush=True)


def _moe_totals(engine) -> tuple[int, int]:
    from workers.model.moe import moe_stats

    layers = moe_stats(engine.model)
    return sum(layer.num_blocks for layer in layers), sum(layer.distinct_experts for layer in layers)


def _run_rank(rank: int, world_size: int, port: int, results, model: str, prompts: list[list[int]],
              decode_tokens: int, overrides: dict, num_threads: int) -> None:
    """One process of a configuration (world_size 1: the single-process baseline, no group)."""
    import torch

    from cluster.tools.ep_local import rank_spec
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.moe.expert_parallel import StaticMembership
    from workers.sampling_params import SamplingParams

    torch.set_num_threads(num_threads)
    config = EngineConfig(model=model, num_threads=num_threads, freeze_gc_heap=False, **overrides)
    membership = StaticMembership(rank_spec(rank, world_size, port)) if world_size > 1 else None
    engine = Engine(config, ep_membership=membership)
    ep = engine.expert_parallel

    def run(batch: list[list[int]], max_tokens: int) -> tuple[float, float, int]:
        """(seconds, decode-phase seconds, output tokens) until no rank has work."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for index, prompt in enumerate(batch):
            engine.add_request(f"{time.monotonic_ns()}-{index}", prompt_token_ids=prompt, params=params)
        started = time.perf_counter()
        decode_started = None
        tokens = 0
        while True:
            outputs = engine.step()
            tokens += sum(len(output.new_token_ids) for output in outputs)
            if decode_started is None and engine.has_unfinished() and all(
                    seq.prefill_done for seq in engine.scheduler.running) and not engine.scheduler.waiting:
                decode_started = time.perf_counter()  # every stream has its first token
            if not engine.has_unfinished() and (ep is None or ep.last_total_work == 0):
                break
        ended = time.perf_counter()
        return ended - started, ended - (decode_started or started), tokens

    run(prompts[:1], 2)  # warm-up: first-call costs out of the timing (every rank takes part)
    blocks0, distinct0 = _moe_totals(engine)
    ep_before = (ep.stats.all_to_all_bytes, ep.stats.routed_tokens) if ep is not None else (0, 0)
    seconds, decode_seconds, tokens = run(prompts, decode_tokens)
    blocks, distinct = _moe_totals(engine)
    report = {"seconds": seconds, "decode_seconds": decode_seconds, "output_tokens": tokens,
              "distinct_experts": distinct - distinct0, "blocks": blocks - blocks0}
    if ep is not None:
        report.update(all_to_all_bytes=ep.stats.all_to_all_bytes - ep_before[0],
                      routed_tokens=ep.stats.routed_tokens - ep_before[1], imbalance=ep.stats.imbalance,
                      idle_passes=ep.stats.idle_passes)
    results.put((rank, report))


def _configuration(model: str, prompts: list[list[int]], decode_tokens: int, overrides: dict, world_size: int,
                   num_threads: int) -> dict:
    from cluster.tools.ep_local import run_local_group

    share = (len(prompts) + world_size - 1) // world_size
    threads = max(1, num_threads // world_size)
    args = [(model, prompts[rank * share:(rank + 1) * share], decode_tokens, overrides, threads)
            for rank in range(world_size)]
    reports = list(run_local_group(_run_rank, args).values())
    seconds = max(r["seconds"] for r in reports)  # the group is done when its last rank is
    decode_seconds = max(r["decode_seconds"] for r in reports)
    tokens = sum(r["output_tokens"] for r in reports)
    blocks = sum(r["blocks"] for r in reports)
    row = {"ranks": world_size, "threads_per_rank": threads, "streams": len(prompts), "output_tokens": tokens,
           "seconds": seconds, "tokens_per_s": tokens / seconds,
           "decode_tokens_per_s": (tokens - len(prompts)) / decode_seconds if decode_seconds else 0.0,
           "distinct_experts_per_block": sum(r["distinct_experts"] for r in reports) / blocks if blocks else 0.0}
    if world_size > 1:
        routed = sum(r["routed_tokens"] for r in reports)
        row["all_to_all_bytes_per_token"] = sum(r["all_to_all_bytes"] for r in reports) / routed if routed else 0.0
        row["idle_passes"] = sum(r["idle_passes"] for r in reports)
    return row


def _pruned_model(args: argparse.Namespace, out_dir: str) -> str:
    from cluster.tools.eval_moe import write_pruned

    if args.moe_pruned:
        return args.moe_pruned
    _progress(f"REAP-pruning to {args.moe_keep:.0%} of experts -> {out_dir}")
    write_pruned(args.model, out_dir, keep=args.moe_keep, method="reap")
    return out_dir


def run_moe_bench(args: argparse.Namespace) -> int:
    from cluster.tools.train_drafter import default_texts, token_windows
    from workers.model.loader import load_model_info

    if not args.model or not os.path.isdir(args.model):
        print("error: bench moe needs --model, an MoE checkpoint directory (`tierserve moefy` builds one)",
              file=sys.stderr)
        return 2
    config, tokenizer, _ = load_model_info(args.model)
    if config.moe is None:
        print(f"error: {args.model} is not an MoE model", file=sys.stderr)
        return 2
    prompts = token_windows(tokenizer, default_texts(), args.prompt_len, args.moe_streams)
    num_threads = args.num_threads or os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="tierserve-bench-moe-") as scratch:
        models = {"built": args.model, f"REAP {args.moe_keep:.0%}": _pruned_model(args, scratch)}
        for label, path in models.items():
            for routing in ROUTINGS:
                overrides = {"max_num_batched_tokens": max(512, args.prompt_len)}
                if routing == "dmoe":
                    overrides["moe_routing"] = {"block_size": args.moe_block_size,
                                                "coreset_threshold": args.moe_coreset_threshold}
                single = None
                for world_size in (1, args.moe_ranks):
                    _progress(f"{label}, {routing} routing, {world_size} process(es)")
                    row = {"model": label, "routing": routing,
                           **_configuration(path, prompts, args.decode_tokens, overrides, world_size, num_threads)}
                    if world_size == 1:
                        single = row
                    else:
                        row["vs_single"] = row["tokens_per_s"] / single["tokens_per_s"]
                    rows.append(row)
    _print(rows, args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "prompt_tokens": args.prompt_len, "decode_tokens": args.decode_tokens,
                       "streams": args.moe_streams, "threads": num_threads, "block_size": args.moe_block_size,
                       "coreset_threshold": args.moe_coreset_threshold, "rows": rows}, f, indent=2)
    return 0


def _print(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"bench moe: {os.path.basename(args.model.rstrip('/'))}, {args.moe_streams} streams x {args.prompt_len} "
          f"prompt + {args.decode_tokens} output tokens; dMoE blocks of {args.moe_block_size}, coreset "
          f"{args.moe_coreset_threshold}")
    print(f"{'model':<10}{'routing':<8}{'ranks':>6}{'tok/s':>9}{'decode':>9}{'vs 1':>7}{'distinct':>10}"
          f"{'a2a B/tok':>11}")
    for row in rows:
        vs = f"{row['vs_single']:.2f}x" if "vs_single" in row else "base"
        a2a = f"{row['all_to_all_bytes_per_token']:.0f}" if "all_to_all_bytes_per_token" in row else "-"
        print(f"{row['model']:<10}{row['routing']:<8}{row['ranks']:>6}{row['tokens_per_s']:>9.1f}"
              f"{row['decode_tokens_per_s']:>9.1f}{vs:>7}{row['distinct_experts_per_block']:>10.1f}{a2a:>11}")


def add_moe_bench_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("moe (tierserve bench moe)")
    group.add_argument("--moe-streams", type=int, default=8, help="moe: concurrent streams (split over the ranks)")
    group.add_argument("--moe-ranks", type=int, default=2, help="moe: processes in the expert-parallel group")
    group.add_argument("--moe-block-size", type=int, default=32, help="moe: dMoE block size (tokens)")
    group.add_argument("--moe-coreset-threshold", type=float, default=0.7, help="moe: dMoE coreset mass")
    group.add_argument("--moe-keep", type=float, default=0.5, help="moe: share of experts REAP keeps")
    group.add_argument("--moe-pruned", default=None, help="moe: a pruned checkpoint (default: REAP-prune --model "
                                                          "into a scratch directory)")
