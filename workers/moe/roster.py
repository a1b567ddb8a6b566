"""The expert-parallel roster: who is in which epoch of a decode tier's group (plain Python; the cluster serves it
from one small deployment, cluster/ep_coordinator.py).

Members poll `join(member, after_epoch)` until it hands them a spec. An epoch forms from the members waiting for
it when the tier's full size waits, or when the first of them has waited `grace_s` (a member was lost: the
survivors go on without it rather than stall). A member that stops polling for `stale_s` is dropped from the
wait (it died while waiting). Running members ask `change_pending(epoch)` (cheaply, through a poller) and, when
someone waits to join, all leave their epoch at the same step (the group's handshake carries the news) and join
the next one together: the group grows back when a lost replica's replacement arrives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from workers.dist.ep_group import EPGroupSpec


@dataclass
class EPRoster:
    target_size: int  # the tier's expert_parallel: an epoch forms at once when this many wait
    store_host: str
    store_port: int
    prefix: str  # the tier's key prefix on the store
    grace_s: float = 10.0
    stale_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    epoch: int = -1
    members: tuple[str, ...] = ()  # the current epoch's, by rank
    _waiting: dict[str, float] = field(default_factory=dict)  # member -> its last poll
    _waiting_since: float | None = None

    def join(self, member: str, after_epoch: int) -> EPGroupSpec | None:
        """The spec of an epoch above after_epoch that includes `member`, or None (poll again)."""
        if self.epoch > after_epoch and member in self.members:
            return self._spec(member)
        now = self.clock()
        self._waiting = {m: seen for m, seen in self._waiting.items() if now - seen < self.stale_s}
        self._waiting[member] = now
        if self._waiting_since is None:
            self._waiting_since = now
        if len(self._waiting) >= self.target_size or now - self._waiting_since >= self.grace_s:
            self.epoch += 1
            self.members = tuple(sorted(self._waiting))
            self._waiting.clear()
            self._waiting_since = None
            return self._spec(member)
        return None

    def change_pending(self, epoch: int) -> bool:
        """A member of `epoch` should leave it: a newer epoch exists or someone waits to join."""
        now = self.clock()
        return self.epoch > epoch or any(now - seen < self.stale_s for seen in self._waiting.values())

    def leave(self, member: str) -> None:
        self._waiting.pop(member, None)
        if not self._waiting:
            self._waiting_since = None

    def _spec(self, member: str) -> EPGroupSpec:
        return EPGroupSpec(epoch=self.epoch, rank=self.members.index(member), world_size=len(self.members),
                           store_host=self.store_host, store_port=self.store_port, prefix=self.prefix,
                           members=self.members)
