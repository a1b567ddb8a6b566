"""The chaos bench's records, the outcome tally, the targets check and the table (pure: no Ray, no gRPC).

The JSON document is `asdict(ChaosResult)`; its shape is pinned by tests/unit/test_bench_chaos.py.
Hard invariants (must hold today) and targets (some are known misses while the serving path is being
fixed) are both booleans in `ChaosResult.targets`, so turning a target into an assertion is one line.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from cluster.tools.chaos_client import CANCELLED, OK, FaultEvent, StreamResult
from cluster.tools.chaos_plan import EXPECT_CANCELLED, EXPECT_INVALID, EXPECT_OK, KILL_DECODE, ScenarioPlan
from cluster.tools.rss_sampler import RssSummary, RssTrace

TTFT_FACTOR = 2.0  # TTFT after a scenario within this factor of the one before the run
SOAK_RATIO_MAX = 1.5  # faulty soak wall time / baseline soak wall time

# Invariants: every good request completes (or is cancelled as planned); empty prompts get INVALID_ARGUMENT.
GOOD_REQUESTS_COMPLETE, INVALID_PROMPTS_REJECTED = "good_requests_complete", "invalid_prompts_rejected"
# Targets.
BLOCKS_ZERO, ROUTER_IDLE, TTFT_WITHIN, STREAMS_IDENTICAL, SOAK_RATIO = (
    "blocks_zero_within_drain_timeout", "router_in_flight_zero", "ttft_within_2x", "kill_decode_streams_identical",
    "soak_ratio_le_1.5")
INVARIANTS = (GOOD_REQUESTS_COMPLETE, INVALID_PROMPTS_REJECTED)


@dataclass
class ReplicaBlocks:
    num_used_blocks: int
    num_requests: int


@dataclass
class PostCheck:
    """The app's state after a scenario: KV blocks on every replica, the Router's in-flight count, a fresh TTFT."""

    recover_s: float | None  # seconds until every deployment had answering replicas again (None: not in time)
    first_poll: dict[str, ReplicaBlocks]  # "<deployment>#<replica id>" -> right after recovery (who held what)
    blocks: dict[str, ReplicaBlocks]  # ... at the last poll
    blocks_in_use: int  # sum of num_used_blocks at the last poll
    requests_in_engines: int  # sum of num_requests at the last poll
    # Blocks, engine requests and router in-flight all 0 this long after recovery (None: not within the settle
    # timeout). Counted from recovery: a replacement replica's load time is not a drain.
    seconds_to_zero: float | None
    router_in_flight: int | None  # None: the Router did not answer
    unreachable: dict[str, str]  # replicas that did not answer kv_stats/stats, and why
    ttft_ms: float | None


@dataclass
class Outcomes:
    by_outcome: dict[str, int]  # "ok", "cancelled", or a gRPC status name -> requests
    failed_good: int  # meant to complete (or be cancelled by us) but ended with an error status
    incomplete: int  # ended OK with fewer tokens than max_tokens (EOS is ignored: that is a dropped token)
    invalid_not_rejected: int  # empty prompts that did not get INVALID_ARGUMENT


@dataclass
class Latency:
    """Client-side latencies of a scenario's streams that produced a token (a wedge shows as a large max)."""

    ttft_p50_ms: float | None
    ttft_max_ms: float | None
    request_p50_s: float | None
    request_max_s: float | None


@dataclass
class ScenarioResult:
    name: str
    requests: int
    outcomes: Outcomes
    latency: Latency
    identical: int | None  # token-identical to the compared scenario (streams OK in both); None: not compared
    compared: int | None
    faults: list[FaultEvent]
    wall_s: float
    after: PostCheck
    failures: list[str] = field(default_factory=list)  # first few unexpected outcomes, for the report


@dataclass
class ChaosResult:
    app: str
    target: str
    options: dict
    ttft_before_ms: float | None
    scenarios: list[ScenarioResult] = field(default_factory=list)
    final: PostCheck | None = None
    soak_ratio: float | None = None
    rss: RssTrace | None = None
    rss_summary: list[RssSummary] = field(default_factory=list)
    targets: dict[str, bool] = field(default_factory=dict)
    wall_s: float = 0.0


def tally(plan: ScenarioPlan, results: list[StreamResult]) -> Outcomes:
    """Count outcomes and hold each request to what its plan expects."""
    by_index = {r.index: r for r in results}
    counts = Counter(r.outcome for r in results)
    failed_good = incomplete = invalid_not_rejected = 0
    for request in plan.requests:
        result = by_index.get(request.index)
        outcome = result.outcome if result is not None else "MISSING"
        if request.expect == EXPECT_INVALID:
            invalid_not_rejected += outcome != EXPECT_INVALID
        elif outcome not in (OK, CANCELLED):
            failed_good += 1
        elif request.expect == EXPECT_OK and (outcome != OK or len(result.token_ids) != request.max_tokens):
            incomplete += 1  # ended early: fewer tokens, or a stream we never cancelled reported CANCELLED
        elif request.expect == EXPECT_CANCELLED and outcome == OK and len(result.token_ids) != request.max_tokens:
            incomplete += 1
    if len(by_index) < len(plan.requests):
        counts["MISSING"] += len(plan.requests) - len(by_index)
    return Outcomes(by_outcome=dict(sorted(counts.items())), failed_good=failed_good, incomplete=incomplete,
                    invalid_not_rejected=invalid_not_rejected)


def latency(results: list[StreamResult]) -> Latency:
    ttfts = [r.ttft_s * 1e3 for r in results if r.ttft_s is not None]
    seconds = [r.seconds for r in results if r.ttft_s is not None]
    return Latency(ttft_p50_ms=statistics.median(ttfts) if ttfts else None, ttft_max_ms=max(ttfts, default=None),
                   request_p50_s=statistics.median(seconds) if seconds else None,
                   request_max_s=max(seconds, default=None))


def unexpected(plan: ScenarioPlan, results: list[StreamResult], limit: int = 5) -> list[str]:
    """A few lines naming requests whose outcome is not what their plan expects (for the report)."""
    lines = []
    expected = {EXPECT_OK: OK, EXPECT_CANCELLED: CANCELLED, EXPECT_INVALID: EXPECT_INVALID}
    for result in results:
        request = plan.requests[result.index]
        if result.outcome != expected[request.expect] or (
                result.outcome == OK and len(result.token_ids) != request.max_tokens):
            lines.append(f"#{result.index}: {result.outcome} after {len(result.token_ids)}/{request.max_tokens} "
                         f"tokens ({result.seconds:.1f} s) {result.details[:160]}".rstrip())
            if len(lines) == limit:
                break
    return lines


def count_identical(results: list[StreamResult], reference: list[StreamResult]) -> tuple[int, int]:
    """(identical, compared): streams that ran to completion in both runs, and how many of them match token for
    token."""
    ref = {r.index: r.token_ids for r in reference if r.outcome == OK}
    compared = [(r.token_ids, ref[r.index]) for r in results if r.outcome == OK and r.index in ref]
    return sum(a == b for a, b in compared), len(compared)


def check_targets(result: ChaosResult, drain_timeout_s: float) -> dict[str, bool]:
    """Invariants and targets, one boolean each (see the module docstring)."""
    checks = [s.after for s in result.scenarios] + ([result.final] if result.final else [])
    kill_decode = [s for s in result.scenarios if s.name == KILL_DECODE]
    ttfts = [c.ttft_ms for c in checks]
    return {
        GOOD_REQUESTS_COMPLETE: all(s.outcomes.failed_good == 0 and s.outcomes.incomplete == 0
                                    for s in result.scenarios),
        INVALID_PROMPTS_REJECTED: all(s.outcomes.invalid_not_rejected == 0 for s in result.scenarios),
        BLOCKS_ZERO: all(c.seconds_to_zero is not None and c.seconds_to_zero <= drain_timeout_s for c in checks),
        ROUTER_IDLE: all(c.router_in_flight == 0 for c in checks),
        TTFT_WITHIN: result.ttft_before_ms is not None and all(
            t is not None and t <= TTFT_FACTOR * result.ttft_before_ms for t in ttfts),
        # Vacuous unless the kill happened while the streams ran (too-short streams finish before --kill-after-s).
        STREAMS_IDENTICAL: bool(kill_decode) and all(s.identical == s.requests and all(e.fired for e in s.faults)
                                                     for s in kill_decode),
        SOAK_RATIO: result.soak_ratio is not None and result.soak_ratio <= SOAK_RATIO_MAX,
    }


def missed_by(result: ChaosResult, target: str, drain_timeout_s: float) -> list[str]:
    """Which scenarios (or "final") miss a per-check target: the detail behind a `no`."""
    named = [(s.name, s.after) for s in result.scenarios] + ([("final", result.final)] if result.final else [])
    if target == BLOCKS_ZERO:
        return [n for n, c in named if c.seconds_to_zero is None or c.seconds_to_zero > drain_timeout_s]
    if target == ROUTER_IDLE:
        return [n for n, c in named if c.router_in_flight != 0]
    if target == TTFT_WITHIN and result.ttft_before_ms is not None:
        return [n for n, c in named if c.ttft_ms is None or c.ttft_ms > TTFT_FACTOR * result.ttft_before_ms]
    if target == GOOD_REQUESTS_COMPLETE:
        return [s.name for s in result.scenarios if s.outcomes.failed_good or s.outcomes.incomplete]
    if target == STREAMS_IDENTICAL:
        return [f"{s.name} ({s.identical}/{s.requests} identical"
                f"{'' if all(e.fired for e in s.faults) else ', kill skipped'})"
                for s in result.scenarios if s.name == KILL_DECODE]
    if target == INVALID_PROMPTS_REJECTED:
        return [s.name for s in result.scenarios if s.outcomes.invalid_not_rejected]
    return []


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _seconds(value: float | None, timeout: float) -> str:
    return f">{timeout:.0f}" if value is None else f"{value:.1f}"


def _spread(lat: Latency) -> str:
    if lat.request_p50_s is None:
        return "-"
    return f"{lat.request_p50_s:.1f}/{lat.request_max_s:.1f}"


def format_table(result: ChaosResult, drain_timeout_s: float, settle_timeout_s: float,
                 recover_timeout_s: float) -> str:
    rows = [("scenario", "reqs", "ok", "cancelled", "errors", "identical", "recover s", "blocks after", "s to 0",
             "router in flight", "TTFT before ms", "TTFT after ms", "req s p50/max", "wall s")]
    for s in result.scenarios:
        o = s.outcomes.by_outcome
        errors = ", ".join(f"{k}:{v}" for k, v in o.items() if k not in (OK, CANCELLED)) or "-"
        rows.append((s.name, str(s.requests), str(o.get(OK, 0)), str(o.get(CANCELLED, 0)), errors,
                     "-" if s.identical is None else f"{s.identical}/{s.compared}",
                     _seconds(s.after.recover_s, recover_timeout_s),
                     f"{s.after.blocks_in_use} ({s.after.requests_in_engines} req)",
                     _seconds(s.after.seconds_to_zero, max(drain_timeout_s, settle_timeout_s)),
                     "?" if s.after.router_in_flight is None else str(s.after.router_in_flight),
                     _ms(result.ttft_before_ms), _ms(s.after.ttft_ms), _spread(s.latency), f"{s.wall_s:.1f}"))
    if result.final is not None:
        f = result.final
        rows.append(("final", "", "", "", "", "", _seconds(f.recover_s, recover_timeout_s),
                     f"{f.blocks_in_use} ({f.requests_in_engines} req)",
                     _seconds(f.seconds_to_zero, max(drain_timeout_s, settle_timeout_s)),
                     "?" if f.router_in_flight is None else str(f.router_in_flight), _ms(result.ttft_before_ms),
                     _ms(f.ttft_ms), "", f"{result.wall_s:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    out = [f"tierserve bench chaos: app {result.app!r} at {result.target}", *lines]
    for s in result.scenarios:
        for event in s.faults:
            out.append(f"{s.name}: killed {event.deployment} {event.killed} at {event.at_s:.1f} s, "
                       f"{event.in_flight} requests in flight" if event.fired else
                       f"{s.name}: {event.deployment} kill skipped (every request had finished)")
        for line in s.failures:
            out.append(f"{s.name}: unexpected {line}")
        held = {label: b for label, b in s.after.first_poll.items() if b.num_used_blocks or b.num_requests}
        if held:
            out.append(f"{s.name}: held right after it: " + ", ".join(
                f"{label} {b.num_used_blocks} blocks / {b.num_requests} requests" for label, b in held.items()))
        for replica, why in s.after.unreachable.items():
            out.append(f"{s.name}: {replica} did not answer: {why}")
        if s.after.recover_s is None:
            out.append(f"{s.name}: killed replicas were not all replaced in time")
    if result.soak_ratio is not None:
        out.append(f"soak wall time faulty/baseline: {result.soak_ratio:.2f}x (target <= {SOAK_RATIO_MAX})")
    if result.rss_summary:
        out.append("replica RSS MiB (first / max / last over its sampled seconds):")
        out.extend(f"  {r.replica} pid {r.pid}: {r.first_mb:.0f} / {r.max_mb:.0f} / {r.last_mb:.0f} over "
                   f"{r.seconds:.0f} s" for r in result.rss_summary)
    for name, met in result.targets.items():
        kind = "invariant" if name in INVARIANTS else "target"
        missed = [] if met else missed_by(result, name, drain_timeout_s)
        out.append(f"{kind} {name}: {'yes' if met else 'no'}" + (f" (missed after: {', '.join(missed)})"
                                                                 if missed else ""))
    return "\n".join(out)
