"""Engine options on the command line, shared by `tierserve run` and the offline tools (bench)."""

from __future__ import annotations

import argparse


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="GGUF file or HF model directory (default: SmolLM2-135M GGUF)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    group.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    group.add_argument("--kv-codec", default="auto",
                       help="KV page format: auto, float16, bfloat16, int8, tq-k<b>v<b>[+qjl], gtq-<bits> "
                            "(e.g. tq-k4v3, tq-k4.5v4)")
    group.add_argument("--kv-calibration", default=None,
                       help="calibration file for gtq-* and fractional tq-* (tierserve calibrate)")
    group.add_argument("--kv-exclude-layers", default="", help="comma-separated layers kept in fp16")
    group.add_argument("--kv-eviction", default="none", choices=["none", "streaming", "h2o", "snapkv", "value_aware"],
                       help="long-context KV eviction policy (needs --kv-budget or --kv-budget-blocks)")
    group.add_argument("--kv-budget", type=float, default=None, help="fraction of a request's KV blocks kept")
    group.add_argument("--kv-budget-blocks", type=int, default=None, help="or at most this many blocks per request")
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--num-kv-blocks", type=int, default=None)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--max-num-seqs", type=int, default=64)
    group.add_argument("--max-num-batched-tokens", type=int, default=512)
    group.add_argument("--no-prefix-caching", action="store_true")
    group.add_argument("--no-pack-cpu-weights", action="store_true",
                       help="don't pack fp32 CPU weights for MKL (saves one copy of the weights; slower batches)")
    group.add_argument("--no-block-quant-linears", action="store_true",
                       help="decode with the fp32 copies of a GGUF's Q4_0/Q4_1/Q8_0 weights instead of their blocks")
    group.add_argument("--no-native-decode-layers", action="store_true",
                       help="run decode steps through the model's modules (one Python call per op) instead of one "
                            "native call for all layers")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def engine_config(args: argparse.Namespace):
    from workers.config import EngineConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, kv_codec=args.kv_codec, block_size=args.block_size,
        kv_calibration=args.kv_calibration,
        kv_exclude_layers=tuple(int(layer) for layer in args.kv_exclude_layers.split(",") if layer.strip()),
        num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.threads, pack_cpu_weights=not args.no_pack_cpu_weights,
        block_quant_linears=not args.no_block_quant_linears, native_decode_layers=not args.no_native_decode_layers,
        kv_eviction={"policy": args.kv_eviction, "budget": args.kv_budget, "budget_blocks": args.kv_budget_blocks},
    )
