"""Scale-down is churn too (real local Ray + real gRPC): a decode tier goes from 2 replicas to 1 while 8 greedy
streams run on both. The removed replica drains for its graceful_shutdown_timeout_s (kept short here so streams
are cut), its streams move to the survivor and finish with exactly the undisturbed tokens; the prefill tier drops
its channel to the gone replica; nothing is left in use on any replica.

Re-deploying with only a new replica count scales the tier in place (cluster/app.py: code_version): the other
replicas keep running, so only streams on the removed one move.
"""

import threading
import time

import grpc
import pytest

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.local_serve import local_serve

pytestmark = pytest.mark.slow

APP = "scale"
NUM_STREAMS = 8
STREAM_TOKENS = 96
PROMPTS = [f"Story {index}: once upon a time, in a village by the sea," for index in range(NUM_STREAMS)]


def config(num_decode_replicas: int):
    from cluster.config import ServeConfig

    tier = {"num_cpus": 0.25}
    return ServeConfig.model_validate({
        "engine": {"num_kv_blocks": 256, "max_num_seqs": 32}, "transfer_timeout_s": 5,
        "prefill": {"name": "prefill", **tier},
        "decode_tiers": [{"name": "default", "num_replicas": num_decode_replicas,
                          "graceful_shutdown_timeout_s": 0.5, **tier}]})


def stream(stub, prompt: str, tokens: list[int], started: threading.Event, errors: list) -> None:
    request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=STREAM_TOKENS, temperature=0,
                                                                            ignore_eos=True))
    try:
        for chunk in stub.Generate(request, metadata=(("application", APP),), timeout=180):
            tokens.extend(chunk.token_ids)
            if len(tokens) >= 4:
                started.set()
    except grpc.RpcError as exc:
        errors.append(f"{exc.code()}: {exc.details()}")
    finally:
        started.set()


def run_streams(stub, during=None) -> tuple[list[list[int]], list[str]]:
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    started = [threading.Event() for _ in PROMPTS]
    errors: list[str] = []
    threads = [threading.Thread(target=stream, args=(stub, prompt, tokens[index], started[index], errors))
               for index, prompt in enumerate(PROMPTS)]
    for thread in threads:
        thread.start()
    for event in started:
        event.wait(timeout=120)
    if during is not None:
        during()
    for thread in threads:
        thread.join(timeout=240)
    return tokens, errors


def eventually(condition, seconds: float):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_scaling_a_decode_tier_down_mid_stream_loses_nothing():
    from ray import serve

    from cluster.app import build_app
    from cluster.tools.replicas import call_each_replica, list_replicas

    with local_serve(APP, config(2)) as port:
        decode_before = {r.replica_id for r in list_replicas(APP, "DecodeServer-default")}
        assert len(decode_before) == 2
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            reference, errors = run_streams(stub)
            assert errors == [] and all(len(tokens) == STREAM_TOKENS for tokens in reference)
            prefill = serve.get_deployment_handle("PrefillServer", app_name=APP)
            assert sorted(prefill.channel_stats.remote().result()["peers"]) == sorted(decode_before)

            # The same app with one decode replica: Serve removes one replica (graceful, 0.5 s), keeps the other.
            scaled, errors = run_streams(stub, during=lambda: serve.run(build_app(config(1)), name=APP,
                                                                        route_prefix=f"/{APP}"))
            assert errors == []
            assert scaled == reference  # every stream, moved or not, has the undisturbed greedy tokens

            def decode_replicas() -> set[str]:
                return {r.replica_id for r in list_replicas(APP, "DecodeServer-default")}

            decode_after = eventually(lambda: decode_replicas() if len(decode_replicas()) == 1 else set(), 15)
            assert len(decode_after) == 1 and decode_after < decode_before  # scaled in place, not redeployed
            router = serve.get_deployment_handle("Router", app_name=APP)
            assert router.stats.remote().result()["migrations"] >= 1  # the removed replica's streams moved
            # The prefill tier notices the gone replica (its heartbeat fails) and drops that channel.
            assert eventually(lambda: sorted(prefill.channel_stats.remote().result()["peers"]) ==
                              sorted(decode_after), seconds=15)

            def nothing_in_use() -> bool:
                stats = {**call_each_replica(APP, "DecodeServer-default", "kv_stats"),
                         **call_each_replica(APP, "PrefillServer", "kv_stats")}
                return all(isinstance(s, dict) and s["num_used_blocks"] == 0 and s["num_requests"] == 0
                           for s in stats.values())

            assert eventually(nothing_in_use, seconds=10)
            assert router.stats.remote().result()["in_flight"] == 0
            # And the tier serves on: a fresh request on the survivor.
            fresh = stub.Complete(pb.GenerateRequest(prompt="Name a color.", sampling=pb.SamplingParams(
                max_tokens=8, temperature=0)), metadata=(("application", APP),), timeout=60)
            assert fresh.usage.completion_tokens > 0
