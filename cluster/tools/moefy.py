"""`tierserve moefy`: build a real MoE model from a dense one by MoEfication (workers/moe/moefy.py), and report its
perplexity against the dense model on held-out text at several top-k.

The text: --text files, else the same local text `train-drafter` reads (Python's docs and stdlib sources); the
held-out text is the passages `bench spec` summarises and stdlib modules neither reads. The checkpoint (Qwen2-MoE
layout, safetensors + config + tokenizer) goes to --out, default the MoE cache beside the model cache; a run with
the same recipe reuses it (delete the directory to rebuild). Every step is seeded: the same recipe, the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

from workers.moe.moefy import MoefyConfig

# Stdlib modules held out from calibration (and from train-drafter's text): perplexity is measured on them.
HELD_OUT_MODULES = ("json.decoder", "textwrap", "shlex", "bisect")


def default_moe_dir(model_path: str, config: MoefyConfig) -> str:
    root = os.environ.get("TIERSERVE_MOE_CACHE", os.path.expanduser("~/.cache/tierserve/moe"))
    name = os.path.splitext(os.path.basename(model_path))[0]
    return os.path.join(root, f"{name}-x{config.num_experts}-k{config.top_k}-s{config.shared_neurons}-"
                              f"{config.router_weighting}")


def held_out_texts() -> list[str]:
    import importlib
    import inspect

    from cluster.tools.spec_prompts import _passages

    return list(_passages()) + [inspect.getsource(importlib.import_module(name)) for name in HELD_OUT_MODULES]


def _progress(message: str) -> None:
    print(f"[moefy] {message}", file=sys.stderr, flush=True)


def cmd_moefy(args: argparse.Namespace) -> int:
    import torch

    from cluster.tools.train_drafter import default_texts, token_windows
    from workers.model.loader import load_model
    from workers.moe.moefy import (ConvertedMLP, capture_mlp_input, mlp_weights, perplexity, split_layer,
                                   write_checkpoint)

    if args.threads:
        torch.set_num_threads(args.threads)
    config = MoefyConfig(num_experts=args.experts, top_k=args.top_k, shared_neurons=args.shared_neurons,
                         router_steps=args.router_steps, tune_steps=args.tune_steps,
                         router_weighting=args.router_weighting, seed=args.seed)
    dense = load_model(args.model, dtype=torch.float32, device="cpu")
    intermediate = dense.config.intermediate_size
    if (intermediate - config.shared_neurons) % config.num_experts:
        print(f"error: {intermediate} neurons less {config.shared_neurons} shared do not split into "
              f"{config.num_experts} equal experts", file=sys.stderr)
        return 2
    out_dir = args.out or default_moe_dir(dense.path, config)
    texts = []
    for path in args.text or ():
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    windows = token_windows(dense.tokenizer, texts or default_texts(), args.window, args.calibration_windows)
    held_out = token_windows(dense.tokenizer, held_out_texts(), args.window, args.eval_windows)
    started = time.perf_counter()
    layers = []
    if not os.path.exists(os.path.join(out_dir, "model.safetensors")):
        _progress(f"{len(windows)} calibration windows of {args.window} tokens; experts {config.num_experts} x "
                  f"{(intermediate - config.shared_neurons) // config.num_experts} neurons + "
                  f"{config.shared_neurons} shared, top-{config.top_k} -> {out_dir}")
        splits = []
        dense_mlps = [layer.mlp for layer in dense.model.layers]
        for index, layer in enumerate(dense.model.layers):
            # this layer's inputs as the converted model will give them (the layers before are converted already)
            inputs = capture_mlp_input(dense, windows, index)
            split = split_layer(inputs, *mlp_weights(layer.mlp), config)
            splits.append(split)
            layer.mlp = ConvertedMLP(split, config)
            layers.append({"layer": index, "router_top1": split.router_top1, "kept_worth": split.kept_worth,
                           "error_before_tuning": split.error_before, "error_after_tuning": split.error_after})
            _progress(f"layer {index}: router top-1 {split.router_top1:.2f}, top-{config.top_k} keeps "
                      f"{100 * split.kept_worth:.0f}% of the routed output norm; output error "
                      f"{split.error_before:.2f} -> {split.error_after:.2f} tuned "
                      f"({time.perf_counter() - started:.0f} s)")
        for layer, mlp in zip(dense.model.layers, dense_mlps):
            layer.mlp = mlp  # the dense model again, for its perplexity and the checkpoint's attention weights
        write_checkpoint(dense, splits, config, out_dir)
        _progress(f"wrote {out_dir} in {time.perf_counter() - started:.0f} s")
    else:
        _progress(f"reusing {out_dir}")
    build_seconds = time.perf_counter() - started

    moe = load_model(out_dir, dtype=torch.float32, device="cpu")
    rows = [{"model": "dense", "top_k": None, "active_mlp_neurons": intermediate,
             "perplexity": perplexity(dense, held_out)}]
    neurons = moe.config.moe.expert_intermediate_size
    sparse = [moe.model.layers[index].mlp for index in moe.config.moe.sparse_layers]
    for top_k in sorted({int(k) for k in args.eval_top_k.split(",")} | {config.top_k}):
        if top_k > config.num_experts:
            continue
        for block in sparse:
            block.policy = type(block.policy)(top_k, block.policy.renormalize)
        rows.append({"model": "moe", "top_k": top_k, "active_mlp_neurons": top_k * neurons + config.shared_neurons,
                     "perplexity": perplexity(moe, held_out)})
        _progress(f"top-{top_k}: perplexity {rows[-1]['perplexity']:.3f} (dense {rows[0]['perplexity']:.3f})")
    print(f"moefy: {os.path.basename(dense.path)} -> {out_dir}")
    print(f"held-out text: {len(held_out)} windows of {args.window} tokens")
    print(f"{'model':<8}{'top-k':>6}{'active MLP neurons':>20}{'perplexity':>12}{'vs dense':>10}")
    for row in rows:
        ratio = row["perplexity"] / rows[0]["perplexity"]
        print(f"{row['model']:<8}{row['top_k'] or '-':>6}{row['active_mlp_neurons']:>20}{row['perplexity']:>12.3f}"
              f"{ratio:>9.3f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"dense_model": os.path.basename(dense.path), "moe_dir": out_dir, "recipe": asdict(config),
                       "calibration_windows": len(windows), "held_out_windows": len(held_out),
                       "window_tokens": args.window, "build_seconds": build_seconds, "layers": layers,
                       "perplexity": rows}, f, indent=2)
    return 0


def add_parser(sub) -> None:
    defaults = MoefyConfig()
    parser = sub.add_parser("moefy", help="build a real MoE model from a dense one (MoEfication) and report its "
                                          "perplexity at several top-k")
    parser.add_argument("--model", default=None, help="dense model: GGUF file, HF directory or registry name "
                                                      "(default: SmolLM2-135M)")
    parser.add_argument("--out", default=None, help="checkpoint directory (default: the MoE cache for the recipe)")
    parser.add_argument("--text", action="append", help="UTF-8 calibration text (repeatable; default: Python's "
                                                        "docs and stdlib sources)")
    parser.add_argument("--experts", type=int, default=defaults.num_experts, help="routed experts per layer")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="experts per token (the config's)")
    parser.add_argument("--shared-neurons", type=int, default=defaults.shared_neurons,
                        help="always-on neurons per layer (the shared expert)")
    parser.add_argument("--router-steps", type=int, default=defaults.router_steps)
    parser.add_argument("--router-weighting", choices=["flat", "confident"], default=defaults.router_weighting,
                        help="flat: every chosen expert weighted 1, one checkpoint for any top-k; confident: the "
                             "router's renormalised top-k weights (what dMoE and REAP read), the model at its top-k")
    parser.add_argument("--tune-steps", type=int, default=defaults.tune_steps,
                        help="expert tuning steps per layer (0: the experts are the dense model's slices)")
    parser.add_argument("--window", type=int, default=256, help="tokens per calibration / evaluation window")
    parser.add_argument("--calibration-windows", type=int, default=48)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-top-k", default="4,8,16,32", help="top-k values to measure perplexity at")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", dest="json_out", default=None, help="write the results here")
    parser.set_defaults(func=cmd_moefy)
