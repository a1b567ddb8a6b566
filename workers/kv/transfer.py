"""KVTransport: encoded KV blocks between two replicas over a pairwise torch.distributed group.

There is no global world: replicas come and go with autoscaling. The sending side (prefill) runs a
TCPStore; each (prefill, decode) pair builds its own 2-rank group under a PrefixStore keyed by the
pair id (gloo for CPU tensors, NCCL for CUDA), cached for reuse. Blocks travel as the codec stores
them (never dequantized): one flat byte buffer per transfer, in (layer, tensor, block) order, so the
receiver scatters straight into the pages it reserved.
Failure mode: every wait is bounded by the group timeout; a timeout raises KVTransferError and the
caller falls back (recompute), it never hangs.

# L=layers, n=blocks moved, N=blocks in the pool
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.kv.codecs import LayerPages

SERVER_RANK = 0  # the side whose TCPStore hosts the pair's rendezvous
CLIENT_RANK = 1


class KVTransferError(RuntimeError):
    """A transfer could not complete (peer gone, timeout, layout mismatch)."""


@dataclass(frozen=True)
class PeerEndpoint:
    """Where a sender's rendezvous store listens."""

    host: str
    port: int


def block_nbytes(pages: list[LayerPages]) -> int:
    """Bytes one block occupies across all layers (what a transfer moves per block)."""
    return sum(t[0].numel() * t.element_size() for layer in pages for t in layer.tensors())


def pack_blocks(pages: list[LayerPages], block_ids: list[int]) -> torch.Tensor:
    """[n blocks across L layers] -> one flat uint8 buffer, exactly n * block_nbytes(pages) long."""
    index = torch.tensor(block_ids, dtype=torch.long, device=pages[0].device)
    parts = [t.index_select(0, index).contiguous().view(torch.uint8).reshape(-1)
             for layer in pages for t in layer.tensors()]
    return torch.cat(parts)


def unpack_blocks(buffer: torch.Tensor, pages: list[LayerPages], block_ids: list[int]) -> None:
    """Inverse of pack_blocks: scatter the buffer into the given (reserved) blocks of `pages`."""
    expected = len(block_ids) * block_nbytes(pages)
    if buffer.numel() != expected:
        raise KVTransferError(f"KV buffer has {buffer.numel()} bytes, layout expects {expected}")
    index = torch.tensor(block_ids, dtype=torch.long, device=pages[0].device)
    offset = 0
    for layer in pages:
        for t in layer.tensors():
            row_shape = t.shape[1:]
            nbytes = len(block_ids) * t[0].numel() * t.element_size()
            rows = buffer[offset:offset + nbytes].view(t.dtype).view(len(block_ids), *row_shape)
            t.index_copy_(0, index, rows)
            offset += nbytes


class KVTransport:
    """One per replica. Either side may serve a pair's group (rank 0, on its own store) or join one
    (rank 1, on the peer's store); send/recv always address the other rank. Groups are cached per pair."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0):
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=self.timeout,
                                    use_libuv=True)
        self.endpoint = PeerEndpoint(host, self._store.port)
        self._groups: dict[tuple[str, str], dist.ProcessGroup] = {}
        self._client_stores: dict[PeerEndpoint, dist.TCPStore] = {}
        # Group construction is a rendezvous: two threads must never build the same pair twice.
        self._lock = threading.Lock()

    def serve_group(self, pair_id: str, backend: str = "gloo") -> dist.ProcessGroup:
        """This side's store hosts the pair (blocks until the peer joins or the timeout passes)."""
        return self._group(("serve", pair_id), self._store, pair_id, SERVER_RANK, backend)

    def join_group(self, peer: PeerEndpoint, pair_id: str, backend: str = "gloo") -> dist.ProcessGroup:
        """Connect to the peer's store and join the pair's group."""
        return self._group(("join", f"{peer.host}:{peer.port}/{pair_id}"), self._peer_store(peer), pair_id,
                           CLIENT_RANK, backend)

    def announce(self, peer: PeerEndpoint, key: str, value: str) -> None:
        """Leave a message in the peer's store (e.g. which replica is about to join for a request)."""
        self._peer_store(peer).set(key, value)

    def await_announcement(self, key: str) -> str:
        """Wait (bounded by the timeout) for a peer to announce `key` in this side's store."""
        try:
            value = self._store.get(key).decode()
        except Exception as exc:
            raise KVTransferError(f"no peer announced {key!r} within {self.timeout}: {exc}") from exc
        self._store.delete_key(key)
        return value

    def forget_pair(self, pair_id: str) -> None:
        """Drop a broken pair's cached group (its peer died or timed out); the next use rebuilds it."""
        with self._lock:
            for key in [k for k in self._groups if k[1].endswith(pair_id)]:
                del self._groups[key]

    def _peer_store(self, peer: PeerEndpoint) -> dist.TCPStore:
        with self._lock:
            store = self._client_stores.get(peer)
            if store is None:
                try:
                    store = dist.TCPStore(peer.host, peer.port, is_master=False, timeout=self.timeout,
                                          use_libuv=True)
                except Exception as exc:  # connection refused / timeout
                    raise KVTransferError(f"cannot reach KV peer {peer.host}:{peer.port}: {exc}") from exc
                self._client_stores[peer] = store
            return store

    def _group(self, key, store, pair_id: str, rank: int, backend: str) -> dist.ProcessGroup:
        with self._lock:
            return self._group_locked(key, store, pair_id, rank, backend)

    def _group_locked(self, key, store, pair_id: str, rank: int, backend: str) -> dist.ProcessGroup:
        group = self._groups.get(key)
        if group is None:
            prefixed = dist.PrefixStore(f"kv-pair/{pair_id}/", store)
            try:
                if backend == "nccl":
                    group = dist.ProcessGroupNCCL(prefixed, rank, 2)
                else:
                    group = dist.ProcessGroupGloo(prefixed, rank, 2, self.timeout)
            except Exception as exc:
                raise KVTransferError(f"cannot form {backend} group {pair_id!r}: {exc}") from exc
            self._groups[key] = group
        return group

    def send(self, group: dist.ProcessGroup, pages: list[LayerPages], block_ids: list[int], tag: int = 0) -> int:
        """Send the blocks' encoded bytes to the other rank; returns bytes sent."""
        buffer = pack_blocks(pages, block_ids)
        try:
            group.send([buffer], 1 - group.rank(), tag).wait(self.timeout)
        except Exception as exc:
            raise KVTransferError(f"KV send failed: {exc}") from exc
        return buffer.numel()

    def recv(self, group: dist.ProcessGroup, pages: list[LayerPages], block_ids: list[int], tag: int = 0) -> int:
        """Receive into the reserved blocks; returns bytes received."""
        buffer = torch.empty(len(block_ids) * block_nbytes(pages), dtype=torch.uint8, device=pages[0].device)
        try:
            group.recv([buffer], 1 - group.rank(), tag).wait(self.timeout)
        except Exception as exc:
            raise KVTransferError(f"KV receive failed: {exc}") from exc
        unpack_blocks(buffer, pages, block_ids)
        return buffer.numel()

    def drop_groups(self) -> None:
        self._groups.clear()
        self._client_stores.clear()
