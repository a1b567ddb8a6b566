"""dMoE block routing and expert pruning (REAP, frequency, random) on tiny MoE checkpoints: the coreset rule's edge
cases, pruning in memory equal to the pruned checkpoint (ours and transformers'), and the two commands."""

import json

import pytest
import torch

from tests.checkpoints import make_tiny_hf_checkpoint
from workers.moe.router import BlockCoresetRouter, SoftmaxTopK, distinct_experts_per_block


def test_block_coreset_keeps_the_free_choice_at_full_mass_and_k_experts_at_none():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(70, 16, generator=gen) * 2
    inner = SoftmaxTopK(top_k=3, renormalize=False)
    free_weights, free_ids = inner.route(logits)
    weights, ids = BlockCoresetRouter(inner, block_size=32, threshold=1.0).route(logits)
    assert torch.equal(ids.sort(dim=1).values, free_ids.sort(dim=1).values)
    torch.testing.assert_close(weights.sort(dim=1).values, free_weights.sort(dim=1).values)
    _, narrow = BlockCoresetRouter(inner, block_size=32, threshold=1e-9).route(logits)
    assert distinct_experts_per_block(narrow, 32).tolist() == [3, 3, 3]  # the block's top-3 only
    free = distinct_experts_per_block(free_ids, 32).float().mean()
    _, mid = BlockCoresetRouter(inner, block_size=32, threshold=0.6).route(logits)
    assert 3 <= distinct_experts_per_block(mid, 32).float().mean() < free
    # a token's weights are still its own probabilities of the experts it takes
    probs = torch.softmax(logits, dim=-1)
    mid_weights, mid_ids = BlockCoresetRouter(inner, block_size=32, threshold=0.6).route(logits)
    torch.testing.assert_close(mid_weights, probs.gather(1, mid_ids))


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])
def tiny_moe(request, tmp_path_factory):
    from workers.model.loader import load_model

    model_dir = make_tiny_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return model_dir, load_model(str(model_dir), dtype=torch.float32)


def windows_for(loaded, count, length, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, loaded.config.vocab_size, (length,), generator=gen).tolist() for _ in range(count)]


@pytest.mark.parametrize("method", ["reap", "frequency", "random"])
def test_pruning_in_memory_is_the_pruned_checkpoint(tiny_moe, tmp_path, method):
    import copy

    from transformers import AutoModelForCausalLM

    from workers.model.loader import load_model
    from workers.moe.moefy import window_logits
    from workers.moe.reap import (choose_experts, collect_expert_stats, down_scale, prune_checkpoint, prune_in_place,
                                  sparse_blocks)

    model_dir, loaded = tiny_moe
    stats = collect_expert_stats(loaded, windows_for(loaded, 3, 40, seed=1))
    num_experts = loaded.config.moe.num_experts
    for layer_stats in stats.values():
        assert layer_stats.counts.sum() == 3 * 40 * loaded.config.moe.top_k
        torch.testing.assert_close(layer_stats.mass.sum(), torch.tensor(1.0))
    kept = choose_experts(stats, 0.5, method, seed=3)
    assert all(len(ids) == num_experts // 2 for ids in kept.values())
    if method == "reap":
        for index, ids in kept.items():
            dropped = [e for e in range(num_experts) if e not in ids.tolist()]
            assert stats[index].saliency[ids].min() >= stats[index].saliency[dropped].max()
    scales = {index: down_scale(block, stats[index], kept[index]) for index, block in sparse_blocks(loaded)}
    renormalised = loaded.config.moe.renormalize
    assert all((scale == 1.0) == renormalised for scale in scales.values())
    pruned = copy.deepcopy(loaded)
    prune_in_place(pruned, kept, stats)
    prune_checkpoint(str(model_dir), str(tmp_path / "pruned"), kept, scales)
    from_disk = load_model(str(tmp_path / "pruned"), dtype=torch.float32)
    assert from_disk.config.moe.num_experts == num_experts // 2
    probe = windows_for(loaded, 1, 30, seed=2)[0]
    ours = window_logits(pruned, probe)
    torch.testing.assert_close(window_logits(from_disk, probe), ours, rtol=0, atol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([probe])).logits[0], ours, rtol=0, atol=1e-4)


def test_prune_experts_and_eval_moe_commands(tiny_moe, tmp_path, capsys):
    from cluster.cli import main

    model_dir, _ = tiny_moe
    assert main(["prune-experts", "--model", str(model_dir), "--out", str(tmp_path / "p"), "--keep", "0.5",
                 "--calibration-windows", "2", "--window", "64"]) == 0
    assert "kept" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    assert main(["eval", "moe", "--model", str(model_dir), "--moe-window", "64", "--moe-eval-windows", "2",
                 "--moe-calibration-windows", "2", "--moe-coreset-thresholds", "0.5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["routing"].split()[0] for row in rows] == ["as", "dMoE", "reap", "frequency", "random"]
    assert rows[1]["distinct_experts_per_block"] <= rows[0]["distinct_experts_per_block"]
    assert all(row["perplexity"] > 1 for row in rows)


def test_engine_routes_in_dmoe_blocks_when_configured_and_counts_distinct_experts(tiny_moe):
    from tests.unit.test_engine import GREEDY, assert_no_blocks_held, random_prompts
    from workers.config import EngineConfig, MoERoutingConfig
    from workers.engine import Engine
    from workers.model.moe import SparseMoE, set_block_routing

    model_dir, loaded = tiny_moe
    prompts = random_prompts(4, seed=50, min_len=30, max_len=40)
    base = dict(model=str(model_dir), block_size=4, num_kv_blocks=128, max_num_batched_tokens=64)
    try:
        free = Engine(EngineConfig(**base), loaded=loaded)
        free.generate(prompts, GREEDY)
        free_distinct = free.moe_stats()["distinct_experts_per_block"]
        blocked = Engine(EngineConfig(**base, moe_routing=MoERoutingConfig(block_size=32, coreset_threshold=0.3)),
                         loaded=loaded)
        assert all(isinstance(m.policy.inner, SoftmaxTopK) for m in loaded.model.modules() if isinstance(m, SparseMoE))
        for module in loaded.model.modules():
            if isinstance(module, SparseMoE):
                module.stats = type(module.stats)(module.experts_down.shape[0])
        completions = blocked.generate(prompts, GREEDY)
        assert all(len(c.token_ids) > 0 for c in completions)
        assert blocked.moe_stats()["distinct_experts_per_block"] < free_distinct
        assert 0 < blocked.moe_stats()["busiest_expert_share"] <= 1
        assert_no_blocks_held(blocked)
    finally:
        set_block_routing(loaded.model, 0, 0.9)  # the module-scoped model routes freely again
