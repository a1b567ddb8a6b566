"""`tierserve` command line. Heavy imports happen inside each command so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
import time

USAGE_ERRORS = (FileNotFoundError, ValueError)  # missing/corrupt model, unsupported arch, bad request


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
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


def _engine_config(args: argparse.Namespace):
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


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")
    group.add_argument("--logprobs", type=int, default=0, help="top-N logprobs per token (with --json)")


def _sampling_params(args: argparse.Namespace):
    from workers.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                          logprobs=args.logprobs)


def cmd_run(args: argparse.Namespace) -> int:
    from workers.engine import Engine

    params = _sampling_params(args)
    started = time.perf_counter()
    engine = Engine(_engine_config(args))
    print(f"[tierserve] loaded {engine.loaded.path} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    engine.add_request("cli", prompt=prompt, params=params)
    token_ids: list[int] = []
    logprobs = []
    text = ""
    finish_reason = None
    first_token_at = None
    started = time.perf_counter()
    while engine.has_unfinished():
        for output in engine.step():
            if first_token_at is None and output.new_token_ids:
                first_token_at = time.perf_counter()
            token_ids.extend(output.new_token_ids)
            logprobs.extend(output.logprobs)
            text += output.new_text
            if not args.json:
                sys.stdout.write(output.new_text)
                sys.stdout.flush()
            if output.finished:
                finish_reason = output.finish_reason.value
    elapsed = time.perf_counter() - started
    if args.json:
        json.dump({"text": text, "token_ids": token_ids, "finish_reason": finish_reason,
                   "logprobs": [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top} for lp in logprobs]},
                  sys.stdout)
    sys.stdout.write("\n")
    decode_rate = (len(token_ids) - 1) / (elapsed - (first_token_at - started)) if len(token_ids) > 1 else 0.0
    print(f"[tierserve] {len(token_ids)} tokens, finish={finish_reason}, TTFT {(first_token_at - started) * 1e3:.0f} ms, "
          f"decode {decode_rate:.1f} tok/s", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "engine":
        from cluster.tools.bench_engine import run_engine_bench

        return run_engine_bench(args)
    if args.target == "chaos":
        from cluster.tools.bench_chaos import run_chaos_bench

        return run_chaos_bench(args)
    from cluster.tools.bench_serve import run_serve_bench

    return run_serve_bench(args)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.target == "memory":
        from cluster.tools.kv_memory import run_memory

        return run_memory(args)
    if args.target == "longctx":
        from cluster.tools.eval_longctx import run_eval_longctx

        return run_eval_longctx(args)
    from cluster.tools.eval_kv import run_eval_kv

    return run_eval_kv(args)


def cmd_config(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cluster.config import ServeConfig

    try:
        config = ServeConfig.from_yaml(args.file) if args.file else ServeConfig()
    except ValidationError as exc:
        print(f"tierserve: invalid config {args.file}:\n{exc}", file=sys.stderr)
        return 2
    if args.action == "show":
        sys.stdout.write(config.to_yaml())
    else:
        print(f"{args.file or 'defaults'}: OK ({config.mode}, decode tiers: "
              f"{', '.join(t.name for t in config.decode_tiers)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierserve", description="Disaggregated LLM serving (see README)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate in-process (no Ray), streaming to stdout")
    run.add_argument("prompt")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--system", default=None, help="system message (with --chat)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_engine_options(run)
    _add_sampling_options(run)
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="benchmarks (table on stdout, JSON with --json)")
    bench.add_argument("target", choices=["engine", "serve", "chaos"])
    bench.add_argument("--json", dest="json_out", default=None, help="write results here")
    bench.add_argument("--prompt-len", type=int, default=128, help="engine: prompt tokens")
    bench.add_argument("--decode-tokens", type=int, default=64, help="engine: tokens decoded per stream")
    bench.add_argument("--concurrency", default="1,4,16,32")
    bench.add_argument("--skip-baseline", action="store_true", help="engine: skip the transformers baseline")
    bench.add_argument("--rounds", type=int, default=3,
                       help="engine: rounds alternating ours and transformers (medians are reported)")
    bench.add_argument("--prompt-lens", default="32,128,512", help="serve: prompt length mix (tokens)")
    bench.add_argument("--output-lens", default="16,64", help="serve: output length mix (tokens)")
    bench.add_argument("--requests-per-client", type=int, default=2, help="serve: requests per client per level")
    bench.add_argument("--grpc-port", type=int, default=None,
                       help="serve/chaos: port of the embedded server (serve: 9000; chaos: a free port)")
    _add_engine_options(bench)
    from cluster.tools.bench_chaos import add_chaos_options

    add_chaos_options(bench)
    bench.set_defaults(func=cmd_bench)

    evaluate = sub.add_parser("eval", help="quality evaluations (table on stdout, JSON + PNG with --json)")
    evaluate.add_argument("target", choices=["kv", "memory", "longctx"],
                          help="kv: codec quality; memory: long-context KV bytes; longctx: eviction policies")
    evaluate.add_argument("--context-tokens", type=int, default=2**20, help="memory: context length")
    evaluate.add_argument("--json", dest="json_out", default=None, help="write results here (and a PNG beside)")
    evaluate.add_argument("--model", default=None, help="GGUF file or HF model directory (default: SmolLM2-135M)")
    evaluate.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    from cluster.tools.eval_kv import add_eval_kv_options
    from cluster.tools.eval_longctx import add_eval_longctx_options

    add_eval_kv_options(evaluate)
    add_eval_longctx_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    calibrate = sub.add_parser("calibrate", help="write a KV calibration file for gtq-* and fractional tq-* codecs")
    calibrate.add_argument("--out", required=True, help="calibration file to write")
    calibrate.add_argument("--model", default=None, help="GGUF file or HF model directory (default: SmolLM2-135M)")
    calibrate.add_argument("--text", default=None, help="UTF-8 text file (default: pydoc_data.topics, its tail)")
    calibrate.add_argument("--windows", type=int, default=4, help="512-token windows to run")
    from cluster.tools.calibrate import cmd_calibrate

    calibrate.set_defaults(func=cmd_calibrate)

    from cluster.serve_cmd import add_parsers

    add_parsers(sub)

    config = sub.add_parser("config", help="show the effective serve config, or validate a YAML file")
    config.add_argument("action", choices=["show", "validate"])
    config.add_argument("file", nargs="?", default=None)
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USAGE_ERRORS as exc:
        print(f"tierserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
