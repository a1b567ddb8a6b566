"""DecodeServer/PrefillServer handoff rules with fakes at the Ray boundary (one component each):
the `fail` policy, the codec handshake, and that every failure path gives the reservation back."""

import asyncio
import contextlib
import itertools
from types import SimpleNamespace

import pytest

from cluster.config import ServeConfig
from cluster.records import CodecMismatchError, DecodeRequest, KVLayout, PrefillRequest, TransferFailedError
from cluster.servers import DecodeServer, PrefillServer
from tests.unit.test_engine import make_engine
from workers.async_engine import AsyncEngine
from workers.kv.transfer import KVTransferError, PeerEndpoint
from workers.sampling_params import SamplingParams

LAYOUT = KVLayout(codec="float32", block_size=4, block_nbytes=1024, num_layers=2)


class FailingResponse:
    """Stands in for a DeploymentResponse whose call raised on the prefill replica."""

    def __init__(self, error: Exception):
        self.error, self.cancelled = error, False

    def __await__(self):
        async def fail():
            raise self.error
        return fail().__await__()

    def cancel(self):
        self.cancelled = True


class HangingResponse:
    """A prefill call that never answers (a busy or stuck prefill tier)."""

    def __init__(self):
        self.cancelled = False

    def __await__(self):
        return asyncio.Event().wait().__await__()

    def cancel(self):
        self.cancelled = True


class NullMetrics:
    def record_transfer(self, *args):
        pass

    def record_transfer_failure(self):
        pass


@contextlib.contextmanager
def decode_server(tiny_loaded, policy: str, error: Exception | None, response=None):
    """A DecodeServer whose prefill tier fails with `error` (or answers with `response`); its engine loop is shut
    down on exit."""
    server = DecodeServer.__new__(DecodeServer)  # skip __init__: no Serve replica context here
    server.config = ServeConfig.model_validate({"transfer_failure_policy": policy, "transfer_timeout_s": 1})
    server.engine = AsyncEngine(make_engine(tiny_loaded))
    server.replica_id, server.layout, server.metrics = "decode-0", LAYOUT, NullMetrics()
    server.transport = SimpleNamespace(endpoint=PeerEndpoint("127.0.0.1", 1))
    server._tags = itertools.count(1)
    server.num_transfers = server.num_transfer_failures = server.num_object_store_transfers = 0
    server.transfer_bytes = server._injected_transfer_failures = 0
    server._receive = lambda *args: (_ for _ in ()).throw(KVTransferError("no announcement"))
    response = response or FailingResponse(error)
    server.prefill = SimpleNamespace(prefill=SimpleNamespace(remote=lambda request: response))
    server.response = response
    try:
        yield server
    finally:
        server.engine.shutdown()


async def until(condition, seconds: float = 5.0) -> None:
    """Poll `condition` (state the engine's loop thread changes) until it holds or `seconds` pass."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)


async def cancel_and_wait_for_release(task: asyncio.Future, pool) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: pool.num_used_blocks == 0)  # the release runs on the engine's loop thread


async def consume(server, request) -> list[int]:
    return [t async for out in server.generate(request) for t in out.new_token_ids]


REQUEST = DecodeRequest("r1", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))


def test_fail_policy_raises_a_clear_error_and_frees_the_reservation(tiny_loaded):
    with decode_server(tiny_loaded, "fail", KVTransferError("prefill replica gone")) as server:
        with pytest.raises(TransferFailedError, match="KV transfer failed for request r1"):
            asyncio.run(consume(server, REQUEST))
        assert server.response.cancelled and server.num_transfer_failures == 1
        assert server.engine.engine.pool.num_used_blocks == 0


def test_recompute_policy_prefills_locally(tiny_loaded):
    with decode_server(tiny_loaded, "recompute", KVTransferError("prefill replica gone")) as server:
        tokens = asyncio.run(consume(server, REQUEST))
        expected = make_engine(tiny_loaded).generate([REQUEST.prompt_token_ids], REQUEST.params)[0].token_ids
        assert tokens == expected and server.num_transfer_failures == 1
        assert server.engine.engine.pool.num_used_blocks == 0


def test_codec_mismatch_is_refused_before_any_work(tiny_loaded):
    # Decode side: the mismatch propagates (no silent recompute) and the reservation is released.
    with decode_server(tiny_loaded, "recompute", CodecMismatchError("KV layout mismatch")) as server:
        with pytest.raises(CodecMismatchError):
            asyncio.run(consume(server, REQUEST))
        assert server.engine.engine.pool.num_used_blocks == 0 and server.num_transfer_failures == 0
    # Prefill side: checks the layout first, so nothing is computed or held.
    prefill = PrefillServer.__new__(PrefillServer)
    prefill.layout, prefill._injected_failures = LAYOUT, 0
    prefill.engine = AsyncEngine(make_engine(tiny_loaded))
    try:
        other = KVLayout(codec="tq-k4v3", block_size=16, block_nbytes=99, num_layers=2)
        request = PrefillRequest("p1", [5, 6, 7], REQUEST.params, PeerEndpoint("127.0.0.1", 1), "decode-0", other,
                                 num_blocks=1, tag=1)
        with pytest.raises(CodecMismatchError, match="same kv_codec and block_size"):
            asyncio.run(prefill.prefill(request))
        assert prefill.engine.engine.pool.num_used_blocks == 0
    finally:
        prefill.engine.shutdown()


def test_a_client_gone_mid_handoff_gives_the_reservation_back(tiny_loaded):
    """Cancelled while waiting for the prefill tier (client deadline or disconnect): asyncio's CancelledError is not
    an Exception, and nothing else would ever commit or release the reserved blocks."""
    with decode_server(tiny_loaded, "recompute", None, response=HangingResponse()) as server:
        pool = server.engine.engine.pool

        async def cancel_mid_handoff():
            task = asyncio.ensure_future(consume(server, REQUEST))
            await until(lambda: pool.num_used_blocks > 0)
            assert pool.num_used_blocks > 0  # reserved, waiting on the prefill tier
            await cancel_and_wait_for_release(task, pool)

        asyncio.run(cancel_mid_handoff())
        assert server.response.cancelled and pool.num_used_blocks == 0


class HangAfterFirstCall:
    """The replica's AsyncEngine, except that the first call() (held_kv, once the prefill is done) returns only
    when the task is cancelled: the prefill tier's window between holding the KV and sending it."""

    def __init__(self, engine: AsyncEngine):
        self.inner, self.calls = engine, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def call(self, fn):
        result = await self.inner.call(fn)
        self.calls += 1
        if self.calls == 1:
            await asyncio.Event().wait()
        return result


def test_a_prefill_cancelled_while_holding_its_kv_releases_it(tiny_loaded):
    prefill = PrefillServer.__new__(PrefillServer)
    prefill.layout, prefill._injected_failures = LAYOUT, 0
    engine = AsyncEngine(make_engine(tiny_loaded))
    prefill.engine = HangAfterFirstCall(engine)
    pool = engine.engine.pool
    request = PrefillRequest("p2", [5, 6, 7, 8, 9], REQUEST.params, PeerEndpoint("127.0.0.1", 1), "decode-0", LAYOUT,
                             num_blocks=2, tag=1)

    async def cancel_while_held():
        task = asyncio.ensure_future(prefill.prefill(request))
        await until(lambda: prefill.engine.calls > 0)
        assert prefill.engine.calls == 1 and pool.num_used_blocks > 0  # prefilled and held
        await cancel_and_wait_for_release(task, pool)

    try:
        asyncio.run(cancel_while_held())
        assert pool.num_used_blocks == 0
    finally:
        engine.shutdown()


def test_reserved_blocks_wait_for_a_receive_thread_still_running(tiny_loaded):
    """cancel() cannot stop the receive thread: the blocks it may still write into go back only once it returns,
    never to another request first; the request id is free at once."""
    import threading
    import time

    release_receive = threading.Event()

    def slow_receive(*args):
        release_receive.wait(5)
        raise KVTransferError("no announcement")

    with decode_server(tiny_loaded, "recompute", None, response=HangingResponse()) as server:
        server._receive = slow_receive
        pool, engine = server.engine.engine.pool, server.engine.engine

        async def cancel_while_receiving():
            task = asyncio.ensure_future(consume(server, REQUEST))
            await until(lambda: pool.num_used_blocks > 0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: REQUEST.request_id not in engine._importing)
            time.sleep(0.2)  # the loop thread has had every chance to free them: it must not
            assert pool.num_used_blocks > 0 and REQUEST.request_id not in engine._importing
            release_receive.set()
            await until(lambda: pool.num_used_blocks == 0)

        asyncio.run(cancel_while_receiving())
        assert pool.num_used_blocks == 0
