"""The offline tools' commands: `tierserve bench`, `tierserve eval`, `tierserve calibrate`, `tierserve models`,
`tierserve train-drafter`, `tierserve moefy`, `tierserve prune-experts`."""

from __future__ import annotations

import argparse
import importlib

from cluster.flags import add_engine_options
from cluster.tools.calibrate import cmd_calibrate
from cluster.tools.models import add_parser as add_models_parser
from cluster.tools.eval_moe import add_eval_moe_options, add_prune_parser
from cluster.tools.moefy import add_parser as add_moefy_parser
from cluster.tools.train_drafter import add_parser as add_train_drafter_parser


# target -> (module, function): each tool is imported only when it runs (torch, Ray, matplotlib are heavy).
BENCH_TARGETS = {"engine": ("cluster.tools.bench_engine", "run_engine_bench"),
                 "serve": ("cluster.tools.bench_serve", "run_serve_bench"),
                 "chaos": ("cluster.tools.bench_chaos", "run_chaos_bench"),
                 "spec": ("cluster.tools.bench_spec", "run_spec_bench"),
                 "moe": ("cluster.tools.bench_moe", "run_moe_bench")}
EVAL_TARGETS = {"kv": ("cluster.tools.eval_kv", "run_eval_kv"),
                "memory": ("cluster.tools.kv_memory", "run_memory"),
                "longctx": ("cluster.tools.eval_longctx", "run_eval_longctx"),
                "moe": ("cluster.tools.eval_moe", "run_eval_moe")}


def _run_target(targets: dict[str, tuple[str, str]], args: argparse.Namespace) -> int:
    module, function = targets[args.target]
    return getattr(importlib.import_module(module), function)(args)


def cmd_bench(args: argparse.Namespace) -> int:
    return _run_target(BENCH_TARGETS, args)


def cmd_eval(args: argparse.Namespace) -> int:
    return _run_target(EVAL_TARGETS, args)


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (table on stdout, JSON with --json)")
    bench.add_argument("target", choices=list(BENCH_TARGETS))
    bench.add_argument("--json", dest="json_out", default=None, help="write results here")
    bench.add_argument("--prompt-len", type=int, default=128, help="engine: prompt tokens")
    bench.add_argument("--decode-tokens", type=int, default=64, help="engine/spec: tokens decoded per stream")
    bench.add_argument("--concurrency", default="1,4,16,32")
    bench.add_argument("--skip-baseline", action="store_true", help="engine: skip the transformers baseline")
    bench.add_argument("--rounds", type=int, default=3,
                       help="engine: rounds alternating ours and transformers; spec: plain and speculating "
                            "(medians are reported)")
    bench.add_argument("--against", default=None, metavar="REV",
                       help="engine: instead, time the engine step against the step loop of git commit REV, "
                            "in alternating processes (cluster/tools/bench_step_ab.py)")
    bench.add_argument("--step-repeats", type=int, default=3,
                       help="engine --against: repeats of each shape per round")
    bench.add_argument("--prompt-lens", default="32,128,512", help="serve: prompt length mix (tokens)")
    bench.add_argument("--output-lens", default="16,64", help="serve: output length mix (tokens)")
    bench.add_argument("--requests-per-client", type=int, default=2, help="serve: requests per client per level")
    bench.add_argument("--grpc-port", type=int, default=None,
                       help="serve/chaos: port of the embedded server (serve: 9000; chaos: a free port)")
    add_engine_options(bench)
    from cluster.tools.bench_chaos import add_chaos_options

    add_chaos_options(bench)
    from cluster.tools.bench_spec import add_spec_options

    add_spec_options(bench)
    from cluster.tools.bench_moe import add_moe_bench_options

    add_moe_bench_options(bench)
    bench.set_defaults(func=cmd_bench)

    evaluate = sub.add_parser("eval", help="quality evaluations (table on stdout, JSON + PNG with --json)")
    evaluate.add_argument("target", choices=list(EVAL_TARGETS),
                          help="kv: codec quality; memory: long-context KV bytes; longctx: eviction policies; "
                               "moe: an MoE model under dMoE routing and expert pruning")
    evaluate.add_argument("--context-tokens", type=int, default=2**20, help="memory: context length")
    evaluate.add_argument("--json", dest="json_out", default=None, help="write results here (and a PNG beside)")
    add_engine_options(evaluate, only=frozenset({"model", "num_threads"}))
    from cluster.tools.eval_kv import add_eval_kv_options
    from cluster.tools.eval_longctx import add_eval_longctx_options

    add_eval_kv_options(evaluate)
    add_eval_longctx_options(evaluate)
    add_eval_moe_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    calibrate = sub.add_parser("calibrate", help="write a KV calibration file for gtq-* and fractional tq-* codecs")
    calibrate.add_argument("--out", required=True, help="calibration file to write")
    add_engine_options(calibrate, only=frozenset({"model"}))
    calibrate.add_argument("--text", default=None, help="UTF-8 text file (default: pydoc_data.topics, its tail)")
    calibrate.add_argument("--windows", type=int, default=4, help="512-token windows to run")
    calibrate.set_defaults(func=cmd_calibrate)

    add_models_parser(sub)
    add_train_drafter_parser(sub)
    add_moefy_parser(sub)
    add_prune_parser(sub)
