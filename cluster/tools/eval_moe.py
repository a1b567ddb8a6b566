"""`tierserve eval moe`: an MoE model's perplexity on held-out text under its own routing, under dMoE block routing
(the distinct experts each block of tokens uses, before and after), and pruned to a share of its experts by REAP,
by routing frequency and at random (the same budget); table + JSON.

`tierserve prune-experts` writes the pruned checkpoint the server loads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch


def _progress(message: str) -> None:
    print(f"[eval moe] {message}", file=sys.stderr, flush=True)


def _windows(loaded, texts, window: int, count: int):
    from cluster.tools.train_drafter import token_windows

    return token_windows(loaded.tokenizer, texts, window, count)


def distinct_per_block(loaded, windows, block_size: int) -> float:
    """Mean distinct experts per block of block_size consecutive tokens, over every sparse layer and window."""
    from workers.moe.reap import observe_sparse_blocks
    from workers.moe.router import distinct_experts_per_block

    counts: list[float] = []
    observe_sparse_blocks(loaded, windows, lambda index, module, hidden: counts.extend(
        distinct_experts_per_block(module.route(hidden)[1], block_size).tolist()))
    return sum(counts) / len(counts)


def run_eval_moe(args: argparse.Namespace) -> int:
    from cluster.tools.moefy import held_out_texts
    from cluster.tools.train_drafter import default_texts
    from workers.model.loader import load_model
    from workers.moe.moefy import perplexity
    from workers.moe.reap import METHODS, choose_experts, collect_expert_stats, prune_in_place, sparse_blocks
    from workers.moe.router import BlockCoresetRouter

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    loaded = load_model(args.model, dtype=torch.float32, device="cpu")
    if loaded.config.moe is None:
        print(f"error: {args.model} is not an MoE model", file=sys.stderr)
        return 2
    held_out = _windows(loaded, held_out_texts(), args.moe_window, args.moe_eval_windows)
    started = time.perf_counter()
    base = perplexity(loaded, held_out)
    block_size = args.moe_block_size
    rows = [{"routing": "as built", "perplexity": base,
             "distinct_experts_per_block": distinct_per_block(loaded, held_out, block_size)}]
    _progress(f"as built: perplexity {base:.3f}, {rows[0]['distinct_experts_per_block']:.1f} distinct experts "
              f"per {block_size}-token block")
    policies = {index: block.policy for index, block in sparse_blocks(loaded)}
    for threshold in (float(t) for t in args.moe_coreset_thresholds.split(",")):
        for _, block in sparse_blocks(loaded):
            block.policy = BlockCoresetRouter(block.policy, block_size, threshold)
        rows.append({"routing": f"dMoE block {block_size}, coreset {threshold}", "perplexity": perplexity(loaded, held_out),
                     "distinct_experts_per_block": distinct_per_block(loaded, held_out, block_size)})
        for index, block in sparse_blocks(loaded):
            block.policy = policies[index]
        _progress(f"{rows[-1]['routing']}: perplexity {rows[-1]['perplexity']:.3f}, "
                  f"{rows[-1]['distinct_experts_per_block']:.1f} distinct")
    calibration = _windows(loaded, default_texts(), args.moe_window, args.moe_calibration_windows)
    stats = collect_expert_stats(loaded, calibration)
    for method in METHODS:
        pruned = copy.deepcopy(loaded)
        prune_in_place(pruned, choose_experts(stats, args.moe_keep, method, args.moe_seed), stats)
        rows.append({"routing": f"{method} pruned to {args.moe_keep:.0%} of experts", "perplexity": perplexity(pruned, held_out),
                     "distinct_experts_per_block": distinct_per_block(pruned, held_out, block_size)})
        _progress(f"{rows[-1]['routing']}: perplexity {rows[-1]['perplexity']:.3f}")
        del pruned
    print(f"eval moe: {os.path.basename(loaded.path.rstrip('/'))}, {len(held_out)} held-out windows of {args.moe_window} "
          f"tokens, blocks of {block_size}")
    print(f"{'routing':<36}{'perplexity':>12}{'vs built':>10}{'distinct/block':>16}{'fewer':>8}")
    for row in rows:
        fewer = 1 - row["distinct_experts_per_block"] / rows[0]["distinct_experts_per_block"]
        row["perplexity_increase"] = row["perplexity"] / base - 1
        row["fewer_distinct_experts"] = fewer
        print(f"{row['routing']:<36}{row['perplexity']:>12.3f}{100 * row['perplexity_increase']:>+9.2f}%"
              f"{row['distinct_experts_per_block']:>16.1f}{100 * fewer:>7.0f}%")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": loaded.path, "window_tokens": args.moe_window, "held_out_windows": len(held_out),
                       "calibration_windows": len(calibration), "block_size": block_size, "keep": args.moe_keep,
                       "seconds": time.perf_counter() - started, "rows": rows}, f, indent=2)
    return 0


def add_eval_moe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("moe (tierserve eval moe)")
    group.add_argument("--moe-block-size", type=int, default=32, help="moe: dMoE block size (tokens)")
    group.add_argument("--moe-coreset-thresholds", default="0.5,0.7,0.9", help="moe: dMoE coreset mass thresholds")
    group.add_argument("--moe-keep", type=float, default=0.5, help="moe: share of experts pruning keeps")
    group.add_argument("--moe-window", type=int, default=256, help="moe: tokens per window")
    group.add_argument("--moe-eval-windows", type=int, default=16, help="moe: held-out windows")
    group.add_argument("--moe-calibration-windows", type=int, default=16, help="moe: windows for expert statistics")
    group.add_argument("--moe-seed", type=int, default=0, help="moe: random pruning's seed")


def write_pruned(model: str, out: str, keep: float, method: str = "reap", texts: list[str] | None = None,
                 window: int = 256, calibration_windows: int = 16, seed: int = 0) -> int:
    """Prune an HF MoE checkpoint to `keep` of each layer's experts and write it to `out`; returns experts kept."""
    from cluster.tools.train_drafter import default_texts
    from workers.model.loader import load_model
    from workers.moe.reap import choose_experts, collect_expert_stats, down_scale, prune_checkpoint, sparse_blocks

    loaded = load_model(model, dtype=torch.float32, device="cpu")
    if loaded.config.moe is None:
        raise ValueError(f"{model} is not an MoE model")
    windows = _windows(loaded, texts or default_texts(), window, calibration_windows)
    stats = collect_expert_stats(loaded, windows)
    kept = choose_experts(stats, keep, method, seed)
    scales = {index: down_scale(block, stats[index], kept[index]) for index, block in sparse_blocks(loaded)}
    prune_checkpoint(model, out, kept, scales)
    return len(next(iter(kept.values())))


def cmd_prune_experts(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.model):
        print("error: prune-experts reads an HF checkpoint directory (--model DIR)", file=sys.stderr)
        return 2
    texts = []
    for path in args.text or ():
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    try:
        kept = write_pruned(args.model, args.out, args.keep, args.method, texts or None, args.window,
                            args.calibration_windows, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"prune-experts: {args.method}, kept {kept} experts per layer -> {args.out}")
    return 0


def add_prune_parser(sub) -> None:
    parser = sub.add_parser("prune-experts", help="drop an MoE model's least salient experts (REAP) and write the "
                                                  "checkpoint")
    parser.add_argument("--model", required=True, help="MoE checkpoint directory (HF layout)")
    parser.add_argument("--out", required=True, help="pruned checkpoint directory")
    parser.add_argument("--keep", type=float, default=0.5, help="share of each layer's experts to keep")
    parser.add_argument("--method", default="reap", choices=["reap", "frequency", "random"])
    parser.add_argument("--text", action="append", help="UTF-8 calibration text (default: Python's docs and sources)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=cmd_prune_experts)
