"""DecodeHandoff: the decode replica's side of the KV handoff, the one protocol every caller uses.

  1. reserve blocks for the prompt (none free: return None, the caller prefills locally);
  2. expect the bytes on this replica's KV receiver under a fresh tag, then ask the prefill tier (any replica)
     to prefill and push them there; they land straight in the reserved pages;
  3. commit: the sequence joins the running batch with the prefill's first token.
Every wait is bounded (the prefill call by 3x the transfer timeout, the bytes by the timeout after its ticket)
and cancellable. On any failure the reservation goes back, then policy `recompute` returns None (prefill
locally) and `fail` raises TransferFailedError; a client gone mid-handoff (CancelledError) gives it back too.
Blocks a channel may be writing into go back only once that write is done (a memory copy): blocks freed under
a late write could already hold another request's KV.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Literal, Protocol

from workers.async_engine import AsyncEngine
from workers.dist.kv_receiver import KVReceiver, PendingReceive
from workers.handoff.records import CodecMismatchError, KVLayout, KVTicket, PrefillRequest, TransferFailedError
from workers.kv.transfer import block_nbytes, unpack_blocks
from workers.outputs import RequestOutput
from workers.sequence import Sequence

logger = logging.getLogger(__name__)


class PrefillCall(Protocol):
    """An in-flight prefill: awaitable for its ticket, cancellable (a Ray DeploymentResponse, an asyncio Task)."""

    def __await__(self): ...

    def cancel(self) -> Any: ...


class PrefillClient(Protocol):
    def prefill(self, request: PrefillRequest) -> PrefillCall: ...


class TransferObserver(Protocol):
    def record_transfer(self, nbytes: int, seconds: float) -> None: ...

    def record_transfer_failure(self) -> None: ...


@dataclass(frozen=True)
class HandoffPolicy:
    timeout_s: float  # bound on the bytes' arrival; the prefill call gets 3x (it queues and computes first)
    on_failure: Literal["recompute", "fail"] = "recompute"


@dataclass
class HandoffStats:
    transfers: int = 0  # handoffs that committed imported KV
    failures: int = 0  # handoffs that gave up (then recompute or fail)
    object_store_transfers: int = 0  # bytes that came in the ticket because the channel could not carry them
    bytes: int = 0


class DecodeHandoff:
    def __init__(self, engine: AsyncEngine, receiver: KVReceiver, prefill: PrefillClient, replica_id: str,
                 layout: KVLayout, policy: HandoffPolicy, observer: TransferObserver | None = None):
        self.engine, self.receiver, self.prefill = engine, receiver, prefill
        self.replica_id, self.layout, self.policy, self.observer = replica_id, layout, policy, observer
        self.stats = HandoffStats()
        self._block_nbytes = block_nbytes(engine.engine.kv_pages)
        self._tags = itertools.count(1)

    async def run(self, seq: Sequence) -> AsyncIterator[RequestOutput] | None:
        """Import `seq`'s prompt KV from the prefill tier; returns its output stream, or None: prefill locally."""
        try:
            block_ids = await self.engine.reserve_import(seq)
        except asyncio.CancelledError:
            self.engine.release_behind(seq.request_id, seq)  # the queued reservation still runs on the loop thread
            raise
        if block_ids is None:
            return None  # the pool is short right now: the scheduler will queue a local prefill
        started = time.perf_counter()
        pending = self.receiver.expect(next(self._tags), len(block_ids) * self._block_nbytes,
                                       partial(self._write, block_ids=block_ids))
        call = self.prefill.prefill(PrefillRequest(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, params=seq.params,
            decode_endpoint=self.receiver.endpoint, decode_replica=self.replica_id, layout=self.layout,
            num_blocks=len(block_ids), tag=pending.tag, score_spec=self.engine.score_spec))
        try:
            ticket: KVTicket = await asyncio.wait_for(_await(call), timeout=self.policy.timeout_s * 3)
            nbytes = await self._bytes_of(ticket, pending, block_ids)
        except asyncio.CancelledError:
            # The client left (deadline, disconnect). CancelledError is not an Exception: without this the
            # reservation was never committed nor released (a leaked block per cancelled request).
            call.cancel()
            self._give_back(seq, pending)
            raise
        except Exception as exc:  # prefill died or refused, bytes late or refused, codecs differ
            call.cancel()
            self._give_back(seq, pending)
            if isinstance(exc, CodecMismatchError):
                raise
            self.stats.failures += 1
            if self.observer is not None:
                self.observer.record_transfer_failure()
            logger.warning("KV handoff for %s failed (%r); policy=%s", seq.request_id, exc, self.policy.on_failure)
            if self.policy.on_failure == "fail":
                raise TransferFailedError(f"KV transfer failed for request {seq.request_id}: {exc}") from exc
            return None
        self.stats.transfers += 1
        self.stats.bytes += nbytes
        if self.observer is not None:
            self.observer.record_transfer(nbytes, time.perf_counter() - started)
        seq.num_cached_tokens = ticket.num_cached_tokens  # the prefix hit happened on the prefill tier
        return self.engine.stream_imported(seq.request_id, ticket.first_token_id, ticket.block_scores,
                                           ticket.drafter_features)

    def _write(self, buffer, block_ids: list[int]) -> None:
        """On a channel thread, once the bytes are here: scatter them into the reserved blocks."""
        unpack_blocks(buffer, self.engine.engine.kv_pages, block_ids)

    async def _bytes_of(self, ticket: KVTicket, pending: PendingReceive, block_ids: list[int]) -> int:
        """Wait (bounded) until the prompt's bytes are in the reserved blocks; returns their count."""
        if ticket.payload is None:
            # shield: a timeout here must not cancel the channel's future (it resolves after a write under way).
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pending.done)),
                                          timeout=self.policy.timeout_s)
        # The channel could not carry them: the bytes came in the ticket (Ray's object store).
        if not self.receiver.cancel(pending):
            await asyncio.shield(asyncio.wrap_future(pending.done))  # the channel delivered after all
        else:
            unpack_blocks(ticket.payload, self.engine.engine.kv_pages, block_ids)  # a local copy, milliseconds
        self.stats.object_store_transfers += 1
        return ticket.nbytes

    def _give_back(self, seq: Sequence, pending: PendingReceive) -> None:
        """Release the reservation now, or, if a channel is writing into it, once that write is done; the id is
        free at once either way (a local prefill reuses it)."""
        if self.receiver.cancel(pending) or pending.done.done():
            self.engine.release_behind(seq.request_id, seq)
            return
        self.engine.detach_behind(seq.request_id, seq)
        # free_behind runs after the detach above: one ordered queue.
        pending.done.add_done_callback(lambda _: self.engine.free_behind(seq))


async def _await(call: Awaitable) -> Any:
    return await call
