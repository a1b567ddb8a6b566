"""MoE building blocks: the grouped expert GEMM against its token-by-token reference, the routing rules against
their plain statements, expert checkpoints loading (and refusing) by name, and an MoE model serving through the
engine (tiny random Mixtral / Qwen2-MoE / Qwen3-MoE checkpoints; their logits against transformers are in
tests/reference/test_tiny_checkpoints.py)."""

import pytest
import torch

from kernels.moe import grouped_moe, reference_moe
from tests.checkpoints import make_tiny_hf_checkpoint
from workers.model.config import MoEConfig, UnsupportedModelError
from workers.moe.router import SigmoidGroupTopK, SoftmaxTopK, make_router


def random_moe_inputs(num_tokens: int, hidden: int, num_experts: int, intermediate: int, top_k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) * 0.2
    down = torch.randn(num_experts, hidden, intermediate, generator=gen) * 0.2
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2
    weights, expert_ids = SoftmaxTopK(top_k, renormalize=True).route(logits)
    return x, gate_up, down, weights, expert_ids


@pytest.mark.parametrize("num_tokens,hidden,num_experts,intermediate,top_k,seed", [
    (1, 16, 4, 8, 1, 0),  # one decode row, one expert
    (37, 32, 8, 24, 2, 1),
    (64, 24, 16, 12, 4, 2),  # fine-grained: some experts get no token
    (5, 8, 3, 4, 3, 3),  # every expert for every token
])
def test_grouped_moe_matches_the_token_by_token_reference(num_tokens, hidden, num_experts, intermediate, top_k, seed):
    inputs = random_moe_inputs(num_tokens, hidden, num_experts, intermediate, top_k, seed)
    torch.testing.assert_close(grouped_moe(*inputs), reference_moe(*inputs), rtol=1e-5, atol=1e-5)


def test_grouped_moe_skips_experts_without_tokens_and_keeps_token_order():
    x, gate_up, down, weights, _ = random_moe_inputs(6, 16, 5, 8, 2, seed=4)
    expert_ids = torch.tensor([[3, 1]] * 6)  # experts 0, 2, 4 idle
    out = grouped_moe(x, gate_up, down, weights, expert_ids)
    gate_up[[0, 2, 4]] = float("nan")  # never read
    torch.testing.assert_close(grouped_moe(x, gate_up, down, weights, expert_ids), out)
    torch.testing.assert_close(out, reference_moe(x, gate_up, down, weights, expert_ids), rtol=1e-5, atol=1e-5)


def test_softmax_top_k_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = SoftmaxTopK(2, renormalize=False).route(logits)
    probs = torch.softmax(logits, dim=-1)[0]
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights[0], probs[:2])
    weights, _ = SoftmaxTopK(2, renormalize=True).route(logits)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def sigmoid_group_reference(logits, bias, top_k, num_groups, topk_groups, scale):
    """DeepSeek-V3's rule, token by token, in plain Python lists."""
    weights, ids = [], []
    for row in range(logits.shape[0]):
        scores = torch.sigmoid(logits[row]).tolist()
        choice = [s + b for s, b in zip(scores, bias.tolist())]
        size = len(scores) // num_groups
        group_value = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(num_groups)]
        kept = sorted(range(num_groups), key=lambda g: -group_value[g])[:topk_groups]
        allowed = [choice[e] if e // size in kept else 0.0 for e in range(len(scores))]
        chosen = sorted(range(len(scores)), key=lambda e: -allowed[e])[:top_k]
        raw = [scores[e] for e in chosen]
        total = sum(raw)
        weights.append([w / total * scale for w in raw])
        ids.append(chosen)
    return torch.tensor(weights), torch.tensor(ids)


def test_sigmoid_group_routing_is_deepseek_v3s_rule():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(20, 16, generator=gen)
    bias = torch.randn(16, generator=gen) * 0.5
    router = SigmoidGroupTopK(top_k=4, num_groups=4, topk_groups=2, routed_scaling_factor=2.5, renormalize=True)
    weights, ids = router.route(logits, bias)
    expected_weights, expected_ids = sigmoid_group_reference(logits, bias, 4, 4, 2, 2.5)
    order, expected_order = ids.sort(dim=-1), expected_ids.sort(dim=-1)
    assert torch.equal(order.values, expected_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), expected_weights.gather(1, expected_order.indices))
    # the bias steers the choice, never the weights: the weights are the unbiased sigmoid scores, renormalised
    groups = ids // 4
    assert all(len(set(row)) <= 2 for row in groups.tolist())


def test_moe_config_refuses_impossible_routing():
    with pytest.raises(UnsupportedModelError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5, expert_intermediate_size=8, sparse_layers=(0,))
    with pytest.raises(UnsupportedModelError, match="groups"):
        MoEConfig(num_experts=6, top_k=2, expert_intermediate_size=8, sparse_layers=(0,), num_groups=4)
    assert isinstance(make_router(MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=8, sparse_layers=(0,),
                                            scoring="sigmoid", num_groups=2)), SigmoidGroupTopK)


def test_a_checkpoint_missing_an_expert_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from workers.model.loader import load_model

    model_dir = make_tiny_hf_checkpoint(tmp_path / "qwen3_moe", "qwen3_moe")
    weights = load_file(str(model_dir / "model.safetensors"))
    del weights["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(weights, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.1\.mlp\.experts_gate_up@5#1"):
        load_model(str(model_dir), dtype=torch.float32)


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_models_serve_through_the_engine(tmp_path, variant):
    """Batched, chunked, paged: each prompt's greedy tokens equal its own single run, and no block is left."""
    from tests.unit.test_engine import GREEDY, assert_no_blocks_held, random_prompts
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.model.loader import load_model

    model_dir = make_tiny_hf_checkpoint(tmp_path / variant, variant)
    loaded = load_model(str(model_dir), dtype=torch.float32)
    prompts = random_prompts(5, seed=40)
    config = EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=128, max_num_batched_tokens=16)
    alone = [Engine(config, loaded=loaded).generate([prompt], GREEDY)[0].token_ids for prompt in prompts]
    engine = Engine(config, loaded=loaded)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == alone
    assert_no_blocks_held(engine)


def with_empty_slots(expert_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """A third of the slots at random set to -1 (expert-parallel: experts held by another rank)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(expert_ids.shape, generator=gen) < 0.33, -1, expert_ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_moe_skips_empty_slots(seed):
    x, gate_up, down, weights, expert_ids = random_moe_inputs(23, 32, 8, 16, 4, seed)
    ids = with_empty_slots(expert_ids, seed)
    expected = reference_moe(x, gate_up, down, torch.where(ids < 0, 0.0, weights), expert_ids.clamp(min=0))
    torch.testing.assert_close(grouped_moe(x, gate_up, down, weights, ids), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference_moe(x, gate_up, down, weights, ids), expected, rtol=1e-5, atol=1e-5)
    all_empty = torch.full_like(ids, -1)
    assert not grouped_moe(x, gate_up, down, weights, all_empty).any()
