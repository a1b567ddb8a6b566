"""MoEfication (workers/moe/moefy.py) on a tiny dense checkpoint: balanced clusters, a checkpoint that transformers
and tierserve both load to the same logits, which with every expert on is the dense model itself, and tuning that
brings a cut layer closer to the dense one."""

import pytest
import torch

from tests.checkpoints import make_tiny_hf_checkpoint
from workers.moe.moefy import (ConvertedMLP, MoefyConfig, balanced_kmeans, capture_mlp_input, mlp_weights,
                               split_layer, window_logits, write_checkpoint)


def test_balanced_kmeans_fills_every_cluster_exactly_and_keeps_twins_together():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=gen)
    points = torch.cat([base, base + 0.01 * torch.randn(8, 16, generator=gen)])  # each point has a near twin
    points = points / points.norm(dim=1, keepdim=True)
    assignment = balanced_kmeans(points, 8, iterations=10, seed=0)
    assert torch.bincount(assignment, minlength=8).tolist() == [2] * 8
    assert sum(int(assignment[i] == assignment[i + 8]) for i in range(8)) >= 6


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from workers.model.loader import load_model

    model_dir = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("dense"), "llama-untied")
    return load_model(str(model_dir), dtype=torch.float32)


def windows_for(loaded, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, loaded.config.vocab_size, (length,), generator=gen).tolist() for _ in range(count)]


def convert(dense, config: MoefyConfig, windows):
    splits = []
    originals = [layer.mlp for layer in dense.model.layers]
    try:
        for index, layer in enumerate(dense.model.layers):
            split = split_layer(capture_mlp_input(dense, windows, index), *mlp_weights(layer.mlp), config)
            splits.append(split)
            layer.mlp = ConvertedMLP(split, config)
    finally:
        for layer, mlp in zip(dense.model.layers, originals):
            layer.mlp = mlp
    return splits


def test_every_expert_on_is_the_dense_model_and_transformers_agrees(dense, tmp_path):
    from transformers import AutoModelForCausalLM

    from workers.model.loader import load_model

    # 128 neurons: 16 shared + 8 experts of 14; top-8 of 8 = every neuron, untuned
    config = MoefyConfig(num_experts=8, top_k=8, shared_neurons=16, router_steps=20, tune_steps=0,
                         profile_tokens=256)
    windows = windows_for(dense, 4, 32, seed=1)
    splits = convert(dense, config, windows)
    write_checkpoint(dense, splits, config, str(tmp_path / "moe"))
    moe = load_model(str(tmp_path / "moe"), dtype=torch.float32)
    assert moe.config.architecture == "qwen2_moe" and moe.config.moe.num_experts == 8
    assert moe.config.moe.shared_intermediate_size == 16 and moe.config.moe.expert_intermediate_size == 14
    probe = windows_for(dense, 1, 40, seed=2)[0]
    ours = window_logits(moe, probe)
    dense_logits = window_logits(dense, probe)
    # the temperature leaves each expert's weight 1 to within ~1e-3
    assert (ours - dense_logits).abs().max() < 2e-2 * dense_logits.abs().max()
    # (experts of 14 fp32 rows: transformers' default grouped GEMM wants 16-byte strides, so its eager experts)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32,
                                              experts_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([probe])).logits[0]
    assert (ours - theirs).abs().max() < 1e-4
    assert moe.tokenizer.encode("hello world") == dense.tokenizer.encode("hello world")


def test_tuning_brings_a_cut_layer_closer_to_the_dense_one(dense):
    config = MoefyConfig(num_experts=8, top_k=2, shared_neurons=16, router_steps=50, tune_steps=150,
                         profile_tokens=256)
    windows = windows_for(dense, 6, 32, seed=3)
    layer = dense.model.layers[0]
    split = split_layer(capture_mlp_input(dense, windows, 0), *mlp_weights(layer.mlp), config)
    assert split.error_after < 0.8 * split.error_before
    assert split.experts_gate_up.shape == (8, 28, 64) and split.experts_down.shape == (8, 64, 14)
    assert 0 < split.kept_worth <= 1 and 0 <= split.router_top1 <= 1


def test_confident_weighting_keeps_the_router_in_the_checkpoint(dense, tmp_path):
    """The confident recipe: renormalised top-k weights in the checkpoint (transformers and ours agree, and the
    converted layers in memory are what the checkpoint computes), router logits as trained."""
    from transformers import AutoModelForCausalLM

    from workers.model.loader import load_model

    config = MoefyConfig(num_experts=8, top_k=2, shared_neurons=16, router_steps=50, tune_steps=40,
                         profile_tokens=256, router_weighting="confident")
    windows = windows_for(dense, 4, 32, seed=5)
    splits = convert(dense, config, windows)
    write_checkpoint(dense, splits, config, str(tmp_path / "moe"))
    moe = load_model(str(tmp_path / "moe"), dtype=torch.float32)
    assert moe.config.moe.renormalize and moe.config.moe.top_k == 2
    probe = windows_for(dense, 1, 24, seed=6)[0]
    ours = window_logits(moe, probe)
    originals = [layer.mlp for layer in dense.model.layers]
    try:
        for layer, split in zip(dense.model.layers, splits):
            layer.mlp = ConvertedMLP(split, config)
        in_memory = window_logits(dense, probe)
    finally:
        for layer, mlp in zip(dense.model.layers, originals):
            layer.mlp = mlp
    torch.testing.assert_close(ours, in_memory, rtol=0, atol=1e-4)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32,
                                              experts_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(torch.tensor([probe])).logits[0] - ours).abs().max() < 1e-4
    assert all(split.error_after < split.error_before for split in splits)
