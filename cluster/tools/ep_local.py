"""An expert-parallel group of local processes (no Ray): one spawned process per rank, meeting at a TCPStore this
process hosts, each reporting one result. What `tierserve bench moe` times and the EP unit tests check."""

from __future__ import annotations

import datetime
import multiprocessing
import socket
from typing import Any, Callable

from workers.dist.ep_group import EPGroupSpec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_spec(rank: int, world_size: int, port: int, prefix: str = "ep-local") -> EPGroupSpec:
    return EPGroupSpec(epoch=0, rank=rank, world_size=world_size, store_host="127.0.0.1", store_port=port,
                       prefix=prefix)


def run_local_group(target: Callable[..., None], args_by_rank: list[tuple], expected_reports: int | None = None,
                    timeout_s: float = 600.0) -> dict[int, Any]:
    """Start target(rank, world_size, port, results, *args_by_rank[rank]) in one spawned process per rank; each puts
    (rank, report) on `results`. Returns {rank: report} once expected_reports (default: every rank) arrived; the
    processes are joined (killed if stuck) either way."""
    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    world_size = len(args_by_rank)
    processes = [context.Process(target=target, args=(rank, world_size, port, results, *args))
                 for rank, args in enumerate(args_by_rank)]
    for process in processes:
        process.start()
    reports: dict[int, Any] = {}
    try:
        while len(reports) < (world_size if expected_reports is None else expected_reports):
            rank, report = results.get(timeout=timeout_s)
            reports[rank] = report
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        del store
    return reports
