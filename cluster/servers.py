"""PrefillServer and DecodeServer: one AsyncEngine per replica, joined by the KV handoff (workers/handoff/).

A decode replica hosts a KVReceiver (the store prefill replicas meet at, one channel per prefill replica); a
prefill replica has a KVSender (one channel per decode replica it has served). Channels form on first use, carry
every later request and are rebuilt under a new epoch after their peer dies. On scale-down or shutdown Serve
calls __del__: the channels close, so peers drop them at once instead of at their next timeout.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import AsyncIterator

import torch

from cluster.config import ServeConfig, TierConfig
from cluster.ep_coordinator import ServeEPMembership
from cluster.metrics import EngineMetrics
from cluster.records import DecodeRequest
from workers.async_engine import AsyncEngine
from workers.dist.kv_receiver import KVReceiver
from workers.dist.kv_sender import KVSender
from workers.engine import Engine
from workers.handoff.decode import DecodeHandoff, HandoffPolicy
from workers.handoff.prefill import PrefillHandoff
from workers.handoff.records import KVLayout, KVTicket, PrefillRequest
from workers.kv.transfer import KVTransferError, block_nbytes, layout_digest
from workers.outputs import RequestOutput

logger = logging.getLogger(__name__)
CLOSE_JOIN_S = 2.0  # how long shutdown waits for channel threads (a live peer's heartbeat comes within 1 s)


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
    """Shared by both tiers: one engine (AsyncEngine loop thread) per replica."""

    def __init__(self, config: ServeConfig, tier: TierConfig, role: str, ep_coordinator=None):
        engine_config = config.engine_config(tier)
        if engine_config.num_threads is None:
            engine_config = engine_config.model_copy(update={"num_threads": _threads_for(tier)})
        torch.set_num_threads(engine_config.num_threads)
        self.config = config
        self.tier = tier
        self.replica_id = _replica_id()
        # An expert-parallel tier: the engine joins its group now (the constructor returns once it has formed).
        membership = ServeEPMembership(ep_coordinator, self.replica_id) if ep_coordinator is not None else None
        self.engine = AsyncEngine(Engine(engine_config, ep_membership=membership))
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


class PrefillServer(EngineServer):
    def __init__(self, config: ServeConfig):
        super().__init__(config, config.prefill, role="prefill")
        device = self.engine.engine.device
        self.sender = KVSender(self.replica_id, device, timeout_s=config.transfer_timeout_s)
        self.handoff = PrefillHandoff(self.engine, self.sender, self.replica_id, self.layout,
                                      timeout_s=config.transfer_timeout_s)
        self._injected_failures = 0

    async def inject_failures(self, count: int) -> None:
        """Chaos hook (operators and tests): fail the next `count` prefill calls as a dying replica would."""
        self._injected_failures = count

    async def inject_channel_failures(self, count: int) -> None:
        """Chaos hook: the next `count` channel sends fail; their bytes take the object-store path."""
        self.handoff.inject_channel_failures(count)

    async def prefill(self, request: PrefillRequest) -> KVTicket:
        if self._injected_failures > 0:
            self._injected_failures -= 1
            raise KVTransferError(f"injected prefill failure for {request.request_id}")
        return await self.handoff.run(request)

    async def channel_stats(self) -> dict[str, object]:
        return {"peers": self.sender.peers, "channels": [asdict(c) for c in self.sender.channel_stats()]}

    def __del__(self):
        sender = getattr(self, "sender", None)  # __init__ may have failed before it existed
        if sender is not None:
            sender.close(join_timeout_s=CLOSE_JOIN_S)


class _ServePrefillClient:
    """The prefill tier behind a Serve handle: each call a cancellable DeploymentResponse."""

    def __init__(self, handle):
        self.handle = handle

    def prefill(self, request: PrefillRequest):
        return self.handle.prefill.remote(request)


class DecodeServer(EngineServer):
    def __init__(self, config: ServeConfig, tier_name: str, prefill=None, ep_coordinator=None):
        tier = next(t for t in config.decode_tiers if t.name == tier_name)
        super().__init__(config, tier, role="unified" if config.mode == "unified" else "decode",
                         ep_coordinator=ep_coordinator)
        self.handoff = self.receiver = None
        if prefill is not None:
            engine = self.engine.engine
            pages = engine.kv_pages
            self.receiver = KVReceiver(_node_ip(), layout_digest(pages), engine.device,
                                       timeout_s=config.transfer_timeout_s,
                                       max_payload_bytes=engine.pool.num_blocks * block_nbytes(pages))
            self.handoff = DecodeHandoff(
                self.engine, self.receiver, _ServePrefillClient(prefill), self.replica_id, self.layout,
                HandoffPolicy(config.transfer_timeout_s, config.transfer_failure_policy), observer=self.metrics)

    async def generate(self, request: DecodeRequest) -> AsyncIterator[RequestOutput]:
        engine = self.engine
        seq = engine.engine.make_sequence(request.request_id, prompt_token_ids=request.prompt_token_ids,
                                          params=request.params)  # InvalidRequestError before any work
        stream = await self.handoff.run(seq) if self.handoff is not None else None
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

    async def expert_parallel_stats(self) -> dict[str, object] | None:
        """This replica's part of its expert-parallel group (None when the tier is not expert-parallel)."""
        ep = self.engine.engine.expert_parallel
        if ep is None:
            return None
        stats = asdict(ep.stats)
        stats["replica_id"] = self.replica_id
        stats["bytes_per_token"] = ep.stats.bytes_per_token
        stats["held_experts"] = [len(held) for held in ep.held]
        return stats

    async def transfer_stats(self) -> dict[str, int]:
        if self.handoff is None:
            return {"transfers": 0, "failures": 0, "object_store_transfers": 0, "bytes": 0}
        return asdict(self.handoff.stats)

    async def channel_stats(self) -> dict[str, object]:
        if self.receiver is None:
            return {"peers": [], "channels": [], "pending": 0}
        channels = self.receiver.channel_stats()
        return {"peers": sorted(c.sender_id for c in channels), "channels": [asdict(c) for c in channels],
                "pending": self.receiver.num_pending}

    def __del__(self):
        receiver = getattr(self, "receiver", None)
        if receiver is not None:
            receiver.close(join_timeout_s=CLOSE_JOIN_S)
