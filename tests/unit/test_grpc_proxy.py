"""The proxy wrapper that makes a client hang-up cancel the forwarded request (cluster/grpc_proxy.py).

The forwarding generator below behaves like Serve's proxy chain in the one way that matters: a
cancellation that lands while it waits for the replica's next chunk cancels the downstream request;
one that lands anywhere else does not. The end-to-end check (real proxy, real client) is in
tests/integration/test_serving.py.
"""

import asyncio

import pytest
from ray.serve._private.proxy_request_response import gRPCStreamingType

from cluster.grpc_proxy import cancel_pending_read, cancellable_handler_factory, cancellable_unary_stream


class Downstream:
    def __init__(self, ready_chunks: int = 0):
        self.chunks: asyncio.Queue = asyncio.Queue()
        for index in range(ready_chunks):
            self.chunks.put_nowait(b"ready-%d" % index)
        self.cancelled = False


async def forwarding(downstream: Downstream):
    while True:
        try:
            chunk = await downstream.chunks.get()
        except asyncio.CancelledError:
            downstream.cancelled = True
            raise
        yield chunk


class HangUpDuringWrite:
    """A servicer context whose client hangs up while the `hang_up_at`-th message is being sent."""

    def __init__(self, hang_up_at: int):
        self.hang_up_at = hang_up_at
        self.written: list[bytes] = []

    async def write(self, message: bytes) -> None:
        if len(self.written) == self.hang_up_at:
            raise asyncio.CancelledError()  # grpc.aio cancels the RPC task mid-send
        self.written.append(message)


def run(coro):
    return asyncio.run(coro)


def test_bare_async_for_abandons_the_forwarded_request():
    """The failure being fixed: grpc.aio's own loop sends outside the generator, so nothing cancels."""

    async def scenario():
        downstream = Downstream(ready_chunks=3)
        context = HangUpDuringWrite(hang_up_at=2)
        with pytest.raises(asyncio.CancelledError):
            async for message in forwarding(downstream):
                await context.write(message)
        return downstream

    assert not run(scenario()).cancelled


@pytest.mark.parametrize("ready_chunks", [3, 10])
def test_hang_up_during_a_write_cancels_the_forwarded_request(ready_chunks):
    async def scenario():
        downstream = Downstream(ready_chunks=ready_chunks)
        context = HangUpDuringWrite(hang_up_at=2)
        handler = cancellable_unary_stream(lambda request, ctx: forwarding(downstream))
        with pytest.raises(asyncio.CancelledError):
            await handler(object(), context)
        return downstream, context

    downstream, context = run(scenario())
    assert downstream.cancelled
    assert context.written == [b"ready-0", b"ready-1"]


def test_cancel_pending_read_on_a_finished_stream_returns():
    async def finished():
        if False:
            yield b""

    async def scenario():
        stream = finished()
        await cancel_pending_read(stream)  # StopAsyncIteration: nothing to cancel, no hang

    run(scenario())


def test_a_client_that_stays_gets_every_message():
    async def scenario():
        downstream = Downstream(ready_chunks=4)
        downstream.chunks.put_nowait(None)

        async def until_none(ds):
            async for chunk in forwarding(ds):
                if chunk is None:
                    return
                yield chunk

        context = HangUpDuringWrite(hang_up_at=-1)
        await cancellable_unary_stream(lambda request, ctx: until_none(downstream))(object(), context)
        return downstream, context

    downstream, context = run(scenario())
    assert context.written == [b"ready-%d" % index for index in range(4)] and not downstream.cancelled


def test_only_server_streaming_handlers_are_wrapped():
    made = {}

    def factory(service_method, streaming_type):
        made[streaming_type] = object()
        return made[streaming_type]

    wrapped = cancellable_handler_factory(factory)
    assert wrapped(service_method="/x", streaming_type=gRPCStreamingType.UNARY_UNARY) is \
        made[gRPCStreamingType.UNARY_UNARY]
    stream_handler = wrapped(service_method="/x", streaming_type=gRPCStreamingType.UNARY_STREAM)
    assert stream_handler is not made[gRPCStreamingType.UNARY_STREAM]
    assert asyncio.iscoroutinefunction(stream_handler)  # grpc.aio then lets it write for itself
