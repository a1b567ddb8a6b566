"""The expert-parallel group: W decode replicas of one tier in one torch.distributed group, formed per epoch.

Like the KV pair groups there is no global world: the group is formed on a store under its own epoch's prefix
(workers/moe/roster.py says who is in which epoch) and re-formed under a new epoch when a member is lost or
joins. Collectives are bounded by the group's timeout; a dead peer (its sockets close) or a timeout surfaces as
ExpertParallelError, which the engine answers by re-forming the group (workers/moe/expert_parallel.py).
Gloo for CPU weights, NCCL for CUDA ones.

# W=ranks, S=rows sent, R=rows received
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel group failed (peer lost, timeout, aborted group)."""


class EPMembershipError(RuntimeError):
    """No group can be formed any more (a static group lost a member, the roster is gone): the engine stops."""


@dataclass(frozen=True)
class EPGroupSpec:
    """Where and as whom to join one epoch of the group (what the roster hands out)."""

    epoch: int
    rank: int
    world_size: int
    store_host: str
    store_port: int
    prefix: str  # the tier's prefix on the store; the epoch is appended
    members: tuple[str, ...] = ()  # member ids by rank (logs and metrics)


class EPGroup:
    """One epoch's group. Every method is a collective: all ranks call it, in the same order."""

    def __init__(self, spec: EPGroupSpec, device: torch.device, timeout: datetime.timedelta):
        self.spec = spec
        self.rank = spec.rank
        self.world_size = spec.world_size
        self.device = torch.device(device)
        self.timeout = timeout
        try:
            self._store = dist.TCPStore(spec.store_host, spec.store_port, is_master=False, timeout=timeout,
                                        use_libuv=True)
            store = dist.PrefixStore(f"{spec.prefix}/epoch-{spec.epoch}/", self._store)
            if self.device.type == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self._group = dist.ProcessGroupNCCL(store, spec.rank, spec.world_size, options)
            else:
                self._group = dist.ProcessGroupGloo(store, spec.rank, spec.world_size, timeout)
        except Exception as exc:  # store unreachable, a member never came
            raise ExpertParallelError(f"cannot form expert-parallel group epoch {spec.epoch}: {exc}") from exc

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place; returns tensor."""
        self._wait(self._group.allreduce([tensor]), "all_reduce")
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor [...] (same shape on every rank) -> [W, ...]."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._wait(self._group.allgather([out], [tensor]), "all_gather")
        return torch.stack(out)

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """send [S, ...] cut into consecutive runs of send_counts[r] rows for rank r -> [R, ...], the runs from each
        rank in rank order (recv_counts[r] rows from r)."""
        recv = torch.empty((sum(recv_counts), *send.shape[1:]), dtype=send.dtype, device=send.device)
        self._wait(self._group.alltoall_base(recv, send.contiguous(), recv_counts, send_counts), "all_to_all")
        return recv

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        """How many rows each rank will send me, given how many I send each."""
        counts = torch.tensor(send_counts, dtype=torch.int64, device=self.device)
        recv = torch.empty_like(counts)
        self._wait(self._group.alltoall_base(recv, counts, [1] * self.world_size, [1] * self.world_size),
                   "count exchange")
        return recv.tolist()

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as exc:
            raise ExpertParallelError(f"expert-parallel {what} failed (epoch {self.spec.epoch}, rank "
                                      f"{self.rank}/{self.world_size}): {exc}") from exc

    def close(self) -> None:
        """Abort: peers still waiting on this group get an error instead of blocking until the timeout."""
        try:
            self._group.abort()
        except Exception as exc:  # noqa: BLE001 - closing a broken group must not raise
            logger.debug("abort of expert-parallel group epoch %d failed: %r", self.spec.epoch, exc)
