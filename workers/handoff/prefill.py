"""PrefillHandoff: the prefill replica's side of the KV handoff.

  check the layout -> prefill the prompt and hold its blocks -> pack the encoded bytes -> release the blocks ->
  send the bytes on the channel to the decode replica (bounded) -> KVTicket
The held blocks go back as soon as their bytes are packed, whatever happens next. If the channel cannot carry
the bytes (it cannot form, it broke, the send timed out) they ride in the ticket instead (Ray's object store):
slower, but the decode replica still skips the prefill. A cancelled call (the decode side gave up) releases what
it holds and skips its transfer if it has not started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from workers.async_engine import AsyncEngine
from workers.dist.kv_sender import KVSender
from workers.handoff.records import CodecMismatchError, KVLayout, KVTicket, PrefillRequest
from workers.kv.transfer import KVTransferError, layout_digest, pack_blocks

logger = logging.getLogger(__name__)


class PrefillHandoff:
    def __init__(self, engine: AsyncEngine, sender: KVSender, replica_id: str, layout: KVLayout, timeout_s: float):
        self.engine, self.sender, self.replica_id, self.layout = engine, sender, replica_id, layout
        self.timeout_s = timeout_s
        self.layout_digest = layout_digest(engine.engine.kv_pages)
        self._injected_channel_failures = 0

    def inject_channel_failures(self, count: int) -> None:
        """Chaos hook: the next `count` sends fail as a broken channel would (the bytes take the ticket)."""
        self._injected_channel_failures = count

    async def run(self, request: PrefillRequest) -> KVTicket:
        started = time.perf_counter()
        if request.layout != self.layout:
            raise CodecMismatchError(
                f"KV layout mismatch: decode tier has {request.layout}, prefill tier has {self.layout}; "
                "configure the same kv_codec and block_size on both tiers")
        held, num_cached_tokens = await self._prefill_and_hold(request)
        try:
            if len(held.block_ids) != request.num_blocks:
                raise KVTransferError(f"decode reserved {request.num_blocks} blocks, prefill holds "
                                      f"{len(held.block_ids)}")
            payload = pack_blocks(self.engine.engine.kv_pages, list(held.block_ids))  # a copy: blocks may go now
        finally:
            self.engine.release_behind(request.request_id)
        ticket_payload = None
        try:
            await self._send(request, payload)
        except KVTransferError as exc:
            logger.warning("KV channel send for %s failed (%s): object-store path", request.request_id, exc)
            ticket_payload = payload
        return KVTicket(request_id=request.request_id, first_token_id=held.first_token_id,
                        num_tokens=held.num_tokens, num_blocks=len(held.block_ids), nbytes=payload.numel(),
                        num_cached_tokens=num_cached_tokens, prefill_replica=self.replica_id,
                        seconds=time.perf_counter() - started, payload=ticket_payload, block_scores=held.block_scores,
                        drafter_features=held.drafter_features)

    async def _prefill_and_hold(self, request: PrefillRequest):
        params = dataclasses.replace(request.params, max_tokens=1)
        stream = self.engine.generate(request.request_id, prompt_token_ids=request.prompt_token_ids, params=params,
                                      hold_kv=True, score_spec=request.score_spec)
        num_cached_tokens = 0
        try:
            try:
                async for output in stream:
                    num_cached_tokens = output.num_cached_tokens
            finally:
                await stream.aclose()
            held = await self.engine.held_kv(request.request_id)
        except asyncio.CancelledError:
            # The decode side gave up: a finished prefill may already hold its blocks, and only this release
            # would ever free them (CancelledError is not an Exception).
            self.engine.release_behind(request.request_id)
            raise
        if held is None:
            raise KVTransferError(f"request {request.request_id!r} ended before its KV could be held")
        return held, num_cached_tokens

    async def _send(self, request: PrefillRequest, payload) -> None:
        if self._injected_channel_failures > 0:
            self._injected_channel_failures -= 1
            raise KVTransferError("injected channel failure")
        future = self.sender.send(request.decode_replica, request.decode_endpoint, request.tag, self.layout_digest,
                                  payload)
        try:
            # shield: a timeout must not cancel a send under way (the channel owns it); cancel() below skips a
            # transfer that has not started when the decode side gave up.
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout=self.timeout_s)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except TimeoutError as exc:
            future.cancel()
            raise KVTransferError(f"KV send to {request.decode_replica} timed out after {self.timeout_s}s") from exc


class LocalPrefillClient:
    """The prefill tier in the same process (tests, single-process tools): each call is an asyncio Task."""

    def __init__(self, handoff: PrefillHandoff):
        self.handoff = handoff

    def prefill(self, request: PrefillRequest) -> asyncio.Task:
        return asyncio.ensure_future(self.handoff.run(request))

