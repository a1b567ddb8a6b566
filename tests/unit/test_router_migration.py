"""A decode replica lost mid-stream: the Router moves the stream to another replica, which replays the tokens the
client has (teacher-forced, one decode step each) and continues; the client sees every token once, exactly as an
undisturbed run. Fake Serve handles around a real engine (one component, no Ray cluster)."""

import asyncio
from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError

from cluster.config import ServeConfig
from cluster.grpc_ingress import Router
from cluster.migration import Replay
from protos import inference_pb2 as pb
from tests.unit.test_engine import make_engine
from workers.async_engine import AsyncEngine
from workers.outputs import RequestOutput


class DyingStream:
    """One decode replica's stream of a request: a real engine's outputs; the replica dies after `die_after`."""

    def __init__(self, engine: AsyncEngine, request, die_after: int | None):
        self.engine, self.request, self.die_after = engine, request, die_after

    async def __aiter__(self):
        count = 0
        stream = self.engine.generate(f"{self.request.request_id}-{id(self)}",
                                      prompt_token_ids=self.request.prompt_token_ids, params=self.request.params)
        async for output in stream:
            yield output
            count += len(output.new_token_ids)
            if self.die_after is not None and count >= self.die_after:
                await stream.aclose()
                raise RayActorError()

    def cancel(self):
        pass


class Replicas:
    """Decode replicas behind one handle: the first dies after `die_after` tokens, the next ones live."""

    def __init__(self, engine: AsyncEngine, die_after: int):
        self.engine, self.die_after, self.requests = engine, die_after, []
        self.generate = SimpleNamespace(remote=self.remote)

    def options(self, **_):
        return self

    def remote(self, request):
        self.requests.append(request)
        return DyingStream(self.engine, request, self.die_after if len(self.requests) == 1 else None)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_k=50, seed=1234)])
def test_a_migrated_stream_continues_exactly_and_sends_each_token_once(tiny_llama_dir, tiny_loaded, sampling):
    config = ServeConfig.model_validate({"model": str(tiny_llama_dir), "mode": "unified"})
    engine = AsyncEngine(make_engine(tiny_loaded))
    try:
        replicas = Replicas(engine, die_after=7)
        router = Router(config, decode_handles=[replicas])
        request = pb.GenerateRequest(prompt="the tea was hot and", sampling=pb.SamplingParams(
            max_tokens=20, ignore_eos=True, **sampling))
        undisturbed = make_engine(tiny_loaded).generate(
            [router.frontend.tokenizer.encode("the tea was hot and")],
            _params(router, request))[0]

        async def run():
            return [chunk async for chunk in router.Generate(request)]

        chunks = asyncio.run(run())
        tokens = [t for chunk in chunks for t in chunk.token_ids]
        assert tokens == undisturbed.token_ids and router.frontend.num_migrations == 1
        assert "".join(chunk.text for chunk in chunks) == undisturbed.text
        # The second replica was asked to replay the 7 tokens the client had, not to re-prefill them.
        replayed = replicas.requests[1]
        assert replayed.params.forced_token_ids == tuple(undisturbed.token_ids[:7])
        assert replayed.prompt_token_ids == replicas.requests[0].prompt_token_ids
        assert chunks[-1].usage.completion_tokens == 20 and router.frontend.in_flight == 0
    finally:
        engine.shutdown()


def _params(router, request):
    from cluster.convert import sampling_from_proto
    from cluster.frontend import sampling_params

    return sampling_params(sampling_from_proto(request.sampling))


def output(token_ids, text, finished=False) -> RequestOutput:
    return RequestOutput("r", token_ids, text, finished, None, 3, 0, len(token_ids))


def test_replay_drops_replayed_tokens_and_sends_text_the_lost_replica_held_back():
    replay = Replay(num_tokens=2, text_sent="Hel")  # the lost replica held back "lo" (e.g. a possible stop string)
    assert replay.strip(output([1], "Hel")) is None
    resumed = replay.strip(output([2], "lo"))  # the last replayed token: the held-back text goes out now
    assert resumed.new_token_ids == [] and resumed.new_text == "lo"
    assert replay.strip(output([3], " world")).new_text == " world"
    finished = Replay(num_tokens=1, text_sent="").strip(output([4], "x", finished=True))
    assert finished.finished and finished.new_token_ids == []  # a finish is never swallowed
    # An output that straddles the end of the replay: only its new token and the unseen text go out.
    straddling = Replay(num_tokens=1, text_sent=" Hello").strip(output([11, 12], " Hello world"))
    assert straddling.new_token_ids == [12] and straddling.new_text == " world"
