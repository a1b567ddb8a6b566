"""Real local Ray cluster + real gRPC on a real port: disaggregated == unified == in-process engine.

Two applications run side by side on one embedded Ray: `disagg` (prefill tier + decode tier, KV over
a gloo channel per replica pair) and `unified` (one tier does both). Replicas ask fractional CPUs (2-core CI).
Both default decode tiers speculate (n-gram token trees, fixed policy): every test here, the kills and the
cancellations included, runs against verify passes, and greedy output must still be plain decoding's.
"""

import threading
import time

import grpc
import pytest

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.local_serve import free_port

pytestmark = pytest.mark.slow

TIER = {"num_cpus": 0.25}
SPECULATING = {"speculative": {"method": "ngram", "tree_width": 2, "num_speculative_tokens": 6, "policy": "fixed",
                               "ngram_min": 1}}
CLUSTER_STATE: dict[str, int] = {}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.app import GRPC_SERVICER, build_app
    from cluster.config import ServeConfig

    port = free_port()
    metrics_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[GRPC_SERVICER]),
                http_options=HTTPOptions(port=free_port()))
    common = {"engine": {"num_kv_blocks": 256, "max_num_seqs": 48}, "transfer_timeout_s": 5,
              "prefill": {"name": "prefill", **TIER}}
    configs = {
        "disagg": ServeConfig.model_validate({**common, "mode": "disaggregated", "decode_tiers": [
            {"name": "default", **TIER, "engine": SPECULATING},
            {"name": "long", "min_prompt_tokens": 400, **TIER,
             "engine": {"kv_eviction": {"policy": "value_aware", "budget": 0.25}}}]}),
        "unified": ServeConfig.model_validate({**common, "mode": "unified", "decode_tiers": [
            {"name": "default", **TIER, "engine": SPECULATING}]}),
        # Compressed KV end to end: the prefill tier writes TurboQuant pages, the decode tier attends over them.
        "compressed": ServeConfig.model_validate({
            **common, "engine": {**common["engine"], "kv_codec": "tq-k4v3"}, "mode": "disaggregated",
            "decode_tiers": [{"name": "default", **TIER}]}),
    }
    for name, config in configs.items():
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    CLUSTER_STATE["metrics_port"] = metrics_port
    yield pb_grpc.InferenceStub(channel), serve
    channel.close()
    serve.shutdown()
    ray.shutdown()


def call(stub, app: str, request: pb.GenerateRequest, **kwargs):
    return stub.Complete(request, metadata=(("application", app),), timeout=120, **kwargs)


def greedy(prompt: str, max_tokens: int = 24, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                         ignore_eos=True, **sampling))


def handle(serve, app: str, deployment: str):
    return serve.get_deployment_handle(deployment, app_name=app)


def wait_until_no_blocks(serve, app: str, deployments: list[str], seconds: float = 20.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        stats = {d: handle(serve, app, d).kv_stats.remote().result() for d in deployments}
        if all(s["num_used_blocks"] == 0 and s["num_requests"] == 0 for s in stats.values()) or \
                time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


PROMPTS = ["The capital of France is", "In Python, a list comprehension is",
           "Once upon a time, in a small village by the sea,",
           "Repeat after me: red green blue, red green blue, red green blue, red green"]


def test_disaggregated_equals_unified_equals_in_process(cluster, real_model):
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.sampling_params import SamplingParams

    stub, serve = cluster
    engine = Engine(EngineConfig(num_kv_blocks=256), loaded=real_model)
    expected = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0,
                                                                              ignore_eos=True))]
    before = handle(serve, "disagg", "DecodeServer-default").transfer_stats.remote().result()
    drafts = {"disagg": 0, "unified": 0}
    for prompt, tokens in zip(PROMPTS, expected):
        disagg = call(stub, "disagg", greedy(prompt))
        unified = call(stub, "unified", greedy(prompt))
        assert list(disagg.token_ids) == tokens
        assert list(unified.token_ids) == tokens
        assert disagg.text == unified.text and disagg.tier == "default"
        assert disagg.finish_reason == pb.FINISH_REASON_LENGTH and disagg.usage.completion_tokens == 24
        for name, response in (("disagg", disagg), ("unified", unified)):
            assert response.usage.accepted_draft_tokens <= response.usage.draft_tokens
            drafts[name] += response.usage.accepted_draft_tokens
    # the decode tiers really drafted and verified (the repetitive prompt copies itself)
    assert drafts["disagg"] > 0 and drafts["unified"] > 0
    # a request may opt out
    plain = call(stub, "disagg", greedy(PROMPTS[-1], speculative=False))
    assert list(plain.token_ids) == expected[-1] and plain.usage.draft_tokens == 0
    after = handle(serve, "disagg", "DecodeServer-default").transfer_stats.remote().result()
    # The KV really crossed the tiers (not recomputed): one transfer per request, bytes accounted.
    assert after["transfers"] - before["transfers"] == len(PROMPTS) + 1  # and the opted-out request
    assert after["failures"] == before["failures"]
    assert after["bytes"] > before["bytes"]


def test_compressed_kv_crosses_tiers_encoded_and_matches_in_process(cluster, real_model):
    """tq-k4v3 disaggregated == the in-process engine with tq-k4v3; the wire carries exactly the accounted bytes."""
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.sampling_params import SamplingParams

    import torch

    stub, serve = cluster
    # Same arithmetic as a replica: one thread, one request at a time. (A quantized cache turns float noise
    # from a different GEMM blocking into a code one level over now and then, so only like-for-like runs
    # are token-exact.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine(EngineConfig(num_kv_blocks=256, kv_codec="tq-k4v3"), loaded=real_model)
        expected = [engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
                    for prompt in PROMPTS]
    finally:
        torch.set_num_threads(threads)
    bytes_per_block = engine.block_size * sum(engine.codec.bytes_per_token(layer)
                                              for layer in range(real_model.config.num_layers))
    fp16_bytes_per_block = engine.block_size * real_model.config.num_layers * 2 * real_model.config.num_kv_heads \
        * real_model.config.head_dim * 2
    assert bytes_per_block * 4 < fp16_bytes_per_block  # it really is compressed (4.3x for k4v3)
    decode = handle(serve, "compressed", "DecodeServer-default")
    before = decode.transfer_stats.remote().result()
    for prompt, completion in zip(PROMPTS, expected):
        response = call(stub, "compressed", greedy(prompt))
        assert list(response.token_ids) == completion.token_ids
    after = decode.transfer_stats.remote().result()
    assert after["transfers"] - before["transfers"] == len(PROMPTS) and after["failures"] == before["failures"]
    num_blocks = sum(-(-c.num_prompt_tokens // engine.block_size) for c in expected)
    assert after["bytes"] - before["bytes"] == num_blocks * bytes_per_block


def test_streaming_and_32_concurrent_clients(cluster, real_model):
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.sampling_params import SamplingParams

    stub, _ = cluster
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(32)]
    engine = Engine(EngineConfig(num_kv_blocks=512), loaded=real_model)
    expected = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0,
                                                                              ignore_eos=True))]
    results: dict[int, list[int]] = {}
    chunk_counts: dict[int, int] = {}

    def client(index: int) -> None:
        tokens, chunks = [], 0
        for chunk in stub.Generate(greedy(prompts[index], 12), metadata=(("application", "disagg"),), timeout=300):
            tokens.extend(chunk.token_ids)
            chunks += 1
        results[index] = tokens
        chunk_counts[index] = chunks

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [results.get(i) for i in range(32)] == expected
    assert all(count >= 2 for count in chunk_counts.values())  # streamed, not one final message


@pytest.mark.parametrize("request_kwargs,code,needle", [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=-1)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=10**9)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt="hi", sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt="hi", sampling=pb.SamplingParams(temperature=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(token_ids=pb.TokenIds(ids=[1, 99999999])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
    (dict(token_ids=pb.TokenIds(ids=[5] * 9000)), grpc.StatusCode.INVALID_ARGUMENT, "context window"),
    (dict(prompt="hi", model="gpt-17"), grpc.StatusCode.NOT_FOUND, "gpt-17"),
    (dict(prompt="hi", tier="huge"), grpc.StatusCode.NOT_FOUND, "huge"),
    (dict(chat=pb.ChatMessages()), grpc.StatusCode.INVALID_ARGUMENT, "chat.messages"),
    (dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="", content="x")])), grpc.StatusCode.INVALID_ARGUMENT,
     "role"),
])
def test_bad_input_gets_a_clear_status(cluster, request_kwargs, code, needle):
    stub, serve = cluster
    with pytest.raises(grpc.RpcError) as info:
        call(stub, "disagg", pb.GenerateRequest(**request_kwargs))
    assert info.value.code() == code
    assert needle in info.value.details()
    # ...and the replicas are still fine afterwards.
    assert call(stub, "disagg", greedy("Hello", 2)).usage.completion_tokens == 2


def test_tier_routing_by_hint_and_length(cluster):
    stub, serve = cluster
    assert call(stub, "disagg", greedy("Hello", 2, )).tier == "default"
    assert call(stub, "disagg", pb.GenerateRequest(prompt="Hello", tier="long",
                                                   sampling=pb.SamplingParams(max_tokens=2))).tier == "long"
    long_prompt = " ".join(["word"] * 450)
    assert call(stub, "disagg", greedy(long_prompt, 2)).tier == "long"
    # The long tier keeps a quarter of the blocks: value-aware eviction, scored by the prefill tier's
    # observation window, ran right after the import.
    stats = wait_until_no_blocks(serve, "disagg", ["DecodeServer-long", "PrefillServer"])
    assert stats["DecodeServer-long"]["num_evicted_blocks"] >= 20
    assert stats["DecodeServer-long"]["num_used_blocks"] == 0 and stats["PrefillServer"]["num_evicted_blocks"] == 0


def assert_request_freed_everywhere(serve, app: str, deployments: list[str]) -> None:
    stats = wait_until_no_blocks(serve, app, deployments, seconds=15)
    assert all(s["num_used_blocks"] == 0 and s["num_requests"] == 0 for s in stats.values()), stats
    assert handle(serve, app, "Router").stats.remote().result()["in_flight"] == 0


def test_client_cancel_mid_stream_frees_blocks_on_both_tiers(cluster):
    """A gRPC client hangs up 5 tokens into a 2000-token stream: both tiers free the request's blocks at
    once. (Through Serve's proxy unpatched, the request kept decoding to the end: cluster/grpc_proxy.py.)"""
    stub, serve = cluster
    for _ in range(3):
        stream = stub.Generate(greedy("Tell me a very long story about the sea.", 2000),
                               metadata=(("application", "disagg"),))
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 5:
                break
        stream.cancel()
        assert received >= 5
        assert_request_freed_everywhere(serve, "disagg", ["DecodeServer-default", "PrefillServer"])


def test_a_channel_that_cannot_carry_the_bytes_falls_back_to_the_object_store(cluster):
    stub, serve = cluster
    decode = handle(serve, "disagg", "DecodeServer-default")
    expected = list(call(stub, "disagg", greedy("The three primary colors are")).token_ids)
    before = decode.transfer_stats.remote().result()
    # The channel cannot be used for one request.
    handle(serve, "disagg", "PrefillServer").inject_channel_failures.remote(1).result()
    moved = call(stub, "disagg", greedy("The three primary colors are"))
    after = decode.transfer_stats.remote().result()
    assert list(moved.token_ids) == expected
    assert after["object_store_transfers"] == before["object_store_transfers"] + 1
    assert after["failures"] == before["failures"]
    # Later requests move KV over the channel again.
    for _ in range(2):
        call(stub, "disagg", greedy("Water boils at", 4))
    final = decode.transfer_stats.remote().result()
    assert final["transfers"] == after["transfers"] + 2
    assert final["object_store_transfers"] == after["object_store_transfers"]


def test_failed_prefill_recomputes_and_is_counted(cluster):
    stub, serve = cluster
    decode = handle(serve, "disagg", "DecodeServer-default")
    expected = list(call(stub, "disagg", greedy("The first law of motion says")).token_ids)
    before = decode.transfer_stats.remote().result()
    handle(serve, "disagg", "PrefillServer").inject_failures.remote(1).result()
    recomputed = call(stub, "disagg", greedy("The first law of motion says"))
    after = decode.transfer_stats.remote().result()
    assert list(recomputed.token_ids) == expected
    assert after["failures"] == before["failures"] + 1
    stats = wait_until_no_blocks(serve, "disagg", ["DecodeServer-default", "PrefillServer"])
    assert all(s["num_used_blocks"] == 0 for s in stats.values()), stats


def test_tokenize_list_models_health(cluster, real_model):
    stub, _ = cluster
    metadata = (("application", "disagg"),)
    tokens = stub.Tokenize(pb.TokenizeRequest(prompt="Hello world"), metadata=metadata)
    assert list(tokens.token_ids) == real_model.tokenizer.encode("Hello world")
    models = stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
    assert models.models[0].vocab_size == 49152 and list(models.models[0].tiers) == ["default", "long"]
    assert stub.Health(pb.HealthRequest(), metadata=metadata).status == pb.HealthResponse.SERVING


def test_decode_replica_killed_mid_stream_migrates_without_gaps(cluster):
    import ray

    stub, serve = cluster
    request = greedy("The history of the printing press begins", 60)
    expected = list(call(stub, "unified", request).token_ids)
    stream = stub.Generate(request, metadata=(("application", "unified"),), timeout=240)
    tokens = []
    killed = False
    for chunk in stream:
        tokens.extend(chunk.token_ids)
        if not killed and len(tokens) >= 8:
            # Kill every replica of the tier: the Router must wait for Serve to bring one back.
            for actor in ray.util.list_named_actors(all_namespaces=True):
                if "DecodeServer-default" in actor["name"] and actor["name"].startswith("SERVE_REPLICA"):
                    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
            killed = True
    assert killed
    assert tokens == expected  # no duplicate, no missing token
    assert handle(serve, "unified", "Router").stats.remote().result()["migrations"] >= 1


def test_client_deadline_is_reported_and_frees_blocks_on_both_tiers(cluster):
    stub, serve = cluster
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Generate(greedy("Write a long essay about rivers.", 2000),
                                   metadata=(("application", "disagg"),), timeout=3):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert_request_freed_everywhere(serve, "disagg", ["DecodeServer-default", "PrefillServer"])


def test_prometheus_metrics_are_exported(cluster):
    import urllib.request

    stub, _ = cluster
    call(stub, "disagg", greedy("Metrics please", 4))
    call(stub, "disagg", greedy(" ".join(["word"] * 450), 2))  # the long tier evicts
    wanted = ["tierserve_ttft_seconds", "tierserve_kv_blocks_used", "tierserve_kv_transfer_bytes_total",
              "tierserve_router_requests_in_flight", "tierserve_kv_transfer_failures_total",
              "tierserve_kv_blocks_evicted_total", "tierserve_spec_accepted_tokens_total"]
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{CLUSTER_STATE['metrics_port']}/metrics", timeout=5).read().decode()
        except OSError:
            text = ""
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported: {missing}"
    assert 'tier="default"' in text

