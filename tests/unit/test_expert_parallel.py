"""Expert parallelism: placement (plain Python), and real ranks (spawned processes in one gloo group) whose output
equals one process's."""

from __future__ import annotations

import random

import pytest
import torch

from tests.checkpoints import make_tiny_hf_checkpoint
from tests.ep_ranks import run_group
from workers.config import EngineConfig
from workers.engine import Engine
from workers.moe.placement import ExpertPlacement, rebalance
from workers.sampling_params import SamplingParams


def test_contiguous_placement_splits_experts_evenly():
    placement = ExpertPlacement.contiguous(num_layers=2, num_experts=7, world_size=3)
    assert placement.owners[0] == (0, 0, 0, 1, 1, 2, 2)
    assert placement.local_experts(1, 1) == [3, 4]
    with pytest.raises(ValueError, match="at most one rank per expert"):
        ExpertPlacement.contiguous(1, 2, 3)


def test_rebalance_evens_measured_loads_and_keeps_memory_even():
    rng = random.Random(0)
    loads = [[rng.paretovariate(1.2) for _ in range(16)] for _ in range(3)]
    contiguous = ExpertPlacement.contiguous(3, 16, 4)
    balanced = rebalance(loads, 4)
    assert balanced.imbalance(loads) < contiguous.imbalance(loads)
    assert balanced.imbalance(loads) <= 4 / 3 * max(1.0, _best_possible(loads, 4)) + 1e-9
    for layer in range(3):
        assert sorted(len(balanced.local_experts(layer, rank)) for rank in range(4)) == [4, 4, 4, 4]
    assert rebalance(loads, 4) == balanced  # every rank computes the same placement


def _best_possible(loads, world_size):
    """A lower bound on the imbalance: the heaviest expert alone, or a perfect split."""
    return sum(max(max(layer) * world_size / sum(layer), 1.0) for layer in loads) / len(loads)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    return {variant: str(make_tiny_hf_checkpoint(root / variant, variant)) for variant in ("qwen3_moe", "qwen2_moe")}


def _prompts(seed: int, count: int, vocab: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(5, 40))] for _ in range(count)]


def _single_process(model: str, prompts: list[list[int]], max_tokens: int, overrides: dict | None = None):
    engine = Engine(EngineConfig(model=model, num_threads=1, freeze_gc_heap=False, **(overrides or {})))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=3)
    completions = engine.generate(prompts, params)
    return [c.token_ids for c in completions], [[lp.logprob for lp in c.logprobs] for c in completions]


def _check_equal(reports, model, prompts_by_rank, max_tokens, overrides=None):
    """Each rank's output equals one process running that rank's requests alone: the same steps (dMoE blocks are
    a step's rows, so the batch must match), every expert local."""
    for rank, prompts in enumerate(prompts_by_rank):
        expected_tokens, expected_logprobs = _single_process(model, prompts, max_tokens, overrides)
        _, tokens, logprobs, stats, _ = reports[rank]
        assert tokens == expected_tokens, f"rank {rank}: greedy tokens differ"
        for got, want in zip(logprobs, expected_logprobs):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant,routing", [("qwen3_moe", {}), ("qwen2_moe", {}),
                                             ("qwen3_moe", {"moe_routing": {"block_size": 4,
                                                                            "coreset_threshold": 0.7}})])
def test_two_ranks_decode_what_one_process_decodes(moe_dirs, variant, routing):
    # Rank 1 has less work (a 16-token step budget makes rank 0 prefill its three prompts in chunks): it finishes
    # early and keeps serving its experts (idle passes) while rank 0 decodes.
    prompts_by_rank = [_prompts(1, 3), _prompts(2, 1)]
    max_tokens = 12
    routing = {**routing, "max_num_batched_tokens": 16}
    reports = run_group(moe_dirs[variant], prompts_by_rank, max_tokens, routing)
    _check_equal(reports, moe_dirs[variant], prompts_by_rank, max_tokens, routing)
    stats0, stats1 = reports[0][3], reports[1][3]
    assert stats0["world_size"] == stats1["world_size"] == 2
    assert stats0["all_to_all_bytes"] > 0 and stats1["dispatched_rows"] > 0  # experts were really remote
    assert stats1["idle_passes"] > 0 and stats0["idle_passes"] == 0
    assert stats0["busy_steps"] == stats1["busy_steps"] + stats1["idle_passes"]  # one lockstep
    owners = reports[0][4]
    assert owners == reports[1][4] and set(owners[0]) == {0, 1}


def test_rebalancing_moves_experts_without_changing_output(moe_dirs):
    prompts_by_rank = [_prompts(3, 2), _prompts(4, 2)]
    max_tokens = 16
    overrides = {"expert_parallel": {"rebalance_interval_steps": 2, "rebalance_min_gain": 0.0}}
    reports = run_group(moe_dirs["qwen3_moe"], prompts_by_rank, max_tokens, overrides)
    _check_equal(reports, moe_dirs["qwen3_moe"], prompts_by_rank, max_tokens)
    stats = reports[0][3]
    assert stats["rebalances"] >= 1 and stats["experts_moved"] >= 1, stats
    contiguous = [list(layer) for layer in ExpertPlacement.contiguous(2, 8, 2).owners]
    assert reports[0][4] != contiguous  # the placement follows the measured loads now


def test_a_lost_rank_is_an_error_not_a_hang(moe_dirs):
    # A static group cannot re-form (the cluster's roster can: tests/integration): the survivor must fail fast.
    prompts_by_rank = [_prompts(5, 2), _prompts(6, 2)]
    reports = run_group(moe_dirs["qwen3_moe"], prompts_by_rank, 40, die=(1, 3), timeout_s=120)
    assert reports[0][1] == "EPMembershipError", reports[0]
    assert "lost a member" in reports[0][2]


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _roster(clock, size=2):
    from workers.moe.roster import EPRoster

    return EPRoster(target_size=size, store_host="h", store_port=1, prefix="tier", grace_s=10.0, stale_s=5.0,
                    clock=clock)


def test_roster_forms_when_the_tier_is_complete():
    clock = _Clock()
    roster = _roster(clock)
    assert roster.join("b", -1) is None  # waits for its peer
    spec_a = roster.join("a", -1)
    spec_b = roster.join("b", -1)
    assert (spec_a.epoch, spec_a.rank, spec_a.world_size) == (0, 0, 2)
    assert (spec_b.epoch, spec_b.rank, spec_b.members) == (0, 1, ("a", "b"))
    assert not roster.change_pending(0)


def test_roster_regroups_survivors_after_the_grace_then_grows_back():
    clock = _Clock()
    roster = _roster(clock)
    roster.join("a", -1), roster.join("b", -1), roster.join("a", -1)
    # b is lost: a's collective fails and it asks for the next epoch; b never comes
    assert roster.join("a", 0) is None
    clock.now = 9.9
    assert roster.join("a", 0) is None
    clock.now = 10.0
    spec = roster.join("a", 0)
    assert (spec.epoch, spec.world_size, spec.members) == (1, 1, ("a",))
    # b's replacement arrives: a sees the change at its next handshake and both join epoch 2 together
    clock.now = 20.0
    assert roster.join("c", -1) is None
    assert roster.change_pending(1)
    spec_a = roster.join("a", 1)
    assert (spec_a.epoch, spec_a.world_size) == (2, 2)
    assert roster.join("c", -1).members == ("a", "c")


def test_roster_drops_a_member_that_died_while_waiting():
    clock = _Clock()
    roster = _roster(clock, size=3)
    roster.join("dead", -1)
    clock.now = 6.0  # "dead" stopped polling 6 s ago
    assert roster.join("a", -1) is None
    clock.now = 16.0
    assert roster.join("a", -1).members == ("a",)
