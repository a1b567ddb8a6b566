"""The expert-parallel decode tier's roster as a one-replica Serve deployment, and the members' client for it.

`EPCoordinator` hosts the TCPStore every epoch's group meets at (under its own prefix) and the roster
(workers/moe/roster.py). It lives in the app like the tiers (Serve restarts it, `serve delete` removes it);
it is not on any request's path: members call it only while (re)forming, and a poller asks it about twice a
second whether someone waits to join.

`ServeEPMembership` is what a DecodeServer's engine holds (workers.moe.expert_parallel.EPMembership): the engine
loop thread blocks in join() while its group forms; change_pending() answers from the poller's last look.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import threading
import time

from workers.dist.ep_group import EPGroupSpec, EPMembershipError
from workers.moe.roster import EPRoster

logger = logging.getLogger(__name__)
JOIN_POLL_S = 0.2
CHANGE_POLL_S = 0.5
COORDINATOR_LOST_S = 120.0  # join gives up (EPMembershipError: the replica fails its health check) after this


class EPCoordinator:
    def __init__(self, tier_name: str, size: int, grace_s: float):
        import ray
        import torch.distributed as dist

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, use_libuv=True,
                                    timeout=datetime.timedelta(seconds=60))
        self.roster = EPRoster(target_size=size, store_host=host, store_port=self._store.port,
                               prefix=f"ep/{tier_name}", grace_s=grace_s)
        self._lock = threading.Lock()

    async def join(self, member: str, after_epoch: int) -> EPGroupSpec | None:
        with self._lock:
            return self.roster.join(member, after_epoch)

    async def change_pending(self, epoch: int) -> bool:
        with self._lock:
            return self.roster.change_pending(epoch)

    async def leave(self, member: str) -> None:
        with self._lock:
            self.roster.leave(member)

    async def status(self) -> dict:
        with self._lock:
            return {"epoch": self.roster.epoch, "members": list(self.roster.members)}


class ServeEPMembership:
    """The engine's side of the roster, over a Serve handle (called from the engine loop thread)."""

    def __init__(self, handle, member: str):
        self.handle = handle
        self.member = member
        # Serve refuses blocking handle calls on a thread that runs an event loop (the replica's constructor
        # does), so every call waits on this thread of its own.
        self._calls = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tierserve-ep-roster-call")
        self._epoch = -1
        self._pending = False
        self._closed = threading.Event()
        threading.Thread(target=self._poll_changes, name="tierserve-ep-roster", daemon=True).start()

    def join(self, after_epoch: int) -> EPGroupSpec:
        deadline = time.monotonic() + COORDINATOR_LOST_S
        while not self._closed.is_set():
            try:
                spec = self._call("join", self.member, after_epoch)
            except Exception as exc:  # noqa: BLE001 - coordinator restarting: retry until the deadline
                logger.warning("expert-parallel roster unreachable: %r", exc)
                spec = None
            if spec is not None:
                self._epoch, self._pending = spec.epoch, False
                return spec
            if time.monotonic() > deadline:
                break
            time.sleep(JOIN_POLL_S)
        raise EPMembershipError(f"{self.member}: no expert-parallel group formed (roster unreachable or closed)")

    def change_pending(self, epoch: int) -> bool:
        return self._pending and epoch == self._epoch

    def leave(self) -> None:
        self._closed.set()
        try:
            self.handle.leave.remote(self.member)
        except Exception as exc:  # noqa: BLE001 - leaving during shutdown must not raise
            logger.debug("leave failed: %r", exc)

    def _call(self, method: str, *args):
        def call():
            return getattr(self.handle, method).remote(*args).result(timeout_s=10)

        return self._calls.submit(call).result(timeout=15)

    def _poll_changes(self) -> None:
        while not self._closed.wait(CHANGE_POLL_S):
            if self._epoch < 0:
                continue
            try:
                self._pending = bool(self._call("change_pending", self._epoch))
            except Exception as exc:  # noqa: BLE001 - the next look retries
                logger.debug("roster poll failed: %r", exc)
