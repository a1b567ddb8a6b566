"""`tierserve serve` (embedded local Ray, or --address to join a cluster) and `tierserve generate` (a gRPC client)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from cluster.config import ServeConfig
from cluster.flags import add_sampling_options, add_serve_options, serve_overrides

APP_NAME = "tierserve"
GENERATE_SAMPLING = ("max_tokens", "temperature", "seed")


def start_serving(config, address: str | None = None, http_port: int = 8000,
                  extra_apps: dict | None = None) -> None:
    """Start (or join) Ray, start Serve with the gRPC proxy, deploy the app (and any extra named apps,
    e.g. the benchmark's unified baseline); returns when every app is up."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.app import GRPC_SERVICER, build_app

    if address:
        ray.init(address=address)
    else:
        # Lean local Ray for small machines: no dashboard (it costs ~1 GB and a core at start-up).
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
                http_options=HTTPOptions(port=http_port))
    for name, app_config in {APP_NAME: config, **(extra_apps or {})}.items():
        serve.run(build_app(app_config), name=name, route_prefix=f"/{name}")


def cmd_serve(args: argparse.Namespace) -> int:
    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    config = ServeConfig.model_validate({**config.model_dump(), **serve_overrides(args)})
    started = time.perf_counter()
    print(f"[tierserve] starting {config.mode} serving ({'Ray at ' + args.address if args.address else 'embedded Ray'})",
          file=sys.stderr, flush=True)
    start_serving(config, args.address, args.http_port)
    tiers = ", ".join(t.name for t in config.decode_tiers)
    print(f"[tierserve] gRPC listening on 0.0.0.0:{config.grpc_port} (application metadata key: {APP_NAME!r}); "
          f"decode tiers: {tiers}; up in {time.perf_counter() - started:.0f}s. Ctrl-C stops.",
          file=sys.stderr, flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.shutdown()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc

    sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.seed is not None:
        sampling.seed = args.seed
    request = pb.GenerateRequest(sampling=sampling, tier=args.tier or "")
    if args.chat:
        request.chat.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    metadata = (("application", APP_NAME),)
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        chunks = []
        try:
            for chunk in stub.Generate(request, metadata=metadata, timeout=args.timeout):
                chunks.append(chunk)
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        except grpc.RpcError as exc:
            print(f"\ntierserve: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    if not chunks:
        return 1
    last = chunks[-1]
    if args.json:
        json.dump({"request_id": last.request_id, "text": "".join(c.text for c in chunks),
                   "token_ids": [t for c in chunks for t in c.token_ids],
                   "finish_reason": pb.FinishReason.Name(last.finish_reason), "tier": last.tier,
                   "usage": {"prompt_tokens": last.usage.prompt_tokens,
                             "completion_tokens": last.usage.completion_tokens,
                             "cached_tokens": last.usage.cached_tokens},
                   "ttft_s": last.timing.ttft_s, "total_s": last.timing.total_s}, sys.stdout)
    sys.stdout.write("\n")
    print(f"[tierserve] {last.usage.completion_tokens} tokens from tier {last.tier!r}, "
          f"TTFT {last.timing.ttft_s * 1e3:.0f} ms, {pb.FinishReason.Name(last.finish_reason)}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    serve_parser = sub.add_parser("serve", help="serve over gRPC on Ray Serve (embedded local Ray by default)")
    serve_parser.add_argument("--config", default=None, help="ServeConfig YAML (see `tierserve config show`)")
    serve_parser.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy port (unused by the API)")
    serve_parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    add_serve_options(serve_parser)
    serve_parser.set_defaults(func=cmd_serve)

    generate = sub.add_parser("generate", help="stream a completion from a running server over gRPC")
    generate.add_argument("prompt")
    generate.add_argument("--target", default="127.0.0.1:9000", help="the server's gRPC HOST:PORT")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    generate.add_argument("--tier", default=None, help="decode-tier hint")
    generate.add_argument("--timeout", type=float, default=300.0, help="seconds before the call is abandoned")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_sampling_options(generate, GENERATE_SAMPLING)
    generate.set_defaults(func=cmd_generate)
