"""Registers tierserve's gRPC service on Ray Serve's gRPC proxy, and makes a client hang-up reach the Router.

This module is imported inside Serve's proxy actor (by import path, `cluster.app.GRPC_SERVICER`): keep its imports
light (no torch, no engine); the Router itself is in cluster/grpc_ingress.py.

Ray Serve runs `grpc_servicer_functions` inside its proxy actor with the proxy's own server, which
replaces every method handler by one that forwards to the ingress deployment. For server-streaming
methods that handler is an async generator, and grpc.aio drives it with a bare `async for` that
sends each message in between. When the client cancels (or its deadline passes) while a message is
being *sent*, grpc.aio cancels the RPC task outside the generator: the generator is abandoned at
its `yield`, the request it forwards is never cancelled, and the Router keeps decoding (holding KV
blocks on both tiers) until the generator happens to be garbage-collected (Ray Serve 2.60 behaviour,
measured: a 2000-token request ran to the end after its client hung up).

`add_inference_servicer` wraps the proxy's streaming handler in a coroutine that writes each message
itself. A cancellation now always lands in our frame; if it lands during a write, we resume the
forwarding generator until it waits for the replica's next chunk and cancel it *there*, the one
place where Serve's proxy turns a cancellation into a cancel of the downstream request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

from protos.inference_pb2_grpc import add_InferenceServicer_to_server

logger = logging.getLogger(__name__)

MAX_CANCEL_ATTEMPTS = 64  # each attempt either cancels the pending read or drops one already-produced chunk


def add_inference_servicer(servicer: Any, server: Any) -> None:
    """The `grpc_servicer_functions` entry for Ray Serve (`cluster.app.GRPC_SERVICER`)."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:  # not Serve's proxy server (or a Serve version that works differently)
        add_InferenceServicer_to_server(servicer, server)
        return
    server.service_handler_factory = cancellable_handler_factory(factory)
    try:
        add_InferenceServicer_to_server(servicer, server)
    finally:
        server.service_handler_factory = factory


def cancellable_handler_factory(factory: Callable) -> Callable:
    """Wraps Serve's handler factory: server-streaming handlers become cancellation-safe coroutines."""

    def make_handler(service_method: str, streaming_type: Any) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if getattr(streaming_type, "value", streaming_type) != "unary_stream":
            return handler
        return cancellable_unary_stream(handler)

    return make_handler


def cancellable_unary_stream(handler: Callable[[Any, Any], AsyncIterator[bytes]]) -> Callable:
    async def unary_stream(request: Any, context: Any) -> None:
        stream = handler(request, context)
        try:
            async for message in stream:
                await context.write(message)
        except BaseException:
            # Client gone, deadline passed, server stopping: cancel the forwarded request now.
            await cancel_pending_read(stream)
            raise

    return unary_stream


async def cancel_pending_read(stream: AsyncIterator[Any]) -> None:
    """Resume an abandoned forwarding generator until a cancellation lands in its wait for the next chunk."""
    for _ in range(MAX_CANCEL_ATTEMPTS):
        pending = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # one step: the generator runs down to its await on the replica
        pending.cancel()
        try:
            await pending
        except (asyncio.CancelledError, StopAsyncIteration):
            return
        except Exception as exc:  # the forwarded request failed meanwhile: nothing left to cancel
            logger.debug("stream ended while cancelling: %r", exc)
            return
        # A chunk was ready before the cancel landed: drop it (nobody is listening) and try again.
    logger.warning("could not cancel a forwarded stream after %d attempts", MAX_CANCEL_ATTEMPTS)
