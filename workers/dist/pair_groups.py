"""Pair groups: a 2-rank torch.distributed group between two replicas, formed on a store one of them hosts.

There is never a global world (replicas come and go), so each pair rendezvouses under its own store prefix.
A pair has a control group (gloo, CPU: headers and heartbeats, waits bounded by a timeout) and a data group
for the payload: the same gloo group when the pages live on the CPU, NCCL when they live on a GPU (NCCL's
waits cannot be bounded as reliably and it moves CUDA tensors only, so the small control frames stay on gloo).
Each formation opens its own store connection: one store client is one socket with one lock, and a wait on
it would stall every other user of it.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.kv.transfer import KVTransferError

logger = logging.getLogger(__name__)

HOST_RANK = 0  # the side whose store the pair meets at (the receiving, decode replica)
JOIN_RANK = 1


def backend_for(device: torch.device) -> str:
    """The payload backend follows the pages: NCCL for CUDA pages, gloo for CPU pages."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class PairGroup:
    control: dist.ProcessGroup
    data: dist.ProcessGroup  # `control` itself for gloo
    backend: str
    rank: int
    store: dist.Store  # this pair's own store connection, alive as long as the groups

    @property
    def peer_rank(self) -> int:
        return 1 - self.rank

    def close(self) -> None:
        """Abort both groups: a wait still pending on them returns with an error instead of blocking."""
        for group in {id(self.control): self.control, id(self.data): self.data}.values():
            try:
                group.abort()
            except Exception as exc:  # noqa: BLE001 - closing a broken group must not raise
                logger.debug("abort of a %s pair group failed: %r", self.backend, exc)


def form_pair_group(host: str, port: int, prefix: str, rank: int, backend: str,
                    timeout: datetime.timedelta) -> PairGroup:
    """Rendezvous with the peer under `prefix` of the store at host:port; blocks until the peer joins, at most
    `timeout`. Raises KVTransferError (peer unreachable, never joined, backend missing)."""
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout, use_libuv=True)
    except Exception as exc:  # connection refused / timeout
        raise KVTransferError(f"cannot reach KV peer store {host}:{port}: {exc}") from exc
    prefixed = dist.PrefixStore(prefix, store)
    try:
        control = dist.ProcessGroupGloo(dist.PrefixStore("control/", prefixed), rank, 2, timeout)
    except Exception as exc:
        raise KVTransferError(f"cannot form the control group {prefix!r}: {exc}") from exc
    data = control
    if backend == "nccl":
        data = _nccl_group(dist.PrefixStore("data/", prefixed), rank, timeout)
    elif backend != "gloo":
        raise KVTransferError(f"unknown KV backend {backend!r} (gloo or nccl)")
    return PairGroup(control=control, data=data, backend=backend, rank=rank, store=store)


def _nccl_group(store: dist.Store, rank: int, timeout: datetime.timedelta) -> dist.ProcessGroup:
    nccl = getattr(dist, "ProcessGroupNCCL", None)  # absent from CPU-only torch builds
    if nccl is None or not torch.cuda.is_available():
        raise KVTransferError("KV pages are on a GPU but this torch build has no NCCL")
    options = nccl.Options()
    options._timeout = timeout
    try:
        return nccl(store, rank, 2, options)
    except Exception as exc:
        raise KVTransferError(f"cannot form the NCCL data group: {exc}") from exc


def wait(work, timeout: datetime.timedelta, what: str) -> None:
    """Wait for one send/recv, bounded; any failure (timeout, closed socket, aborted group) -> KVTransferError."""
    try:
        work.wait(timeout)
    except Exception as exc:
        raise KVTransferError(f"{what} failed: {exc}") from exc
