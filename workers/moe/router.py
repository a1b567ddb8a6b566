"""Expert routing policies: router logits -> each token's experts and their weights.

One interface, one small class per rule, picked from the model's MoEConfig:

* ``SoftmaxTopK``     - softmax over all experts, the top k, optionally renormalised to sum to 1 (Mixtral,
  Qwen2-MoE, Qwen3-MoE, OLMoE).
* ``SigmoidGroupTopK`` - DeepSeek-V3: sigmoid scores; a per-expert bias steers the selection only (the weights come
  from the unbiased scores); experts sit in groups and only the best `topk_groups` groups (by their two best
  biased scores) may be chosen; weights optionally renormalised, then scaled by `routed_scaling_factor`.

# T=tokens, X=experts, k=experts per token, Gx=expert groups
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from workers.model.config import MoEConfig


class ExpertRouter(Protocol):
    top_k: int

    def route(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, X] float32 -> (weights [T, k] float32, expert ids [T, k] int64)."""
        ...


@dataclass(frozen=True)
class SoftmaxTopK:
    top_k: int
    renormalize: bool

    def route(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits.float(), dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, expert_ids


@dataclass(frozen=True)
class SigmoidGroupTopK:
    top_k: int
    num_groups: int
    topk_groups: int
    routed_scaling_factor: float
    renormalize: bool

    def route(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(logits.float())  # [T, X]
        choice = scores + bias.float() if bias is not None else scores
        num_tokens, num_experts = choice.shape
        if self.topk_groups < self.num_groups:
            # a group is worth its two best (biased) scores; experts outside the best groups cannot be chosen
            grouped = choice.view(num_tokens, self.num_groups, num_experts // self.num_groups)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, Gx]
            kept = group_scores.topk(self.topk_groups, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(num_experts // self.num_groups, dim=1), 0.0)
        expert_ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, expert_ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, expert_ids


def make_router(moe: MoEConfig) -> SoftmaxTopK | SigmoidGroupTopK:
    if moe.scoring == "sigmoid":
        return SigmoidGroupTopK(moe.top_k, moe.num_groups, moe.topk_groups, moe.routed_scaling_factor, moe.renormalize)
    return SoftmaxTopK(moe.top_k, moe.renormalize)
