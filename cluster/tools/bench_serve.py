"""`tierserve bench serve`: a gRPC load generator against disaggregated and unified serving, same run.

Both modes are deployed side by side on one embedded Ray (same model, same engine options), then a
concurrency sweep replays the same request mix (prompt/output lengths from real text) against each.
Reports throughput, TTFT and inter-token latency p50/p99, and KV bytes moved per request.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

DISAGG_APP, UNIFIED_APP = "tierserve", "tierserve-unified"


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    throughput_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    kv_bytes_per_request: float
    errors: int


@dataclass
class ServeBenchResult:
    model: str
    prompt_lens: list[int]
    output_lens: list[int]
    levels: list[LevelResult] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)


def _progress(message: str) -> None:
    print(f"[bench serve] {message}", file=sys.stderr, flush=True)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def request_mix(tokenizer, count: int, prompt_lens: list[int], output_lens: list[int]):
    from pydoc_data.topics import topics

    from protos import inference_pb2 as pb

    corpus = tokenizer.encode(" ".join(topics[name] for name in sorted(topics)[:40]))
    requests = []
    for index in range(count):
        prompt_len = prompt_lens[index % len(prompt_lens)]
        start = (index * 997) % (len(corpus) - prompt_len)
        requests.append(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=corpus[start:start + prompt_len]),
            sampling=pb.SamplingParams(max_tokens=output_lens[index % len(output_lens)], temperature=0,
                                       ignore_eos=True)))
    return requests


def run_level(target: str, app: str, requests, concurrency: int) -> tuple[list[float], list[float], int, int, float]:
    import grpc

    from protos import inference_pb2_grpc as pb_grpc

    ttfts: list[float] = []
    gaps: list[float] = []
    counters = {"tokens": 0, "errors": 0}
    lock = threading.Lock()
    queue = list(requests)

    def client() -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while True:
                with lock:
                    if not queue:
                        return
                    request = queue.pop()
                started = last = time.perf_counter()
                first = True
                tokens = 0
                try:
                    for chunk in stub.Generate(request, metadata=(("application", app),), timeout=600):
                        now = time.perf_counter()
                        if chunk.token_ids:
                            with lock:
                                (ttfts if first else gaps).append(now - (started if first else last))
                            first = False
                            last = now
                            tokens += len(chunk.token_ids)
                except grpc.RpcError:
                    with lock:
                        counters["errors"] += 1
                with lock:
                    counters["tokens"] += tokens

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ttfts, gaps, counters["tokens"], counters["errors"], time.perf_counter() - started


def run_serve_bench(args: argparse.Namespace) -> int:
    from ray import serve

    from cluster.config import ServeConfig
    from cluster.serve_cmd import start_serving
    from workers.model.loader import load_model_info

    concurrency = [int(c) for c in args.concurrency.split(",")]
    prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    output_lens = [int(x) for x in args.output_lens.split(",")]
    tier = {"num_cpus": 0.25}
    common = {"model": args.model, "grpc_port": args.grpc_port or 9000, "engine": {"kv_cache_memory_mb": 256},
              "prefill": {"name": "prefill", **tier}}
    disagg = ServeConfig.model_validate({**common, "mode": "disaggregated", "decode_tiers": [{"name": "default", **tier}]})
    unified = ServeConfig.model_validate({**common, "mode": "unified", "decode_tiers": [{"name": "default", **tier}]})
    _progress("starting an embedded Ray with a disaggregated and a unified app")
    start_serving(disagg, extra_apps={UNIFIED_APP: unified})
    _, tokenizer, path = load_model_info(args.model)
    target = f"127.0.0.1:{args.grpc_port or 9000}"
    result = ServeBenchResult(model=path, prompt_lens=prompt_lens, output_lens=output_lens)
    decode = serve.get_deployment_handle("DecodeServer-default", app_name=DISAGG_APP)
    for app, mode in ((DISAGG_APP, "disaggregated"), (UNIFIED_APP, "unified")):
        run_level(target, app, request_mix(tokenizer, 2, prompt_lens[:1], [4]), 2)  # warm-up
        for level in concurrency:
            requests = request_mix(tokenizer, max(level * args.requests_per_client, 4), prompt_lens, output_lens)
            _progress(f"{mode}: concurrency {level}, {len(requests)} requests")
            before = decode.transfer_stats.remote().result()
            ttfts, gaps, tokens, errors, seconds = run_level(target, app, requests, level)
            moved = decode.transfer_stats.remote().result()["bytes"] - before["bytes"] if mode == "disaggregated" else 0
            result.levels.append(LevelResult(
                mode=mode, concurrency=level, requests=len(requests), output_tokens=tokens, seconds=seconds,
                throughput_tok_s=tokens / seconds, ttft_p50_ms=_percentile(ttfts, 0.5) * 1e3,
                ttft_p99_ms=_percentile(ttfts, 0.99) * 1e3, itl_p50_ms=_percentile(gaps, 0.5) * 1e3,
                itl_p99_ms=_percentile(gaps, 0.99) * 1e3, kv_bytes_per_request=moved / len(requests), errors=errors))
    by_key = {(lv.mode, lv.concurrency): lv for lv in result.levels}
    for level in concurrency:
        d, u = by_key[("disaggregated", level)], by_key[("unified", level)]
        result.ratios[f"throughput_disagg_vs_unified_c{level}"] = d.throughput_tok_s / u.throughput_tok_s
        if u.ttft_p50_ms:
            result.ratios[f"ttft_p50_disagg_vs_unified_c{level}"] = d.ttft_p50_ms / u.ttft_p50_ms
    print(format_table(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(asdict(result), f, indent=2)
        _progress(f"wrote {args.json_out}")
    serve.shutdown()
    return 0


def format_table(result: ServeBenchResult) -> str:
    rows = [("mode", "conc", "reqs", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
             "KV bytes/req", "errors")]
    for lv in result.levels:
        rows.append((lv.mode, str(lv.concurrency), str(lv.requests), f"{lv.throughput_tok_s:.1f}",
                     f"{lv.ttft_p50_ms:.0f}", f"{lv.ttft_p99_ms:.0f}", f"{lv.itl_p50_ms:.0f}", f"{lv.itl_p99_ms:.0f}",
                     f"{lv.kv_bytes_per_request:,.0f}", str(lv.errors)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    ratios = "\n".join(f"{k}: {v:.2f}x" for k, v in result.ratios.items())
    return (f"tierserve bench serve: {result.model} (prompts {result.prompt_lens} tokens, outputs "
            f"{result.output_lens} tokens)\n" + "\n".join(lines) + "\n" + ratios)
