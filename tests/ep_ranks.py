"""Expert-parallel ranks as separate processes (spawned): each runs an Engine in one static group and reports
its completions. Shared by the unit tests of expert parallelism and `tierserve bench moe`-style checks."""

from __future__ import annotations

import dataclasses
import os
import socket

import torch

GREEDY_LOGPROBS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(rank: int, world_size: int, port: int, model: str, prompts: list[list[int]], max_tokens: int,
             engine_overrides: dict, results, die_after_steps: int = 0) -> None:
    """Run `prompts` greedily on this rank until no rank has work; put (rank, tokens, logprobs, stats, owners)."""
    from workers.config import EngineConfig
    from workers.dist.ep_group import EPGroupSpec, EPMembershipError
    from workers.engine import Engine
    from workers.moe.expert_parallel import StaticMembership
    from workers.outputs import Completion
    from workers.sampling_params import SamplingParams

    torch.set_num_threads(1)
    spec = EPGroupSpec(epoch=0, rank=rank, world_size=world_size, store_host="127.0.0.1", store_port=port,
                       prefix="ep-test")
    try:
        config = EngineConfig(model=model, num_threads=1, freeze_gc_heap=False, **engine_overrides)
        engine = Engine(config, ep_membership=StaticMembership(spec))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=GREEDY_LOGPROBS)
        completions = {}
        for index, prompt in enumerate(prompts):
            request_id = f"rank{rank}-{index}"
            completions[request_id] = Completion(request_id)
            engine.add_request(request_id, prompt_token_ids=prompt, params=params)
        ep = engine.expert_parallel
        steps = 0
        while True:
            for output in engine.step():
                completions[output.request_id].add(output)
            steps += 1
            if die_after_steps and steps == die_after_steps:
                os._exit(0)  # a replica lost mid-run: its sockets close
            if ep.last_total_work == 0 and not engine.has_unfinished():
                break  # every rank saw nobody with work at the same handshake
        ordered = [completions[f"rank{rank}-{index}"] for index in range(len(prompts))]
        results.put((rank, [c.token_ids for c in ordered], [[lp.logprob for lp in c.logprobs] for c in ordered],
                     dataclasses.asdict(ep.stats), [list(layer) for layer in ep.placement.owners]))
    except EPMembershipError as exc:
        results.put((rank, "EPMembershipError", str(exc), None, None))


def run_group(model: str, prompts_by_rank: list[list[list[int]]], max_tokens: int, engine_overrides: dict | None = None,
              die: tuple[int, int] | None = None, timeout_s: float = 240.0) -> dict[int, tuple]:
    """Spawn one process per rank (a TCPStore hosted here) and collect each rank's report. die=(rank, step): that
    rank exits after that many steps."""
    import multiprocessing
    import datetime

    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    world_size = len(prompts_by_rank)
    processes = [context.Process(target=run_rank, args=(rank, world_size, port, model, prompts_by_rank[rank],
                                                        max_tokens, engine_overrides or {}, results,
                                                        die[1] if die and die[0] == rank else 0))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    reports = {}
    try:
        expected = world_size - (1 if die else 0)
        while len(reports) < expected:
            report = results.get(timeout=timeout_s)
            reports[report[0]] = report
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        del store
    return reports
