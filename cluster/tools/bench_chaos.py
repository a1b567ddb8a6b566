"""`tierserve bench chaos`: break a running app on purpose, over real gRPC, and report what it costs.

Scenarios, in order (sizes are flags; plans in cluster/tools/chaos_plan.py):
  reference     N greedy streams undisturbed (their tokens are the reference); TTFT before = median probe
  kill-decode   the same streams; the default tier's decode replicas are killed mid-stream
  kill-prefill  M streams; the PrefillServer replica is killed while their handoffs are in flight
  cancel-storm  many streams, every second one cancelled by the client after a seeded 1..K tokens
  soak-baseline R requests, C at a time (empty prompts, client cancels, real prompts)
  soak-faulty   the same soak with a decode-replica kill half-way (the wall-time ratio is reported)
After each scenario (and at the end): wait for killed replicas to be replaced, poll KV blocks on EVERY
replica until all are 0 (seconds reported), read the Router's in-flight count, probe TTFT again.
RSS of every replica is sampled throughout (PNG beside the JSON).

Either starts the app on an embedded local Ray (like `bench serve`), or attaches to a running one
(`--target HOST:PORT --address RAY_ADDRESS --app NAME`). Exit status: 0 when the run completes (missed
targets are reported, not fatal), 3 when the app cannot be reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time

from cluster.tools.chaos_client import probe_ttft, run_scenario, wait_until_reachable
from cluster.tools.chaos_plan import (ROUTER_DEPLOYMENT, SOAK_BASELINE, SOAK_FAULTY, ChaosOptions, plan_scenarios,
                                pydoc_words)
from cluster.tools.chaos_report import (ChaosResult, PostCheck, ReplicaBlocks, ScenarioResult, check_targets,
                                  count_identical, format_table, latency, tally, unexpected)
from cluster.tools.replicas import ReplicaError, call_each_replica, kill_replicas, list_replicas
from cluster.tools.rss_sampler import RssSampler, plot_rss, summarize

TTFT_PROBE_PROMPT = "Write one short sentence about rivers."  # ~8 tokens: the fresh-request probe
UNREACHABLE_EXIT = 3
POLL_S = 0.2


def _progress(message: str) -> None:
    print(f"[bench chaos] {message}", file=sys.stderr, flush=True)


# ---- the run (the CLI and tests/integration/test_chaos.py call this) -------------------------------------
def run_chaos(options: ChaosOptions, target: str, app: str) -> ChaosResult:
    """Run every scenario against `app` (reachable over gRPC at `target`; Ray already connected)."""
    started = time.perf_counter()
    plans = plan_scenarios(options, pydoc_words())
    # Deployments that hold KV (every replica is asked for its blocks); seen once now, so a deployment whose
    # replicas are all dead is still waited for.
    # How many replicas each has now: after a kill, recovery means that many answer again (Serve notices a kill
    # only at its next health check, so until then a deployment with a survivor still looks healthy).
    replica_counts = {d: len(list_replicas(app, d)) for d in sorted({r.deployment for r in list_replicas(app)}
                                                                    - {ROUTER_DEPLOYMENT})}
    deployments = list(replica_counts)
    sampler = RssSampler(app, options.rss_period_s).start()
    _progress(f"app {app!r} at {target}: KV deployments {deployments}; probing TTFT")
    probe_ttft(target, app, TTFT_PROBE_PROMPT, options.ttft_probe_tokens, 1, options.request_timeout_s)  # warm-up
    ttft_before = probe_ttft(target, app, TTFT_PROBE_PROMPT, options.ttft_probe_tokens, options.ttft_probes,
                             options.request_timeout_s)
    result = ChaosResult(app=app, target=target, options=dataclasses.asdict(options), ttft_before_ms=ttft_before)
    by_name: dict[str, list] = {}
    try:
        for plan in plans:
            _progress(f"{plan.name}: {len(plan.requests)} requests, {plan.concurrency} at a time"
                      + "".join(f"; kill {f.deployment}" for f in plan.faults))
            begin = sampler.now()
            results, events, wall_s = run_scenario(target, app, plan, options.request_timeout_s,
                                                   kill=lambda deployment: _kill(app, deployment))
            sampler.mark(plan.name, begin, sampler.now())
            by_name[plan.name] = results
            identical = compared = None
            if plan.compare_to is not None:
                identical, compared = count_identical(results, by_name[plan.compare_to])
            after = post_check(app, replica_counts, target, options)
            outcomes = tally(plan, results)
            result.scenarios.append(ScenarioResult(
                name=plan.name, requests=len(plan.requests), outcomes=outcomes, latency=latency(results),
                identical=identical,
                compared=compared, faults=events, wall_s=wall_s, after=after, failures=unexpected(plan, results)))
            _progress(f"{plan.name}: {outcomes.by_outcome} in {wall_s:.1f} s; after: {describe(after)}")
        _progress("final check")
        result.final = post_check(app, replica_counts, target, options)
        _progress(f"final: {describe(result.final)}")
    finally:
        result.rss = sampler.stop()
    result.rss_summary = summarize(result.rss)
    soaks = {s.name: s.wall_s for s in result.scenarios}
    if soaks.get(SOAK_BASELINE):
        result.soak_ratio = soaks[SOAK_FAULTY] / soaks[SOAK_BASELINE]
    result.wall_s = time.perf_counter() - started
    result.targets = check_targets(result, options.drain_timeout_s)
    return result


def describe(check: PostCheck) -> str:
    drained = "never" if check.seconds_to_zero is None else f"{check.seconds_to_zero:.1f} s"
    recovered = "not in time" if check.recover_s is None else f"{check.recover_s:.1f} s"
    ttft = "-" if check.ttft_ms is None else f"{check.ttft_ms:.0f} ms"
    return (f"replicas answering after {recovered}; {check.blocks_in_use} blocks / {check.requests_in_engines} "
            f"requests in engines, idle after {drained}; router in flight {check.router_in_flight}; TTFT {ttft}")


def _kill(app: str, deployment: str) -> list[str]:
    """One replica dies (with several, the others carry on: the tier's streams move to them)."""
    killed = kill_replicas(app, deployment, count=1)
    _progress(f"killed {deployment} replicas {killed}")
    return killed


def post_check(app: str, replica_counts: dict[str, int], target: str, options: ChaosOptions) -> PostCheck:
    """Wait for replaced replicas, poll blocks until idle (or the settle timeout), then probe TTFT."""
    deployments = list(replica_counts)
    recover_s = wait_for_replicas(app, replica_counts, options.recover_timeout_s)
    started = time.perf_counter()
    deadline = started + max(options.drain_timeout_s, options.settle_timeout_s)
    seconds_to_zero = None
    first_poll = None
    while True:
        blocks, unreachable = kv_blocks(app, deployments)
        first_poll = blocks if first_poll is None else first_poll
        in_flight = router_in_flight(app, unreachable)
        idle = not unreachable and in_flight == 0 and all(
            b.num_used_blocks == 0 and b.num_requests == 0 for b in blocks.values())
        if idle:
            seconds_to_zero = time.perf_counter() - started
            break
        if time.perf_counter() >= deadline:
            break
        time.sleep(POLL_S)
    ttft = probe_ttft(target, app, TTFT_PROBE_PROMPT, options.ttft_probe_tokens, options.ttft_probes,
                      options.request_timeout_s)
    return PostCheck(recover_s=recover_s, first_poll=first_poll, blocks=blocks,
                     blocks_in_use=sum(b.num_used_blocks for b in blocks.values()),
                     requests_in_engines=sum(b.num_requests for b in blocks.values()),
                     seconds_to_zero=seconds_to_zero, router_in_flight=in_flight, unreachable=unreachable,
                     ttft_ms=ttft)


def wait_for_replicas(app: str, replica_counts: dict[str, int], timeout_s: float) -> float | None:
    """Seconds until every deployment has its replica count back, all answering kv_stats; None if not within
    timeout_s (Serve notices a killed replica at its next health check, then loads the model again)."""
    started = time.perf_counter()
    while True:
        # Serve's view first: a replica still initializing answers a call with an error (and a logged traceback).
        # It lags a kill by up to a health-check period, so every replica must answer too, and as many as before.
        ready = deployments_healthy(app) and all(
            len(answers) >= count and not any(isinstance(a, ReplicaError) for a in answers.values())
            for answers, count in ((call_each_replica(app, d, "kv_stats", timeout_s=5.0), count)
                                   for d, count in replica_counts.items()))
        if ready:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout_s:
            return None
        time.sleep(0.5)


def deployments_healthy(app: str) -> bool:
    from ray import serve
    from ray.serve.schema import ApplicationStatus, DeploymentStatus

    status = serve.status().applications.get(app)
    return status is not None and status.status == ApplicationStatus.RUNNING and all(
        d.status == DeploymentStatus.HEALTHY for d in status.deployments.values())


def kv_blocks(app: str, deployments: list[str]) -> tuple[dict[str, ReplicaBlocks], dict[str, str]]:
    blocks, unreachable = {}, {}
    for deployment in deployments:
        for replica_id, answer in call_each_replica(app, deployment, "kv_stats", timeout_s=5.0).items():
            label = f"{deployment}#{replica_id}"
            if isinstance(answer, ReplicaError):
                unreachable[label] = answer.message
            else:
                blocks[label] = ReplicaBlocks(num_used_blocks=answer["num_used_blocks"],
                                              num_requests=answer["num_requests"])
    return blocks, unreachable


def router_in_flight(app: str, unreachable: dict[str, str]) -> int | None:
    answers = call_each_replica(app, ROUTER_DEPLOYMENT, "stats", timeout_s=5.0)
    total = 0
    for replica_id, answer in answers.items():
        if isinstance(answer, ReplicaError):
            unreachable[f"{ROUTER_DEPLOYMENT}#{replica_id}"] = answer.message
            return None
        total += answer["in_flight"]
    return total if answers else None


# ---- the command ------------------------------------------------------------------------------------------
def add_chaos_options(parser: argparse.ArgumentParser) -> None:
    defaults = ChaosOptions()
    group = parser.add_argument_group("chaos (tierserve bench chaos)")
    group.add_argument("--target", dest="grpc_target", default=None,
                       help="attach to the app at this gRPC HOST:PORT (with --address) instead of starting one")
    group.add_argument("--address", default=None, help="the Ray cluster the attached app runs on")
    group.add_argument("--app", default=None, help="Serve application name (default: tierserve)")
    group.add_argument("--connect-timeout-s", type=float, default=30.0,
                       help="give up (exit 3) when the app does not answer gRPC Health within this")
    group.add_argument("--config", default=None, help="ServeConfig YAML for the embedded app "
                                                      "(default: one decode tier, 0.25 CPU per replica)")
    group.add_argument("--transfer-timeout-s", type=float, default=5.0,
                       help="embedded app's KV transfer timeout (without --config)")
    group.add_argument("--streams", type=int, default=defaults.streams, help="reference / kill-decode streams")
    group.add_argument("--stream-tokens", type=int, default=defaults.stream_tokens)
    group.add_argument("--prompt-words", type=int, default=defaults.prompt_words, help="words of real text a prompt")
    group.add_argument("--kill-after-s", type=float, default=defaults.kill_decode_after_s,
                       help="kill-decode: seconds into the streams")
    group.add_argument("--prefill-streams", type=int, default=defaults.prefill_streams)
    group.add_argument("--prefill-tokens", type=int, default=defaults.prefill_tokens)
    group.add_argument("--prefill-kill-after-s", type=float, default=defaults.prefill_kill_after_s)
    group.add_argument("--storm", type=int, default=defaults.storm, help="cancel-storm streams")
    group.add_argument("--storm-tokens", type=int, default=defaults.storm_tokens)
    group.add_argument("--storm-cancel-max", type=int, default=defaults.storm_cancel_max,
                       help="cancelled storm streams stop after 1..this many tokens")
    group.add_argument("--soak-requests", type=int, default=defaults.soak_requests)
    group.add_argument("--soak-concurrency", type=int, default=defaults.soak_concurrency)
    group.add_argument("--soak-tokens", type=int, default=defaults.soak_tokens)
    group.add_argument("--decode-tier", default=defaults.decode_tier, help="the tier whose replica is killed")
    group.add_argument("--decode-replicas", type=int, default=1,
                       help="embedded app: replicas of the decode tier (one is killed; with 2+ the rest carry on)")
    group.add_argument("--ttft-probes", type=int, default=defaults.ttft_probes)
    group.add_argument("--drain-timeout-s", type=float, default=defaults.drain_timeout_s,
                       help="target: blocks back to 0 within this after a scenario")
    group.add_argument("--settle-timeout-s", type=float, default=defaults.settle_timeout_s,
                       help="keep polling this long to tell a slow drain from a leak")
    group.add_argument("--recover-timeout-s", type=float, default=defaults.recover_timeout_s)
    group.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s)
    group.add_argument("--seed", type=int, default=defaults.seed)


def chaos_options(args: argparse.Namespace) -> ChaosOptions:
    return ChaosOptions(
        streams=args.streams, stream_tokens=args.stream_tokens, prompt_words=args.prompt_words,
        kill_decode_after_s=args.kill_after_s, prefill_streams=args.prefill_streams,
        prefill_tokens=args.prefill_tokens, prefill_kill_after_s=args.prefill_kill_after_s, storm=args.storm,
        storm_tokens=args.storm_tokens, storm_cancel_max=args.storm_cancel_max, soak_requests=args.soak_requests,
        soak_concurrency=args.soak_concurrency, soak_tokens=args.soak_tokens, decode_tier=args.decode_tier,
        ttft_probes=args.ttft_probes, drain_timeout_s=args.drain_timeout_s, settle_timeout_s=args.settle_timeout_s,
        recover_timeout_s=args.recover_timeout_s, request_timeout_s=args.request_timeout_s, seed=args.seed)


def embedded_config(args: argparse.Namespace, grpc_port: int):
    from cluster.config import ServeConfig

    if args.config:
        base = ServeConfig.from_yaml(args.config).model_dump()
    else:
        # One decode tier, fractional CPUs: three replicas fit a 2-core machine (DESIGN §11).
        tier = {"num_cpus": 0.25}
        engine = {"num_kv_blocks": args.num_kv_blocks} if args.num_kv_blocks else {"kv_cache_memory_mb": 256}
        base = {"engine": engine, "prefill": {"name": "prefill", **tier},
                "decode_tiers": [{"name": args.decode_tier, "num_replicas": args.decode_replicas, **tier}],
                "transfer_timeout_s": args.transfer_timeout_s}
    if args.model:
        base["model"] = args.model
    return ServeConfig.model_validate({**base, "grpc_port": grpc_port})


def _gcs_unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why a HOST:PORT Ray address does not accept connections (None if it does, or is not HOST:PORT, e.g. auto)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return f"no Ray GCS at {address}: {exc}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_chaos_bench(args: argparse.Namespace) -> int:
    import ray

    from cluster.serve_cmd import APP_NAME

    options = chaos_options(args)  # bad sizes: ValueError naming the field (exit 2) before anything starts
    embedded = args.grpc_target is None
    if not embedded and not args.address:
        raise ValueError("--target needs --address (the Ray cluster the app runs on)")
    if embedded and (args.app or args.address):
        raise ValueError("--app and --address attach to a running app: give --target too")
    app = args.app or APP_NAME
    try:
        if embedded:
            from cluster.serve_cmd import start_serving

            port = args.grpc_port or _free_port()
            config = embedded_config(args, port)
            _progress(f"starting an embedded Ray with app {app!r} (gRPC on 127.0.0.1:{port})")
            start_serving(config, http_port=_free_port())
            target = f"127.0.0.1:{port}"
            why = wait_until_reachable(target, app, timeout_s=args.connect_timeout_s)
        else:
            target = args.grpc_target
            _progress(f"attaching to Ray at {args.address}, app {app!r} at {target}")
            # Both checked before ray.init: it retries an unreachable GCS for minutes.
            why = (wait_until_reachable(target, app, timeout_s=args.connect_timeout_s)
                   or _gcs_unreachable(args.address, timeout_s=args.connect_timeout_s))
            if why is None:
                try:
                    ray.init(address=args.address, configure_logging=False, log_to_driver=False)
                except ConnectionError as exc:  # e.g. token auth (Ray 2.60's default) refused this driver
                    why = f"cannot attach to Ray at {args.address}: {exc}"
        if why is None and not list_replicas(app):
            why = f"no replicas of app {app!r} in the Ray cluster at {args.address or 'the embedded Ray'}"
        if why is not None:
            print(f"tierserve: error: {why}", file=sys.stderr)
            return UNREACHABLE_EXIT
        result = run_chaos(options, target, app)
        print(format_table(result, options.drain_timeout_s, options.settle_timeout_s, options.recover_timeout_s))
        if args.json_out:
            write_outputs(result, args.json_out)
        return 0
    finally:
        _shutdown(embedded)


def write_outputs(result: ChaosResult, json_path: str) -> None:
    with open(json_path, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=1)
    png = os.path.splitext(json_path)[0] + ".png"
    plot_rss(result.rss, png, f"replica RSS during tierserve bench chaos ({result.app})")
    _progress(f"wrote {json_path} and {png}")


def _shutdown(embedded: bool) -> None:
    import ray

    if not ray.is_initialized():
        return
    if embedded:
        from ray import serve

        try:
            serve.shutdown()
        except Exception as exc:  # shutting down after a failure: report, still stop Ray
            _progress(f"serve.shutdown failed: {exc!r}")
    ray.shutdown()
