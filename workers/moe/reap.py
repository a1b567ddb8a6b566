# T=tokens, E=hidden size, X=experts, X'=kept experts, k=experts per token
"""Expert pruning: REAP (arXiv 2510.13999) and the baselines it is measured against.

* REAP saliency of expert j: the mean over the tokens routed to it of gate_j(x) * ||f_j(x)||, its routed output's
  norm: an expert that is rarely chosen, or contributes little when chosen, goes first.
* frequency: how many tokens choose it. random: a seeded draw.

Each keeps the same number of experts per layer; the router keeps the kept experts' rows. A router whose top-k
weights are not renormalised (softmax over all experts, Qwen2-MoE's default) would give every kept expert a
larger share once the others are gone (softmax over fewer logits): the kept experts' down projections are scaled
by 1 - m, m the probability mass the pruned experts held on average over the calibration tokens, so the layer's
expected output scale stays. Renormalised routers need no correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.model.loader import LoadedModel
from workers.model.moe import SparseMoE
from workers.moe.router import SoftmaxTopK

METHODS = ("reap", "frequency", "random")


@dataclass(frozen=True)
class ExpertStats:
    counts: torch.Tensor  # [X] tokens routed to each expert
    saliency: torch.Tensor  # [X] REAP: mean gate * routed output norm over its tokens (0 for unused experts)
    mass: torch.Tensor  # [X] mean router probability over all tokens


def sparse_blocks(loaded: LoadedModel) -> list[tuple[int, SparseMoE]]:
    return [(index, layer.mlp) for index, layer in enumerate(loaded.model.layers) if isinstance(layer.mlp, SparseMoE)]


def observe_sparse_blocks(loaded: LoadedModel, windows: list[list[int]], observe) -> None:
    """Run the windows through the model; observe(layer index, block, hidden [T, E]) sees every sparse block's
    input on the way."""
    from workers.moe.moefy import window_logits

    hooks = [block.register_forward_pre_hook(lambda module, args, index=index: observe(index, module, args[0]))
             for index, block in sparse_blocks(loaded)]
    try:
        for window in windows:
            window_logits(loaded, window)
    finally:
        for hook in hooks:
            hook.remove()


def collect_expert_stats(loaded: LoadedModel, windows: list[list[int]]) -> dict[int, ExpertStats]:
    """Run the windows; per sparse layer, what each expert did."""
    sums = {index: {"counts": torch.zeros(block.experts_down.shape[0]),
                    "saliency": torch.zeros(block.experts_down.shape[0]),
                    "mass": torch.zeros(block.experts_down.shape[0]), "tokens": 0}
            for index, block in sparse_blocks(loaded)}

    def observe(index: int, module: SparseMoE, hidden: torch.Tensor) -> None:
        hidden = hidden.float()
        logits = module.router(hidden).float()
        weights, expert_ids = module.route(hidden)
        entry = sums[index]
        entry["mass"] += torch.softmax(logits, dim=-1).sum(dim=0)
        entry["tokens"] += hidden.shape[0]
        for slot in range(expert_ids.shape[1]):
            for expert in expert_ids[:, slot].unique().tolist():
                rows = (expert_ids[:, slot] == expert).nonzero().squeeze(1)
                gate, up = (hidden[rows] @ module.experts_gate_up[expert].float().t()).chunk(2, dim=-1)
                norms = ((F.silu(gate) * up) @ module.experts_down[expert].float().t()).norm(dim=1)
                entry["counts"][expert] += rows.numel()
                entry["saliency"][expert] += (weights[rows, slot] * norms).sum()

    observe_sparse_blocks(loaded, windows, observe)
    return {index: ExpertStats(counts=entry["counts"], saliency=entry["saliency"] / entry["counts"].clamp_min(1),
                               mass=entry["mass"] / max(entry["tokens"], 1))
            for index, entry in sums.items()}


def choose_experts(stats: dict[int, ExpertStats], keep_fraction: float, method: str, seed: int = 0
                   ) -> dict[int, torch.Tensor]:
    """Per sparse layer, the kept expert ids (sorted), the same count in every layer."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; one of {METHODS}")
    generator = torch.Generator().manual_seed(seed)
    kept = {}
    for index, layer_stats in stats.items():
        num_experts = layer_stats.counts.shape[0]
        num_kept = max(1, round(keep_fraction * num_experts))
        if method == "reap":
            score = layer_stats.saliency
        elif method == "frequency":
            score = layer_stats.counts
        else:
            score = torch.rand(num_experts, generator=generator)
        kept[index] = torch.argsort(score, descending=True)[:num_kept].sort().values
    return kept


def down_scale(block: SparseMoE, layer_stats: ExpertStats, kept: torch.Tensor) -> float:
    """The factor the kept experts' down projections take (see the module doc)."""
    policy = block.policy
    if isinstance(policy, SoftmaxTopK) and not policy.renormalize:
        return float(layer_stats.mass[kept].sum())  # 1 - the pruned experts' mean mass
    return 1.0


def prune_in_place(loaded: LoadedModel, kept: dict[int, torch.Tensor], stats: dict[int, ExpertStats]) -> None:
    """Drop every expert not kept from the loaded model (router rows, expert weights), scaling as the doc says."""
    for index, block in sparse_blocks(loaded):
        ids = kept[index]
        scale = down_scale(block, stats[index], ids)
        block.router.weight = torch.nn.Parameter(block.router.weight.data[ids].clone(), requires_grad=False)
        block.router.out_features = ids.numel()
        block.experts_gate_up = torch.nn.Parameter(block.experts_gate_up.data[ids].clone(), requires_grad=False)
        block.experts_down = torch.nn.Parameter(block.experts_down.data[ids].clone() * scale, requires_grad=False)
        if block.score_bias is not None:
            block.score_bias = torch.nn.Parameter(block.score_bias.data[ids].clone(), requires_grad=False)
        policy = block.policy
        if policy.top_k > ids.numel():
            block.policy = type(policy)(**{**policy.__dict__, "top_k": ids.numel()})


def prune_checkpoint(source_dir: str, target_dir: str, kept: dict[int, torch.Tensor], scales: dict[int, float]
                     ) -> None:
    """The same pruning on an HF checkpoint (per-expert tensors renumbered 0..X'-1), config updated."""
    import json
    import os
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(target_dir, exist_ok=True)
    for name in os.listdir(source_dir):
        if not name.endswith(".safetensors") and os.path.isfile(os.path.join(source_dir, name)):
            shutil.copy(os.path.join(source_dir, name), os.path.join(target_dir, name))
    tensors = {}
    for name in sorted(os.listdir(source_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(source_dir, name)))
    renumber = {layer: {int(old): new for new, old in enumerate(ids.tolist())} for layer, ids in kept.items()}
    expert_name = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
    router_name = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.gate\.(weight|e_score_correction_bias)$")
    pruned = {}
    for name, tensor in tensors.items():
        match = expert_name.match(name)
        if match and int(match.group(1)) in renumber:
            layer, expert, projection = int(match.group(1)), int(match.group(3)), match.group(4)
            if expert not in renumber[layer]:
                continue
            new_name = f"model.layers.{layer}.{match.group(2)}.experts.{renumber[layer][expert]}.{projection}.weight"
            pruned[new_name] = tensor * scales[layer] if projection in ("down_proj", "w2") else tensor
            continue
        match = router_name.match(name)
        if match and int(match.group(1)) in kept:
            pruned[name] = tensor[kept[int(match.group(1))]].contiguous()
            continue
        pruned[name] = tensor
    save_file(pruned, os.path.join(target_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(source_dir, "config.json")) as f:
        config = json.load(f)
    num_kept = len(next(iter(kept.values())))
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in config:
            config[key] = num_kept
    config["num_experts_per_tok"] = min(config["num_experts_per_tok"], num_kept)
    with open(os.path.join(target_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
