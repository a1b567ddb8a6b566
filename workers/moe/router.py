"""Expert routing policies: router logits -> each token's experts and their weights.

One interface, one small class per rule, picked from the model's MoEConfig:

* ``SoftmaxTopK``     - softmax over all experts, the top k, optionally renormalised to sum to 1 (Mixtral,
  Qwen2-MoE, Qwen3-MoE, OLMoE).
* ``SigmoidGroupTopK`` - DeepSeek-V3: sigmoid scores; a per-expert bias steers the selection only (the weights come
  from the unbiased scores); experts sit in groups and only the best `topk_groups` groups (by their two best
  biased scores) may be chosen; weights optionally renormalised, then scaled by `routed_scaling_factor`.
* ``BlockCoresetRouter`` - dMoE (arXiv 2605.30876) around either: per block of consecutive tokens, each expert's
  summed top-k weight; the block keeps the smallest set of experts (its coreset) holding `threshold` of that
  mass, and every token of the block takes its top-k inside the coreset (weights as the inner rule gives them).

Every rule is two steps: ``scores`` (what the top-k is taken over, and what the weights are read from) and
``finish`` (renormalise, scale), so a wrapper can change the choice without touching the weighting.

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


class _TopKRule:
    """route = the top k of `scores`' choice, weights read from its weights and `finish`ed."""

    top_k: int

    def scores(self, logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (choice [T, X]: the top-k is taken over it, weights [T, X]: a chosen expert's weight before finish)."""
        raise NotImplementedError

    def finish(self, weights: torch.Tensor) -> torch.Tensor:
        return weights

    def route(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        choice, weights = self.scores(logits, bias)
        expert_ids = choice.topk(self.top_k, dim=-1).indices
        return self.finish(weights.gather(1, expert_ids)), expert_ids


@dataclass(frozen=True)
class SoftmaxTopK(_TopKRule):
    top_k: int
    renormalize: bool

    def scores(self, logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits.float(), dim=-1)
        return probs, probs

    def finish(self, weights: torch.Tensor) -> torch.Tensor:
        return weights / weights.sum(dim=-1, keepdim=True) if self.renormalize else weights


@dataclass(frozen=True)
class SigmoidGroupTopK(_TopKRule):
    top_k: int
    num_groups: int
    topk_groups: int
    routed_scaling_factor: float
    renormalize: bool

    def scores(self, logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
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
        return choice, scores

    def finish(self, weights: torch.Tensor) -> torch.Tensor:
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor


@dataclass(frozen=True)
class BlockCoresetRouter:
    """dMoE block routing around an inner top-k rule. Blocks are `block_size` consecutive rows of the step (a
    prefill chunk's tokens, a decode batch, a verification tree)."""

    inner: SoftmaxTopK | SigmoidGroupTopK
    block_size: int = 32
    threshold: float = 0.9

    @property
    def top_k(self) -> int:
        return self.inner.top_k

    def coreset(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """[T, X] bool: the experts each token's block keeps."""
        choice, weights = self.inner.scores(logits, bias)
        num_tokens, num_experts = choice.shape
        expert_ids = choice.topk(self.top_k, dim=-1).indices  # [T, k] the free choice
        block = torch.arange(num_tokens, device=logits.device) // self.block_size  # [T]
        num_blocks = int(block[-1]) + 1 if num_tokens else 0
        mass = torch.zeros(num_blocks, num_experts, dtype=torch.float32, device=logits.device)
        mass.index_put_((block[:, None].expand_as(expert_ids), expert_ids), weights.gather(1, expert_ids),
                        accumulate=True)  # [blocks, X] each expert's summed top-k weight in the block
        ordered, order = mass.sort(dim=1, descending=True)
        before = ordered.cumsum(dim=1) - ordered  # mass of the experts ranked above
        keep_ranked = before < self.threshold * ordered.sum(dim=1, keepdim=True)
        keep_ranked[:, :self.top_k] = True  # a token always has k experts to take
        keep = torch.zeros_like(keep_ranked).scatter_(1, order, keep_ranked)
        return keep[block]

    def route(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        choice, weights = self.inner.scores(logits, bias)
        allowed = self.coreset(logits, bias)
        expert_ids = choice.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1).indices
        return self.inner.finish(weights.gather(1, expert_ids)), expert_ids


def distinct_experts_per_block(expert_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """expert_ids [T, k] -> [blocks] how many distinct experts each block of block_size rows uses."""
    return torch.tensor([len(set(expert_ids[start:start + block_size].flatten().tolist()))
                         for start in range(0, expert_ids.shape[0], block_size)])


def make_router(moe: MoEConfig) -> SoftmaxTopK | SigmoidGroupTopK:
    if moe.scoring == "sigmoid":
        return SigmoidGroupTopK(moe.top_k, moe.num_groups, moe.topk_groups, moe.routed_scaling_factor, moe.renormalize)
    return SoftmaxTopK(moe.top_k, moe.renormalize)
