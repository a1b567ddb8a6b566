"""An expert-parallel decode tier on a real local Ray over real gRPC: two replicas hold half the experts each,
greedy output equals one process's, and a replica killed mid-stream costs no token (the stream migrates or its
replica regroups) and the group grows back to two when Serve replaces it."""

import time

import grpc
import pytest

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.checkpoints import make_tiny_hf_checkpoint
from tests.integration.local_serve import local_serve

pytestmark = pytest.mark.slow

APP = "ep"
DEPLOYMENT = "DecodeServer-default"


def greedy(prompt: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                         ignore_eos=True))


def in_process(model: str, prompt: str, max_tokens: int) -> list[int]:
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.sampling_params import SamplingParams

    engine = Engine(EngineConfig(model=model, num_threads=1, freeze_gc_heap=False))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([prompt], params)[0].token_ids


def group_views(deadline_s: float = 90.0, want_epoch_above: int = -1) -> dict[str, dict]:
    """Each live replica's expert-parallel stats, once both report one formed group of two past want_epoch_above."""
    from cluster.tools.replicas import call_each_replica

    deadline = time.monotonic() + deadline_s
    while True:
        views = {rid: v for rid, v in call_each_replica(APP, DEPLOYMENT, "expert_parallel_stats", timeout_s=5).items()
                 if isinstance(v, dict)}
        epochs = {v["epoch"] for v in views.values()}
        if len(views) == 2 and len(epochs) == 1 and min(epochs) > want_epoch_above and \
                all(v["world_size"] == 2 for v in views.values()):
            return views
        if time.monotonic() > deadline:
            raise AssertionError(f"the group did not form with 2 replicas: {views}")
        time.sleep(0.5)


def test_expert_parallel_tier_serves_survives_a_kill_and_regroups(tmp_path):
    from cluster.config import ServeConfig
    from cluster.tools.replicas import call_each_replica, kill_replicas

    model = str(make_tiny_hf_checkpoint(tmp_path / "moe", "qwen3_moe"))
    config = ServeConfig.model_validate({
        "model": model, "mode": "unified",
        "engine": {"num_kv_blocks": 128, "max_num_seqs": 16, "expert_parallel": {"regroup_grace_s": 3.0}},
        "decode_tiers": [{"name": "default", "num_replicas": 2, "expert_parallel": 2, "num_cpus": 0.25,
                          "graceful_shutdown_timeout_s": 0.5}]})
    prompts = ["ab cd ef", "hello world, hello", "the quick brown fox", "zzz yyy xxx www"]
    expected = {prompt: in_process(model, prompt, 24) for prompt in prompts}
    long_prompt, long_tokens = "once upon a time", 400
    expected_long = in_process(model, long_prompt, long_tokens)
    with local_serve(APP, config) as port:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.InferenceStub(channel)
        metadata = (("application", APP),)
        first = group_views()
        assert sorted(v["rank"] for v in first.values()) == [0, 1]
        assert all(v["held_experts"] == [4, 4] for v in first.values())  # 8 experts per layer, half each

        for prompt in prompts:  # several requests: both replicas serve some, every step crosses the group
            assert list(stub.Complete(greedy(prompt, 24), metadata=metadata, timeout=60).token_ids) == \
                expected[prompt]
        views = group_views()
        assert all(v["all_to_all_bytes"] > 0 for v in views.values())

        # Kill one replica mid-stream: the stream finishes with exactly the undisturbed tokens.
        tokens: list[int] = []
        killed = []
        for chunk in stub.Generate(greedy(long_prompt, long_tokens), metadata=metadata, timeout=180):
            tokens.extend(chunk.token_ids)
            if not killed and len(tokens) >= 8:
                killed = kill_replicas(APP, DEPLOYMENT, count=1)
        assert killed and tokens == expected_long

        # Serve replaces the replica; the group grows back to two in a later epoch, with the experts split again.
        regrouped = group_views(want_epoch_above=first[next(iter(first))]["epoch"])
        assert killed[0] not in regrouped
        assert all(v["held_experts"] == [4, 4] for v in regrouped.values())
        assert any(v["regroups"] >= 1 for v in regrouped.values())
        assert list(stub.Complete(greedy(prompts[0], 24), metadata=metadata, timeout=60).token_ids) == \
            expected[prompts[0]]
        # nothing left in use anywhere
        deadline = time.monotonic() + 20
        while True:
            stats = call_each_replica(APP, DEPLOYMENT, "kv_stats", timeout_s=5)
            if all(isinstance(s, dict) and s["num_used_blocks"] == 0 and s["num_requests"] == 0
                   for s in stats.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert all(s["num_used_blocks"] == 0 and s["num_requests"] == 0 for s in stats.values()), stats
        channel.close()
