"""KVSender: the prefill side of the KV channels. One channel per decode replica, formed on first use and reused
by every request to it; each has one thread that forms the pair group, sends queued transfers in order (a header,
then the payload) and a heartbeat whenever it is idle for a heartbeat interval.

  send(peer_id, endpoint, tag, layout_digest, payload) -> Future[bytes sent]

The future fails with KVTransferError if the channel cannot form or breaks (the caller then hands the bytes
over another way); cancelling it (the decode side gave up) skips the transfer if it has not started. A broken
channel fails everything queued on it and is forgotten; the next send to that peer forms a new one under a new
epoch (a new store prefix, so nothing of the old rendezvous is reused). Forming one channel never blocks
another: each forms on its own thread, and the lock here guards a dictionary only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import itertools
import logging
import queue
import secrets
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.dist.frames import Frame, FrameKind
from workers.dist.kv_receiver import HELLO_COUNT_KEY, HELLO_KEY, ChannelStats, Hello
from workers.dist.pair_groups import JOIN_RANK, PairGroup, backend_for, form_pair_group, wait
from workers.kv.transfer import KVTransferError, PeerEndpoint

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Transfer:
    frame: Frame
    payload: torch.Tensor | None  # None for control frames
    future: concurrent.futures.Future


class KVSender:
    def __init__(self, sender_id: str, device: torch.device, timeout_s: float, heartbeat_s: float = 1.0):
        self.sender_id = sender_id
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.heartbeat_s = heartbeat_s
        self._epochs = itertools.count()  # one sequence for every peer: an epoch is never reused
        self._lock = threading.Lock()  # guards _channels only
        self._channels: dict[str, _SendChannel] = {}  # by decode replica id

    def send(self, peer_id: str, endpoint: PeerEndpoint, tag: int, layout_digest: int,
             payload: torch.Tensor) -> concurrent.futures.Future:
        transfer = _Transfer(Frame(FrameKind.DATA, tag, payload.numel(), layout_digest), payload,
                             concurrent.futures.Future())
        with self._lock:  # put under the lock: a channel breaking now either gets it in its queue or is replaced
            channel = self._channels.get(peer_id)
            if channel is None:
                channel = _SendChannel(self, peer_id, endpoint, next(self._epochs))
                self._channels[peer_id] = channel
                channel.start()
            channel.put(transfer)
        return transfer.future

    def channel_stats(self) -> list[ChannelStats]:
        with self._lock:
            channels = list(self._channels.values())
        return [channel.stats() for channel in channels]

    @property
    def peers(self) -> list[str]:
        """Decode replicas this replica has a live (or forming) channel to."""
        with self._lock:
            return list(self._channels)

    def _forget(self, channel: "_SendChannel") -> list[_Transfer]:
        """Drop a broken channel; returns what was still queued on it (nothing can be added after this)."""
        with self._lock:
            if self._channels.get(channel.peer_id) is channel:
                del self._channels[channel.peer_id]
            return channel.drain()

    def close(self, join_timeout_s: float = 0.0) -> None:
        """Say goodbye on every channel (the receivers close theirs without an error) and stop; with join_timeout_s,
        wait (bounded) for the channel threads to end."""
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.put(None)
        for channel in channels:
            channel.join(join_timeout_s)


class _SendChannel:
    def __init__(self, owner: KVSender, peer_id: str, endpoint: PeerEndpoint, epoch: int):
        self.owner, self.peer_id, self.endpoint, self.epoch = owner, peer_id, endpoint, epoch
        self._queue: queue.SimpleQueue[_Transfer | None] = queue.SimpleQueue()
        self._frames = self._bytes = 0
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{peer_id}#{epoch}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        if timeout_s > 0 and self._thread.is_alive():
            self._thread.join(timeout_s)

    def put(self, transfer: _Transfer | None) -> None:
        self._queue.put(transfer)

    def drain(self) -> list[_Transfer]:
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not None:
                items.append(item)

    def stats(self) -> ChannelStats:
        return ChannelStats(self.peer_id, self.epoch, self.owner.backend, self._frames, self._bytes, 0)

    def _run(self) -> None:
        group = None
        current: _Transfer | None = None
        try:
            group = self._form()
            stream = torch.cuda.Stream(self.owner.device) if self.owner.device.type == "cuda" else None
            while True:
                try:
                    current = self._queue.get(timeout=self.owner.heartbeat_s)
                except queue.Empty:
                    self._send_header(group, Frame(FrameKind.HEARTBEAT, epoch=self.epoch))
                    continue
                if current is None:  # close()
                    self._send_header(group, Frame(FrameKind.CLOSE, epoch=self.epoch))
                    return
                if not current.future.set_running_or_notify_cancel():
                    current = None
                    continue  # the requester gave up before it was sent
                self._send(group, current, stream)
                current.future.set_result(current.frame.nbytes)
                current = None
        except Exception as exc:  # noqa: BLE001 - every failure breaks the channel and fails its queue
            error = exc if isinstance(exc, KVTransferError) else KVTransferError(f"KV channel failed: {exc!r}")
            logger.warning("KV channel to %s (epoch %d) broken: %s", self.peer_id, self.epoch, error)
            self._fail(current, error)
        finally:
            if group is not None:
                group.close()
                del group  # the last reference: its sockets close and the receiver's wait ends at once

    def _form(self) -> PairGroup:
        owner = self.owner
        prefix = f"kv-chan/{owner.sender_id}/{self.epoch}-{secrets.token_hex(4)}/"
        hello = Hello(owner.sender_id, self.epoch, prefix, owner.backend)
        try:
            store = dist.TCPStore(self.endpoint.host, self.endpoint.port, is_master=False, timeout=owner.timeout,
                                  use_libuv=True)
            index = store.add(HELLO_COUNT_KEY, 1)
            store.set(HELLO_KEY.format(index=index), hello.encode())
        except Exception as exc:
            raise KVTransferError(f"cannot reach KV peer {self.endpoint.host}:{self.endpoint.port}: {exc}") from exc
        return form_pair_group(self.endpoint.host, self.endpoint.port, prefix, JOIN_RANK, owner.backend,
                               owner.timeout)

    def _send_header(self, group: PairGroup, frame: Frame) -> None:
        wait(group.control.send([frame.to_tensor()], group.peer_rank, 0), self.owner.timeout, "KV frame header")

    def _send(self, group: PairGroup, transfer: _Transfer, stream) -> None:
        frame = transfer.frame
        self._send_header(group, frame)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None:
                # The payload was packed on the engine's stream: send it only once it is written.
                stream.wait_stream(torch.cuda.default_stream(self.owner.device))
            wait(group.data.send([transfer.payload], group.peer_rank, 1), self.owner.timeout, "KV payload")
        self._frames += 1
        self._bytes += frame.nbytes

    def _fail(self, current: _Transfer | None, error: KVTransferError) -> None:
        """Forget this channel (the next send forms a new one) and fail this transfer and everything queued."""
        if current is not None:
            current.future.set_exception(error)  # already running
        for transfer in self.owner._forget(self):
            if transfer.future.set_running_or_notify_cancel():
                transfer.future.set_exception(error)
