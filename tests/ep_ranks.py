"""Expert-parallel ranks as separate processes (cluster/tools/ep_local.py): each runs an Engine in one static group
on its own prompts and reports its completions, stats and placement."""

from __future__ import annotations

import dataclasses
import os

import torch

from cluster.tools.ep_local import rank_spec, run_local_group

GREEDY_LOGPROBS = 3


def run_rank(rank: int, world_size: int, port: int, results, model: str, prompts: list[list[int]], max_tokens: int,
             engine_overrides: dict, die_after_steps: int = 0) -> None:
    """Run `prompts` greedily until no rank has work; report (tokens, logprobs, stats, owners) or the error."""
    from workers.config import EngineConfig
    from workers.dist.ep_group import EPMembershipError
    from workers.engine import Engine
    from workers.moe.expert_parallel import StaticMembership
    from workers.outputs import Completion
    from workers.sampling_params import SamplingParams

    torch.set_num_threads(1)
    try:
        config = EngineConfig(model=model, num_threads=1, freeze_gc_heap=False, **engine_overrides)
        engine = Engine(config, ep_membership=StaticMembership(rank_spec(rank, world_size, port)))
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
        results.put((rank, ([c.token_ids for c in ordered], [[lp.logprob for lp in c.logprobs] for c in ordered],
                            dataclasses.asdict(ep.stats), [list(layer) for layer in ep.placement.owners])))
    except EPMembershipError as exc:
        results.put((rank, ("EPMembershipError", str(exc), None, None)))


def run_group(model: str, prompts_by_rank: list[list[list[int]]], max_tokens: int, engine_overrides: dict | None = None,
              die: tuple[int, int] | None = None, timeout_s: float = 240.0) -> dict[int, tuple]:
    """{rank: (rank, tokens, logprobs, stats, owners)}; die=(rank, step): that rank exits after that many steps."""
    args = [(model, prompts, max_tokens, engine_overrides or {}, die[1] if die and die[0] == rank else 0)
            for rank, prompts in enumerate(prompts_by_rank)]
    reports = run_local_group(run_rank, args, len(args) - (1 if die else 0), timeout_s)
    return {rank: (rank, *report) for rank, report in reports.items()}
