"""PrefillServer and DecodeServer: an AsyncEngine per replica, plus the KV handoff between them.

Handoff (disaggregated mode), driven by the decode replica:
  1. reserve blocks for the prompt (else: the pool is short, so compute the prefill locally);
  2. ask the prefill tier (any replica) to prefill and push the encoded blocks to this replica's
     KVTransport endpoint; the prefill replica announces itself in our store, both sides meet in the
     pair's cached gloo/NCCL group, and the bytes land straight in the reserved pages;
  3. commit: the sequence joins the running batch with the prefill's first token.
On any failure or timeout the reservation is released; policy `recompute` prefills locally, `fail`
raises TransferFailedError. The prefill replica always releases its held blocks (after send or error).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator

import torch

from cluster.config import ServeConfig, TierConfig
from cluster.metrics import EngineMetrics
from cluster.records import (CodecMismatchError, DecodeRequest, KVLayout, KVTicket, PrefillRequest,
                             TransferFailedError)
from workers.async_engine import AsyncEngine
from workers.engine import Engine
from workers.kv.transfer import KVTransferError, KVTransport, block_nbytes, pack_blocks, unpack_blocks
from workers.outputs import RequestOutput
from workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def _replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _threads_for(tier: TierConfig) -> int:
    # Replicas share the machine: each uses as many torch threads as CPUs it reserved (at least 1).
    return max(1, int(tier.num_cpus))


class EngineServer:
    """Shared by both tiers: one engine (AsyncEngine loop thread) and one KV transport per replica."""

    def __init__(self, config: ServeConfig, tier: TierConfig, with_transport: bool):
        engine_config = config.engine_config(tier)
        if engine_config.num_threads is None:
            engine_config = engine_config.model_copy(update={"num_threads": _threads_for(tier)})
        torch.set_num_threads(engine_config.num_threads)
        self.config = config
        self.tier = tier
        self.engine = AsyncEngine(Engine(engine_config))
        self.replica_id = _replica_id()
        self.transport = KVTransport(host=_node_ip(), timeout_s=config.transfer_timeout_s) if with_transport else None
        role = "prefill" if tier is config.prefill else ("unified" if config.mode == "unified" else "decode")
        self.metrics = EngineMetrics(tier.name, role, self.engine.engine)
        pages = self.engine.engine.kv_pages
        self.layout = KVLayout(codec=self.engine.engine.codec.name, block_size=self.engine.engine.block_size,
                               block_nbytes=block_nbytes(pages), num_layers=len(pages))

    async def kv_stats(self) -> dict[str, int]:
        engine = self.engine.engine
        stats = engine.kv_stats()
        return {"num_blocks": stats.num_blocks, "num_used_blocks": stats.num_used_blocks,
                "num_requests": engine.num_requests, "num_evicted_blocks": stats.num_evicted_blocks}

    def check_health(self) -> None:
        if not self.engine.is_alive:
            raise RuntimeError("engine loop is not running")

    def _release_behind(self, request_id: str, owner=None) -> None:
        """Queue the release of a request's held or reserved blocks without waiting (our task may be being
        cancelled). It is queued now, so it runs after a hold or reservation still queued; releasing an unknown id
        does nothing, and with `owner` (the Sequence) only that sequence's blocks are freed, never those of another
        request that took the same id."""
        self.engine.post(lambda engine: engine.release_kv(request_id, owner))

    def _release_after(self, writers: list[asyncio.Future], request_id: str, owner) -> None:
        """Give the reservation back, its blocks only once every thread that may write into them has returned:
        cancel() cannot stop a thread, and blocks freed under a late write could already belong to another
        request. The id is free at once (a local prefill reuses it). Each writer is bounded by the transfer
        timeout."""
        pending = [writer for writer in writers if not writer.done()]
        if not pending:
            self._release_behind(request_id, owner)
            return
        self.engine.post(lambda engine: engine.detach_kv(request_id, owner))
        finished = asyncio.gather(*pending, return_exceptions=True)
        # kv.free of a sequence the id no longer names: the posted detach above ran first (one ordered queue).
        finished.add_done_callback(lambda _: self.engine.post(lambda engine: engine.kv.free(owner)))


class PrefillServer(EngineServer):
    def __init__(self, config: ServeConfig):
        super().__init__(config, config.prefill, with_transport=True)
        # A pair's group is cached on both sides; after a failure this side moves to a new epoch, so
        # both sides build a fresh group under a fresh store prefix (never a half-broken old one).
        self._epochs: dict[str, int] = {}
        self._injected_failures = 0

    async def inject_failures(self, count: int) -> None:
        """Chaos hook (operators and tests): fail the next `count` prefill calls as a dying replica would."""
        self._injected_failures = count

    async def prefill(self, request: PrefillRequest) -> KVTicket:
        started = time.perf_counter()
        if request.layout != self.layout:
            raise CodecMismatchError(
                f"KV layout mismatch: decode tier has {request.layout}, prefill tier has {self.layout}; "
                "configure the same kv_codec and block_size on both tiers")
        if self._injected_failures > 0:
            self._injected_failures -= 1
            raise KVTransferError(f"injected prefill failure for {request.request_id}")
        params = SamplingParams(**{**request.params.__dict__, "max_tokens": 1})
        first = None
        stream = self.engine.generate(request.request_id, prompt_token_ids=request.prompt_token_ids, params=params,
                                      hold_kv=True, score_spec=request.score_spec)
        try:
            try:
                async for output in stream:
                    first = output
            finally:
                await stream.aclose()
            held = await self.engine.call(lambda engine: engine.held_kv(request.request_id))
        except asyncio.CancelledError:
            # The decode side gave up (its client left): a finished prefill may already hold its blocks, and only
            # the release below would ever free them (CancelledError is not an Exception).
            self._release_behind(request.request_id)
            raise
        if held is None:
            raise KVTransferError(f"request {request.request_id!r} ended before its KV could be held")
        try:
            if len(held.block_ids) != request.num_blocks:
                raise KVTransferError(f"decode reserved {request.num_blocks} blocks, prefill holds "
                                      f"{len(held.block_ids)}")
            payload = None
            try:
                nbytes = await asyncio.to_thread(self._send, request, list(held.block_ids))
            except KVTransferError as exc:
                # No group could be formed (or it broke): hand the encoded blocks over through Ray's
                # object store instead. Slower, but the decode replica still skips the prefill.
                logger.warning("KV group send for %s failed (%r): object-store path", request.request_id, exc)
                payload = pack_blocks(self.engine.engine.kv_pages, list(held.block_ids))
                nbytes = payload.numel()
        finally:
            await self.engine.call(lambda engine: engine.release_kv(request.request_id))
        return KVTicket(request_id=request.request_id, first_token_id=held.first_token_id,
                        num_tokens=held.num_tokens, num_blocks=len(held.block_ids), nbytes=nbytes,
                        num_cached_tokens=first.num_cached_tokens if first else 0, prefill_replica=self.replica_id,
                        seconds=time.perf_counter() - started, payload=payload, block_scores=held.block_scores)

    def _send(self, request: PrefillRequest, block_ids: list[int]) -> int:
        epoch = self._epochs.setdefault(request.decode_replica, 0)
        sender = f"{self.replica_id}#{epoch}"
        pair_id = f"{request.decode_replica}<-{sender}"
        self.transport.announce(request.decode_endpoint, f"kv/{request.request_id}", sender)
        try:
            group = self.transport.join_group(request.decode_endpoint, pair_id)
            return self.transport.send(group, self.engine.engine.kv_pages, block_ids, request.tag)
        except KVTransferError:
            self.transport.forget_pair(pair_id)
            self._epochs[request.decode_replica] = epoch + 1
            raise


class DecodeServer(EngineServer):
    def __init__(self, config: ServeConfig, tier_name: str, prefill=None):
        tier = next(t for t in config.decode_tiers if t.name == tier_name)
        super().__init__(config, tier, with_transport=prefill is not None)
        self.prefill = prefill
        self._tags = itertools.count(1)
        self.num_transfers = 0
        self.num_transfer_failures = 0
        self.num_object_store_transfers = 0
        self.transfer_bytes = 0
        self._injected_transfer_failures = 0

    async def inject_transfer_failures(self, count: int) -> None:
        """Chaos hook (operators and tests): fail the next `count` KV receives as a dead peer would."""
        self._injected_transfer_failures = count

    async def generate(self, request: DecodeRequest) -> AsyncIterator[RequestOutput]:
        engine = self.engine
        seq = engine.engine.make_sequence(request.request_id, prompt_token_ids=request.prompt_token_ids,
                                          params=request.params)  # InvalidRequestError before any work
        stream = None
        if self.prefill is not None:
            stream = await self._handoff(seq, request)
        if stream is None:
            stream = engine.generate(request.request_id, prompt_token_ids=request.prompt_token_ids,
                                     params=request.params)
        try:
            async for output in stream:
                yield output
        finally:
            # Cancelled at our `yield` (client gone, deadline): the inner stream is suspended at its
            # own yield and would only abort when garbage-collected. Close it now: blocks return now.
            await stream.aclose()

    async def transfer_stats(self) -> dict[str, int]:
        return {"transfers": self.num_transfers, "failures": self.num_transfer_failures,
                "object_store_transfers": self.num_object_store_transfers, "bytes": self.transfer_bytes}

    async def _handoff(self, seq, request: DecodeRequest):
        """Import the prompt's KV from the prefill tier; None means: prefill locally (recompute)."""
        request_id = request.request_id
        try:
            block_ids = await self.engine.call(lambda engine: engine.reserve_import(seq))
        except asyncio.CancelledError:
            self._release_behind(request_id, seq)  # the queued reservation still runs on the loop thread
            raise
        if block_ids is None:
            return None  # our pool is short right now: the scheduler will queue a local prefill
        tag = next(self._tags)
        started = time.perf_counter()
        # Threads that may write into the reserved blocks: waited on through shield(), never cancelled (a thread
        # cannot be), so that the blocks go back only when they are done.
        receive = asyncio.ensure_future(asyncio.to_thread(self._receive, request_id, block_ids, tag))
        receive.add_done_callback(_consume_exception)
        writers = [receive]
        prefill_response = self.prefill.prefill.remote(PrefillRequest(
            request_id=request_id, prompt_token_ids=request.prompt_token_ids, params=request.params,
            decode_endpoint=self.transport.endpoint, decode_replica=self.replica_id, layout=self.layout,
            num_blocks=len(block_ids), tag=tag, score_spec=seq.score_spec))
        try:
            ticket: KVTicket = await asyncio.wait_for(_await(prefill_response),
                                                      timeout=self.config.transfer_timeout_s * 3)
            if ticket.payload is not None:
                # The group path gave up (the receive thread ends at its own timeout); unpack the object instead.
                unpack = asyncio.ensure_future(
                    asyncio.to_thread(unpack_blocks, ticket.payload, self.engine.engine.kv_pages, block_ids))
                writers.append(unpack)
                await asyncio.shield(unpack)
                nbytes = ticket.nbytes
                self.num_object_store_transfers += 1
            else:
                nbytes = await asyncio.wait_for(asyncio.shield(receive), timeout=self.config.transfer_timeout_s)
        except asyncio.CancelledError:
            # The client left mid-handoff (deadline, disconnect). CancelledError is not an Exception: without this
            # the reservation was never committed nor released (a leaked block per cancelled request).
            prefill_response.cancel()
            self._release_after(writers, request_id, seq)
            raise
        except Exception as exc:  # prefill died or refused, transfer failed or timed out, codecs differ
            prefill_response.cancel()
            self._release_after(writers, request_id, seq)
            if isinstance(exc, CodecMismatchError):
                raise
            self.num_transfer_failures += 1
            self.metrics.record_transfer_failure()
            logger.warning("KV handoff for %s failed (%r); policy=%s", request_id, exc,
                           self.config.transfer_failure_policy)
            if self.config.transfer_failure_policy == "fail":
                raise TransferFailedError(f"KV transfer failed for request {request_id}: {exc}") from exc
            return None
        self.num_transfers += 1
        self.transfer_bytes += nbytes
        self.metrics.record_transfer(nbytes, time.perf_counter() - started)
        seq.num_cached_tokens = ticket.num_cached_tokens  # the prefix hit happened on the prefill tier
        return self.engine.stream_imported(request_id, ticket.first_token_id, ticket.block_scores)

    def _receive(self, request_id: str, block_ids: list[int], tag: int) -> int:
        sender = self.transport.await_announcement(f"kv/{request_id}")  # "<prefill replica>#<epoch>"
        if self._injected_transfer_failures > 0:
            self._injected_transfer_failures -= 1
            raise KVTransferError(f"injected transfer failure for {request_id}")
        pair_id = f"{self.replica_id}<-{sender}"
        try:
            group = self.transport.serve_group(pair_id)
            return self.transport.recv(group, self.engine.engine.kv_pages, block_ids, tag)
        except KVTransferError:
            self.transport.forget_pair(pair_id)
            raise


async def _await(response):
    return await response


def _consume_exception(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
