"""KVReceiver: the decode side of the KV channels. It hosts the store prefill replicas meet at, accepts one
channel per prefill replica (formed once, reused by every request) and delivers each DATA frame into the
blocks the request reserved.

  expect(tag, nbytes, write) -> PendingReceive   before asking the prefill tier (the bytes may come first)
  PendingReceive.done                             resolves once `write` has put the bytes into the blocks
  cancel(pending) -> bool                         the client left: True = nothing will write, free the blocks now;
                                                  False = a write is under way, free them when `done` resolves
Frames for a tag nobody expects any more (cancelled, timed out) are received and dropped: the channel stays
aligned for the next request. Each channel has its own thread; no wait ever runs in a shared executor, and the
one lock here guards dictionaries only (never held across a network wait). A channel whose peer dies (socket
closed, no heartbeat within the idle timeout, a bad frame) is closed and forgotten; the prefill replica forms a
new one under a new epoch on its next send.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from workers.dist.frames import Frame, FrameError, FrameKind
from workers.dist.pair_groups import HOST_RANK, PairGroup, backend_for, form_pair_group, wait
from workers.kv.transfer import KVTransferError, PeerEndpoint

logger = logging.getLogger(__name__)

HELLO_COUNT_KEY = "kv-chan/hello-count"
HELLO_KEY = "kv-chan/hello/{index}"
ACCEPT_POLL = datetime.timedelta(seconds=0.5)  # how often the acceptor looks up from its wait (to notice close())


@dataclass(frozen=True)
class Hello:
    """A prefill replica asking to open a channel (left in this replica's store)."""

    sender_id: str
    epoch: int
    prefix: str  # the pair's store prefix (unique per sender and epoch)
    backend: str

    def encode(self) -> str:
        return json.dumps({"sender_id": self.sender_id, "epoch": self.epoch, "prefix": self.prefix,
                           "backend": self.backend})

    @classmethod
    def decode(cls, raw: bytes) -> "Hello":
        fields = json.loads(raw.decode())
        hello = cls(str(fields["sender_id"]), int(fields["epoch"]), str(fields["prefix"]), str(fields["backend"]))
        if not hello.prefix.startswith("kv-chan/"):
            raise ValueError(f"bad channel prefix {hello.prefix!r}")
        return hello


@dataclass(eq=False)
class PendingReceive:
    tag: int
    nbytes: int
    write: Callable[[torch.Tensor], None]  # scatters the payload into the reserved blocks
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)  # -> bytes written


@dataclass(frozen=True)
class ChannelStats:
    sender_id: str
    epoch: int
    backend: str
    frames: int
    bytes: int
    dropped: int  # DATA frames for a tag nobody expected any more


class KVReceiver:
    def __init__(self, host: str, layout_digest: int, device: torch.device, timeout_s: float,
                 max_payload_bytes: int):
        self.layout_digest = layout_digest
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.max_payload_bytes = max_payload_bytes  # a header asking for more is not ours: the channel is dropped
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=self.timeout,
                                    use_libuv=True)
        self.endpoint = PeerEndpoint(host, self._store.port)
        self._lock = threading.Lock()  # guards the two dicts below; never held across a network wait
        self._pending: dict[int, PendingReceive] = {}
        self._channels: dict[str, _ReceiveChannel] = {}  # by sender id: its newest epoch
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="kv-acceptor", daemon=True)
        self._acceptor.start()

    # ---- requests -------------------------------------------------------------------------------------
    def expect(self, tag: int, nbytes: int, write: Callable[[torch.Tensor], None]) -> PendingReceive:
        pending = PendingReceive(tag, nbytes, write)
        with self._lock:
            if tag in self._pending:
                raise KVTransferError(f"tag {tag} is already expected")
            self._pending[tag] = pending
        return pending

    def cancel(self, pending: PendingReceive) -> bool:
        """Stop expecting it. True: no write happened or will happen (its blocks may be freed now). False: a
        channel already took it; its write is under way (a memory copy) and `pending.done` resolves after it."""
        with self._lock:
            if self._pending.get(pending.tag) is not pending:
                return False
            del self._pending[pending.tag]
        pending.done.cancel()
        return True

    def _claim(self, tag: int) -> PendingReceive | None:
        with self._lock:
            return self._pending.pop(tag, None)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def channel_stats(self) -> list[ChannelStats]:
        with self._lock:
            channels = list(self._channels.values())
        return [channel.stats() for channel in channels]

    # ---- channels -------------------------------------------------------------------------------------
    def _accept(self) -> None:
        """Read hellos in order (index 1, 2, ...) and start a channel for each on its own thread."""
        store = dist.TCPStore(self.endpoint.host, self.endpoint.port, is_master=False, timeout=self.timeout,
                              use_libuv=True)  # the acceptor's own connection: its waits stall nobody else
        index, waiting_since = 1, time.monotonic()
        while not self._closed.is_set():
            key = HELLO_KEY.format(index=index)
            try:
                if not self._wait_for(store, key):
                    # A sender that took an index and died before writing its hello must not block later ones.
                    if time.monotonic() - waiting_since > self.timeout.total_seconds() and \
                            store.add(HELLO_COUNT_KEY, 0) > index:
                        index, waiting_since = index + 1, time.monotonic()
                    continue
                raw = store.get(key)
                store.delete_key(key)
            except Exception as exc:  # noqa: BLE001 - the store connection broke: retry, never spin
                logger.warning("KV acceptor store error: %r", exc)
                self._closed.wait(ACCEPT_POLL.total_seconds())
                continue
            index, waiting_since = index + 1, time.monotonic()
            try:
                hello = Hello.decode(raw)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("ignored a malformed KV channel hello: %r", exc)
                continue
            if hello.backend != backend_for(self.device):
                logger.warning("refused a %s KV channel from %s: this replica's pages need %s", hello.backend,
                               hello.sender_id, backend_for(self.device))
                continue
            channel = _ReceiveChannel(self, hello)
            with self._lock:
                previous = self._channels.get(hello.sender_id)
                self._channels[hello.sender_id] = channel
            if previous is not None:
                previous.close()  # the sender gave that epoch up; it sends nothing more there
            channel.start()

    @staticmethod
    def _wait_for(store: dist.Store, key: str) -> bool:
        try:
            store.wait([key], ACCEPT_POLL)
            return True
        except dist.DistStoreError as exc:
            if "timeout" in str(exc).lower():
                return False
            raise

    def _forget(self, channel: "_ReceiveChannel") -> None:
        with self._lock:
            if self._channels.get(channel.hello.sender_id) is channel:
                del self._channels[channel.hello.sender_id]

    def close(self, join_timeout_s: float = 0.0) -> None:
        """Stop accepting and close every channel (scale-down, shutdown): their peers see closed sockets and form
        no new channel here. With join_timeout_s, wait (bounded) for the channel threads to end."""
        self._closed.set()
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
            pending = list(self._pending.values())
            self._pending.clear()
        for channel in channels:
            channel.close()
        for item in pending:
            item.done.cancel()
        if join_timeout_s > 0:
            self._acceptor.join(join_timeout_s)
            for channel in channels:
                channel.join(join_timeout_s)


class _ReceiveChannel:
    """One prefill replica's channel (one epoch): forms the pair group as host, then reads frames until the peer
    closes it, dies or goes quiet for longer than the idle timeout."""

    def __init__(self, owner: KVReceiver, hello: Hello):
        self.owner, self.hello = owner, hello
        self._group: PairGroup | None = None
        self._closed = threading.Event()
        self._frames = self._bytes = self._dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"kv-recv-{hello.sender_id}#{hello.epoch}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stats(self) -> ChannelStats:
        return ChannelStats(self.hello.sender_id, self.hello.epoch, self.hello.backend, self._frames, self._bytes,
                            self._dropped)

    def close(self) -> None:
        """Stop after the frame being waited for (a live sender's next heartbeat comes within a second)."""
        self._closed.set()

    def join(self, timeout_s: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        owner = self.owner
        try:
            self._group = form_pair_group(owner.endpoint.host, owner.endpoint.port, self.hello.prefix, HOST_RANK,
                                          self.hello.backend, owner.timeout)
            if self._closed.is_set():
                return
            stream = torch.cuda.Stream(owner.device) if owner.device.type == "cuda" else None
            while not self._closed.is_set():
                frame = self._next_frame()
                if frame.kind == FrameKind.CLOSE:
                    return
                if frame.kind == FrameKind.DATA:
                    self._deliver(frame, stream)
        except (KVTransferError, FrameError) as exc:
            if not self._closed.is_set():
                logger.warning("KV channel from %s (epoch %d) closed: %s", self.hello.sender_id, self.hello.epoch,
                               exc)
        except Exception:  # noqa: BLE001 - a channel thread must never die silently
            logger.exception("KV channel from %s failed", self.hello.sender_id)
        finally:
            if self._group is not None:
                self._group.close()
                self._group = None  # the last reference: its sockets close, so the peer's next send fails at once
            owner._forget(self)

    def _next_frame(self) -> Frame:
        header = Frame.empty_tensor()
        # An idle sender sends a heartbeat every second: a timeout here means it is gone.
        wait(self._group.control.recv([header], self._group.peer_rank, 0), self.owner.timeout, "KV frame header")
        return Frame.from_tensor(header)

    def _deliver(self, frame: Frame, stream) -> None:
        owner = self.owner
        if frame.nbytes > owner.max_payload_bytes:
            raise FrameError(f"a frame of {frame.nbytes} bytes exceeds this pool ({owner.max_payload_bytes})")
        buffer = torch.empty(frame.nbytes, dtype=torch.uint8, device=owner.device)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            wait(self._group.data.recv([buffer], self._group.peer_rank, 1), owner.timeout, "KV payload")
            # Claimed only now that every byte is here: a request cancelled during the network wait frees its
            # blocks at once (cancel() finds it still pending), and its bytes are dropped below.
            pending = owner._claim(frame.tag)
            self._frames += 1
            self._bytes += frame.nbytes
            if pending is None:
                self._dropped += 1
                return
            if frame.layout_digest != owner.layout_digest or frame.nbytes != pending.nbytes:
                pending.done.set_exception(KVTransferError(
                    f"KV frame for tag {frame.tag} does not fit: {frame.nbytes} bytes (expected {pending.nbytes}), "
                    f"layout {frame.layout_digest:#x} (this replica {owner.layout_digest:#x})"))
                return
            try:
                pending.write(buffer)
                if stream is not None:
                    stream.synchronize()  # the bytes are in the pages before the engine may read them
            except Exception as exc:  # noqa: BLE001 - the request's error, not the channel's
                pending.done.set_exception(exc)
                return
        pending.done.set_result(frame.nbytes)
