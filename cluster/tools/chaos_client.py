"""The chaos bench's gRPC side: run a scenario's requests as real streams while its faults fire.

Each request is one `Generate` stream on a worker thread (`concurrency` workers pull from the plan in
order). A fault fires from the calling thread once its trigger is reached while requests are still in
flight; it is skipped (and recorded so) when every request finished first. A client cancel is
`call.cancel()` after the planned number of tokens; every stream has a deadline, so a wedged server
shows up as DEADLINE_EXCEEDED instead of hanging the bench.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from cluster.tools.chaos_plan import FaultPlan, RequestPlan, ScenarioPlan

OK, CANCELLED = "ok", "cancelled"  # outcomes besides a gRPC status code name


@dataclass
class StreamResult:
    index: int
    outcome: str  # OK | CANCELLED (by us) | the gRPC status code name (e.g. "UNAVAILABLE")
    token_ids: list[int]
    finish_reason: str
    ttft_s: float | None
    seconds: float
    details: str = ""  # the status details of a failed stream


@dataclass
class FaultEvent:
    deployment: str
    fired: bool
    at_s: float | None  # seconds into the scenario
    in_flight: int  # requests in flight when it fired
    killed: list[str] = field(default_factory=list)  # replica ids


def generate_request(plan: RequestPlan):
    from protos import inference_pb2 as pb

    # Greedy and EOS ignored: every stream has a known length and a reproducible token sequence.
    return pb.GenerateRequest(prompt=plan.prompt, sampling=pb.SamplingParams(
        max_tokens=plan.max_tokens, temperature=0, ignore_eos=True))


def run_stream(stub, app: str, plan: RequestPlan, timeout_s: float) -> StreamResult:
    import grpc

    from protos import inference_pb2 as pb

    started = time.perf_counter()
    tokens: list[int] = []
    ttft = None
    finish = pb.FINISH_REASON_UNSPECIFIED
    call = stub.Generate(generate_request(plan), metadata=(("application", app),), timeout=timeout_s)
    cancelled = False
    try:
        for chunk in call:
            if chunk.token_ids and ttft is None:
                ttft = time.perf_counter() - started
            tokens.extend(chunk.token_ids)
            finish = chunk.finish_reason or finish
            if plan.cancel_after is not None and len(tokens) >= plan.cancel_after:
                cancelled = True
                call.cancel()
                break
    except grpc.RpcError as exc:
        if not (cancelled and exc.code() is grpc.StatusCode.CANCELLED):
            return StreamResult(plan.index, exc.code().name, tokens, pb.FinishReason.Name(finish), ttft,
                                time.perf_counter() - started, details=exc.details() or "")
    return StreamResult(plan.index, CANCELLED if cancelled else OK, tokens, pb.FinishReason.Name(finish), ttft,
                        time.perf_counter() - started)


@dataclass
class _Progress:
    """Shared between the workers and the fault loop."""

    next_index: int = 0
    in_flight: int = 0
    finished: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_scenario(target: str, app: str, plan: ScenarioPlan, timeout_s: float,
                 kill: Callable[[str], list[str]]) -> tuple[list[StreamResult], list[FaultEvent], float]:
    """Run every request of `plan` (and fire its faults through `kill(deployment) -> killed ids`).
    Returns the results in plan order, the fault events and the wall seconds."""
    import grpc

    from protos import inference_pb2_grpc as pb_grpc

    results: list[StreamResult | None] = [None] * len(plan.requests)
    progress = _Progress()

    def worker(stub) -> None:
        while True:
            with progress.lock:
                if progress.next_index >= len(plan.requests):
                    return
                request = plan.requests[progress.next_index]
                progress.next_index += 1
                progress.in_flight += 1
            try:
                results[request.index] = run_stream(stub, app, request, timeout_s)
            except Exception as exc:  # a client-side bug must not lose the request silently
                results[request.index] = StreamResult(request.index, f"CLIENT_{type(exc).__name__}", [], "", None,
                                                      0.0, details=str(exc))
            with progress.lock:
                progress.in_flight -= 1
                progress.finished += 1

    events = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(stub,), daemon=True, name=f"chaos-{plan.name}-{i}")
                   for i in range(min(plan.concurrency, len(plan.requests)))]
        for thread in threads:
            thread.start()
        pending = list(plan.faults)
        while any(thread.is_alive() for thread in threads):
            now = time.perf_counter() - started
            for fault in [f for f in pending if _due(f, now, progress.finished)]:
                pending.remove(fault)
                with progress.lock:
                    in_flight = progress.in_flight
                events.append(FaultEvent(fault.deployment, fired=True, at_s=now, in_flight=in_flight,
                                         killed=kill(fault.deployment)))
            time.sleep(0.02)  # every stream has a deadline, so this loop ends
        seconds = time.perf_counter() - started
    events.extend(FaultEvent(f.deployment, fired=False, at_s=None, in_flight=0) for f in pending)
    return [r for r in results if r is not None], events, seconds


def _due(fault: FaultPlan, now_s: float, finished: int) -> bool:
    if fault.after_s is not None and now_s >= fault.after_s:
        return True
    return fault.after_finished is not None and finished >= fault.after_finished


def probe_ttft(target: str, app: str, prompt: str, max_tokens: int, probes: int, timeout_s: float) -> float | None:
    """Median TTFT in ms of `probes` sequential fresh requests; None if none produced a token."""
    import grpc

    from protos import inference_pb2_grpc as pb_grpc

    plan = RequestPlan(index=0, prompt=prompt, max_tokens=max_tokens, cancel_after=None, expect=OK)
    ttfts = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for _ in range(probes):
            result = run_stream(stub, app, plan, timeout_s)
            if result.ttft_s is not None:
                ttfts.append(result.ttft_s * 1e3)
    return statistics.median(ttfts) if ttfts else None


def wait_until_reachable(target: str, app: str, timeout_s: float) -> str | None:
    """None once the app answers Health over gRPC; else why not."""
    import grpc

    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            reply = pb_grpc.InferenceStub(channel).Health(pb.HealthRequest(), metadata=(("application", app),),
                                                           timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return f"no gRPC server at {target} after {timeout_s:.0f} s"
        except grpc.RpcError as exc:
            return f"{target} app {app!r}: {exc.code().name}: {exc.details()}"
    if reply.status != pb.HealthResponse.SERVING:
        return f"{target} app {app!r} is not serving: {reply.detail}"
    return None
