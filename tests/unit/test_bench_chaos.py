"""`tierserve bench chaos`, the parts without Ray or gRPC: planning, tallying, targets, the JSON shape, the flags."""

import dataclasses
import json

import pytest

from cluster.tools.chaos_client import CANCELLED, OK, FaultEvent, StreamResult
from cluster.tools.chaos_plan import (CANCEL_STORM, EXPECT_CANCELLED, EXPECT_INVALID, EXPECT_OK, KILL_DECODE,
                                KILL_PREFILL, REFERENCE, SCENARIOS, SOAK_BASELINE, SOAK_FAULTY, ChaosOptions,
                                RequestPlan, ScenarioPlan, plan_scenarios, pydoc_words)
from cluster.tools.chaos_report import (BLOCKS_ZERO, GOOD_REQUESTS_COMPLETE, INVALID_PROMPTS_REJECTED, ROUTER_IDLE,
                                  SOAK_RATIO, STREAMS_IDENTICAL, TTFT_WITHIN, ChaosResult, Outcomes, PostCheck,
                                  ReplicaBlocks, ScenarioResult, check_targets, count_identical, format_table,
                                  latency, tally, unexpected)
from cluster.tools.rss_sampler import Boundary, RssSample, RssTrace, plot_rss, summarize

SMALL = ChaosOptions(streams=4, stream_tokens=48, storm=16, storm_tokens=48, soak_requests=70, soak_concurrency=8,
                     prefill_streams=3, seed=7)


@pytest.fixture(scope="module")
def words():
    return pydoc_words()


def by_name(plans):
    return {p.name: p for p in plans}


def test_scenarios_in_order_with_their_faults(words):
    plans = plan_scenarios(SMALL, words)
    assert [p.name for p in plans] == list(SCENARIOS)
    named = by_name(plans)
    assert named[REFERENCE].faults == () and named[CANCEL_STORM].faults == () and named[SOAK_BASELINE].faults == ()
    assert [(f.deployment, f.after_s) for f in named[KILL_DECODE].faults] == [("DecodeServer-default", 2.0)]
    assert [(f.deployment, f.after_s) for f in named[KILL_PREFILL].faults] == [("PrefillServer", 0.3)]
    assert [(f.deployment, f.after_finished) for f in named[SOAK_FAULTY].faults] == [("DecodeServer-default", 35)]
    assert named[KILL_DECODE].requests == named[REFERENCE].requests and named[KILL_DECODE].compare_to == REFERENCE
    assert named[SOAK_FAULTY].requests == named[SOAK_BASELINE].requests  # the same soak twice
    assert named[SOAK_BASELINE].concurrency == 8 and named[REFERENCE].concurrency == 4


def test_prompts_are_real_distinct_and_disjoint_across_scenarios(words):
    named = by_name(plan_scenarios(SMALL, words))
    seen = []
    for name in (REFERENCE, KILL_PREFILL, CANCEL_STORM, SOAK_BASELINE):
        prompts = [r.prompt for r in named[name].requests if r.prompt]
        assert all(len(p.split()) == SMALL.prompt_words for p in prompts)
        seen.extend(prompts)
    assert len(seen) == len(set(seen))
    assert all(r.max_tokens == 48 and r.expect == EXPECT_OK for r in named[REFERENCE].requests)


def test_cancel_storm_cancels_every_second_stream_at_a_seeded_token(words):
    storm = by_name(plan_scenarios(SMALL, words))[CANCEL_STORM].requests
    assert [r.cancel_after is not None for r in storm] == [i % 2 == 1 for i in range(16)]
    cancels = [r.cancel_after for r in storm if r.cancel_after is not None]
    assert all(1 <= c <= SMALL.storm_cancel_max for c in cancels) and len(set(cancels)) > 1
    assert all(r.expect == (EXPECT_CANCELLED if r.cancel_after else EXPECT_OK) for r in storm)
    again = by_name(plan_scenarios(SMALL, words))[CANCEL_STORM].requests
    other = by_name(plan_scenarios(dataclasses.replace(SMALL, seed=8), words))[CANCEL_STORM].requests
    assert again == storm and [r.cancel_after for r in other] != [r.cancel_after for r in storm]


def test_soak_mix(words):
    soak = by_name(plan_scenarios(SMALL, words))[SOAK_BASELINE].requests
    invalid = [r for r in soak if r.expect == EXPECT_INVALID]
    cancelled = [r for r in soak if r.expect == EXPECT_CANCELLED]
    assert len(soak) == 70 and len(invalid) == 7 and all(r.prompt == "" for r in invalid)
    assert len(cancelled) == 9 and all(r.cancel_after == 5 for r in cancelled)  # 10 multiples of 7, one also of 10
    assert all(r.prompt and r.max_tokens == SMALL.soak_tokens for r in soak if r.expect == EXPECT_OK)


@pytest.mark.parametrize("changes,field", [
    (dict(streams=0), "streams"), (dict(storm_cancel_max=48), "storm_cancel_max"),
    (dict(soak_cancel_after=24), "soak_cancel_after"), (dict(drain_timeout_s=-1), "drain_timeout_s"),
])
def test_bad_sizes_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SMALL, **changes)


def plan_of(*requests):
    return ScenarioPlan("s", tuple(requests), concurrency=len(requests))


def req(index, expect=EXPECT_OK, max_tokens=4, cancel_after=None):
    return RequestPlan(index=index, prompt="" if expect == EXPECT_INVALID else "hi", max_tokens=max_tokens,
                       cancel_after=cancel_after, expect=expect)


def res(index, outcome=OK, tokens=(1, 2, 3, 4)):
    return StreamResult(index=index, outcome=outcome, token_ids=list(tokens), finish_reason="FINISH_REASON_LENGTH",
                        ttft_s=0.1, seconds=0.5)


def test_tally_holds_each_request_to_its_plan():
    plan = plan_of(req(0), req(1), req(2, EXPECT_CANCELLED, cancel_after=2), req(3, EXPECT_INVALID), req(4),
                   req(5, EXPECT_INVALID), req(6), req(7))
    results = [res(0), res(1, "UNAVAILABLE", (1,)), res(2, CANCELLED, (1, 2)), res(3, "INVALID_ARGUMENT", ()),
               res(4, OK, (1, 2)), res(5, OK), res(6, "INTERNAL", ())]  # 7 never came back
    outcomes = tally(plan, results)
    assert outcomes.by_outcome == {"INTERNAL": 1, "INVALID_ARGUMENT": 1, "MISSING": 1, "UNAVAILABLE": 1,
                                   "cancelled": 1, "ok": 3}
    assert outcomes.failed_good == 3  # UNAVAILABLE, INTERNAL, MISSING
    assert outcomes.incomplete == 1  # #4 ended OK with 2 of 4 tokens
    assert outcomes.invalid_not_rejected == 1  # #5
    lines = unexpected(plan, results)
    assert lines[0].startswith("#1: UNAVAILABLE after 1/4 tokens") and len(lines) == 4


def test_identical_counts_only_streams_complete_in_both_runs():
    reference = [res(0), res(1), res(2, "UNAVAILABLE", ()), res(3)]
    again = [res(0), res(1, OK, (1, 2, 3, 9)), res(2), res(3, "CANCELLED", ())]
    assert count_identical(again, reference) == (1, 2)


def post(seconds_to_zero=0.4, in_flight=0, ttft=50.0, blocks=0):
    return PostCheck(recover_s=0.0, first_poll={"PrefillServer#a": ReplicaBlocks(blocks + 3, 1)},
                     blocks={"PrefillServer#a": ReplicaBlocks(blocks, 0)}, blocks_in_use=blocks,
                     requests_in_engines=0, seconds_to_zero=seconds_to_zero, router_in_flight=in_flight,
                     unreachable={}, ttft_ms=ttft)


def scenario(name, after=None, identical=None, requests=4, wall_s=10.0, outcomes=None):
    return ScenarioResult(name=name, requests=requests,
                          outcomes=outcomes or Outcomes({"ok": requests}, 0, 0, 0),
                          latency=latency([res(i) for i in range(requests)]),
                          identical=identical, compared=None if identical is None else requests,
                          faults=[FaultEvent("DecodeServer-default", True, 2.0, 4, ["abc"])], wall_s=wall_s,
                          after=after or post())


def result_with(**changes):
    result = ChaosResult(app="tierserve", target="127.0.0.1:1", options=dataclasses.asdict(SMALL), ttft_before_ms=40.0,
                         scenarios=[scenario(REFERENCE), scenario(KILL_DECODE, identical=4),
                                    scenario(SOAK_BASELINE, wall_s=10.0), scenario(SOAK_FAULTY, wall_s=14.0)],
                         final=post(), soak_ratio=1.4)
    return dataclasses.replace(result, **changes)


def test_targets_all_met():
    targets = check_targets(result_with(), drain_timeout_s=5.0)
    assert targets == {GOOD_REQUESTS_COMPLETE: True, INVALID_PROMPTS_REJECTED: True, BLOCKS_ZERO: True,
                       ROUTER_IDLE: True, TTFT_WITHIN: True, STREAMS_IDENTICAL: True, SOAK_RATIO: True}


@pytest.mark.parametrize("changes,missed", [
    (dict(final=post(seconds_to_zero=None, blocks=12)), BLOCKS_ZERO),
    (dict(final=post(seconds_to_zero=6.0)), BLOCKS_ZERO),
    (dict(final=post(in_flight=3)), ROUTER_IDLE),
    (dict(final=post(ttft=81.0)), TTFT_WITHIN),
    (dict(ttft_before_ms=None), TTFT_WITHIN),
    (dict(soak_ratio=1.6), SOAK_RATIO),
    (dict(scenarios=[scenario(KILL_DECODE, identical=3)]), STREAMS_IDENTICAL),
    (dict(scenarios=[dataclasses.replace(scenario(KILL_DECODE, identical=4),
                                         faults=[FaultEvent("DecodeServer-default", False, None, 0)])]),
     STREAMS_IDENTICAL),
    (dict(scenarios=[scenario(CANCEL_STORM, outcomes=Outcomes({"ok": 3, "INTERNAL": 1}, 1, 0, 0))]),
     GOOD_REQUESTS_COMPLETE),
    (dict(scenarios=[scenario(SOAK_BASELINE, outcomes=Outcomes({"ok": 4}, 0, 0, 1))]), INVALID_PROMPTS_REJECTED),
])
def test_each_target_can_be_missed(changes, missed):
    targets = check_targets(result_with(**changes), drain_timeout_s=5.0)
    assert not targets[missed]
    table = format_table(dataclasses.replace(result_with(**changes), targets=targets), 5.0, 20.0, 120.0)
    assert f"{missed}: no" in table


def test_json_shape_is_stable(tmp_path):
    trace = RssTrace(period_s=0.5, samples=[RssSample(0.0, "Router#a", 1, 100.0), RssSample(0.5, "Router#a", 1, 120.0)],
                     boundaries=[Boundary(REFERENCE, 0.0, 0.4)])
    result = result_with(rss=trace, rss_summary=summarize(trace))
    result.targets = check_targets(result, 5.0)
    document = json.loads(json.dumps(dataclasses.asdict(result)))
    assert list(document) == ["app", "target", "options", "ttft_before_ms", "scenarios", "final", "soak_ratio",
                              "rss", "rss_summary", "targets", "wall_s"]
    assert list(document["scenarios"][0]) == ["name", "requests", "outcomes", "latency", "identical", "compared",
                                              "faults", "wall_s", "after", "failures"]
    assert document["scenarios"][0]["latency"] == {"ttft_p50_ms": 100.0, "ttft_max_ms": 100.0, "request_p50_s": 0.5,
                                                   "request_max_s": 0.5}
    assert list(document["scenarios"][0]["after"]) == [
        "recover_s", "first_poll", "blocks", "blocks_in_use", "requests_in_engines", "seconds_to_zero",
        "router_in_flight", "unreachable", "ttft_ms"]
    assert list(document["scenarios"][0]["outcomes"]) == ["by_outcome", "failed_good", "incomplete",
                                                          "invalid_not_rejected"]
    assert document["scenarios"][1]["faults"][0] == {"deployment": "DecodeServer-default", "fired": True,
                                                     "at_s": 2.0, "in_flight": 4, "killed": ["abc"]}
    assert document["rss_summary"][0] == {"replica": "Router#a", "pid": 1, "first_mb": 100.0, "max_mb": 120.0,
                                          "last_mb": 120.0, "seconds": 0.5}
    assert document["options"]["storm"] == 16 and document["targets"][SOAK_RATIO] is True
    plot_rss(trace, str(tmp_path / "rss.png"), "test")
    assert (tmp_path / "rss.png").read_bytes()[:4] == b"\x89PNG"


def test_table_rows_and_target_lines():
    result = result_with()
    result.targets = check_targets(result, 5.0)
    table = format_table(result, 5.0, 20.0, 120.0)
    lines = table.splitlines()
    assert lines[1].startswith("scenario") and "TTFT after ms" in lines[1] and "req s p50/max" in lines[1]
    assert any(line.startswith("kill-decode") and "4/4" in line for line in lines)
    assert any(line.startswith("final") for line in lines)
    assert "invariant good_requests_complete: yes" in table and "target soak_ratio_le_1.5: yes" in table
    assert "soak wall time faulty/baseline: 1.40x" in table
    assert "reference: held right after it: PrefillServer#a 3 blocks / 1 requests" in table


def test_cli_parses_chaos_flags():
    from cluster.tools.bench_chaos import chaos_options
    from cluster.cli import build_parser

    args = build_parser().parse_args(["bench", "chaos", "--streams", "4", "--stream-tokens", "48", "--storm", "16",
                                      "--soak-requests", "60", "--soak-concurrency", "8", "--json", "/tmp/x.json",
                                      "--target", "127.0.0.1:9000", "--address", "auto", "--app", "demo"])
    options = chaos_options(args)
    assert (options.streams, options.stream_tokens, options.storm, options.soak_requests,
            options.soak_concurrency) == (4, 48, 16, 60, 8)
    assert (args.target, args.grpc_target, args.address, args.app, args.json_out) == (
        "chaos", "127.0.0.1:9000", "auto", "demo", "/tmp/x.json")
    assert build_parser().parse_args(["bench", "serve"]).grpc_port is None  # bench serve falls back to 9000


def test_embedded_app_takes_the_decode_replica_count():
    from cluster.cli import build_parser
    from cluster.tools.bench_chaos import embedded_config

    args = build_parser().parse_args(["bench", "chaos", "--decode-replicas", "2"])
    config = embedded_config(args, grpc_port=9123)
    assert [(tier.name, tier.num_replicas) for tier in config.decode_tiers] == [("default", 2)]
    assert config.grpc_port == 9123 and embedded_config(build_parser().parse_args(["bench", "chaos"]),
                                                        9123).decode_tiers[0].num_replicas == 1


def test_cli_refuses_a_target_without_a_ray_address():
    from cluster.cli import main

    assert main(["bench", "chaos", "--target", "127.0.0.1:1"]) == 2


def test_cli_exits_3_when_the_app_cannot_be_reached():
    import socket

    from cluster.cli import main

    with socket.socket() as sock:  # a port nobody listens on (bound, not listening)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert main(["bench", "chaos", "--target", f"127.0.0.1:{port}", "--address", f"127.0.0.1:{port}",
                     "--connect-timeout-s", "1"]) == 3


def test_cli_refuses_attach_flags_without_a_target():
    from cluster.cli import main

    assert main(["bench", "chaos", "--app", "demo"]) == 2
