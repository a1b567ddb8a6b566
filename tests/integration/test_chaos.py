"""`tierserve bench chaos` end to end, CI-sized: a real disaggregated app on an embedded local Ray, real gRPC,
real replica kills, through the same `run_chaos` the CLI calls.

Asserts the structure and the invariants that must hold today (every good request completes, empty prompts get
INVALID_ARGUMENT, the post-run state is collected from every replica). The targets the serving path is known to
miss while it is being fixed (blocks back to 0 within 5 s, identical streams after a kill, TTFT within 2x, soak
ratio) are only exposed in `result.targets`: asserting one later is one line.
"""

import dataclasses
import json

import pytest

from tests.integration.local_serve import local_serve

pytestmark = pytest.mark.slow

TIER = {"num_cpus": 0.25}
APP = "chaos"


@pytest.fixture(scope="module")
def app_target():
    from cluster.config import ServeConfig

    config = ServeConfig.model_validate({
        "mode": "disaggregated", "engine": {"num_kv_blocks": 256, "max_num_seqs": 48}, "transfer_timeout_s": 5,
        "prefill": {"name": "prefill", **TIER}, "decode_tiers": [{"name": "default", **TIER}]})
    with local_serve(APP, config) as port:
        yield f"127.0.0.1:{port}"


def test_chaos_sequence_keeps_the_invariants(app_target, tmp_path):
    from cluster.tools.bench_chaos import run_chaos, write_outputs
    from cluster.tools.chaos_plan import KILL_DECODE, KILL_PREFILL, SCENARIOS, SOAK_BASELINE, SOAK_FAULTY, ChaosOptions
    from cluster.tools.chaos_report import (BLOCKS_ZERO, GOOD_REQUESTS_COMPLETE, INVALID_PROMPTS_REJECTED, ROUTER_IDLE,
                                      SOAK_RATIO, STREAMS_IDENTICAL, TTFT_WITHIN)

    options = ChaosOptions(streams=3, stream_tokens=48, prompt_words=24, kill_decode_after_s=0.5, prefill_streams=3,
                           prefill_tokens=16, storm=8, storm_tokens=32, storm_cancel_max=20, soak_requests=30,
                           soak_concurrency=6, soak_tokens=8, ttft_probes=1, settle_timeout_s=5.0,
                           request_timeout_s=150.0, seed=3)
    result = run_chaos(options, app_target, APP)

    assert [s.name for s in result.scenarios] == list(SCENARIOS)
    named = {s.name: s for s in result.scenarios}
    # Hard invariants: no good request lost or failed (the Router migrates a stream off a killed decode replica;
    # the decode tier recomputes a prefill whose handoff broke), and bad input is refused with the right code.
    for scenario in result.scenarios:
        codes = set(scenario.outcomes.by_outcome) - {"ok", "cancelled", "INVALID_ARGUMENT"}
        assert not codes, (scenario.name, scenario.outcomes, scenario.failures)
        assert scenario.outcomes.failed_good == 0 and scenario.outcomes.incomplete == 0, (scenario.name,
                                                                                           scenario.failures)
    assert result.targets[GOOD_REQUESTS_COMPLETE] and result.targets[INVALID_PROMPTS_REJECTED]
    for soak in (SOAK_BASELINE, SOAK_FAULTY):
        assert named[soak].outcomes.by_outcome["INVALID_ARGUMENT"] == 3  # requests #9, #19, #29
        assert named[soak].outcomes.by_outcome["cancelled"] == 4  # #6, #13, #20, #27
    # The faults really happened while requests were in flight.
    for name in (KILL_DECODE, KILL_PREFILL, SOAK_FAULTY):
        (event,) = named[name].faults
        assert event.fired and event.killed and event.in_flight > 0, (name, event)
    # Post-run state collected from EVERY replica of every KV deployment, and from the Router.
    for check in [s.after for s in result.scenarios] + [result.final]:
        deployments = {label.split("#")[0] for label in check.blocks}
        assert deployments == {"PrefillServer", "DecodeServer-default"}, check
        assert check.router_in_flight is not None and check.ttft_ms is not None
    assert result.ttft_before_ms is not None and result.soak_ratio is not None
    assert named[KILL_DECODE].compared is not None
    # Known misses today (being fixed in the serving path): reported, not asserted.
    assert set(result.targets) >= {BLOCKS_ZERO, ROUTER_IDLE, TTFT_WITHIN, STREAMS_IDENTICAL, SOAK_RATIO}
    # RSS was sampled for every deployment, killed replicas included.
    sampled = {s.replica.split("#")[0] for s in result.rss.samples}
    assert {"Router", "PrefillServer", "DecodeServer-default"} <= sampled
    assert len({s.replica for s in result.rss.samples if s.replica.startswith("DecodeServer")}) >= 2
    path = tmp_path / "chaos.json"
    write_outputs(result, str(path))
    assert json.loads(path.read_text()) == json.loads(json.dumps(dataclasses.asdict(result)))
    assert (tmp_path / "chaos.png").read_bytes()[:4] == b"\x89PNG"
