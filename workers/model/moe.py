"""A routed mixture of experts where a dense MLP stands (Mixtral, Qwen2-MoE, Qwen3-MoE; DeepSeek-V3-style routing).

The router is a linear layer to one logit per expert; the routing rule is a policy (workers/moe/router.py); the
experts' weights are stacked ([X, 2I, E] gate/up, [X, E, I] down) and run as one grouped GEMM (kernels/moe.py). A
shared expert (Qwen2-MoE) sees every token, scaled by a sigmoid gate.

# T=tokens, E=hidden size, X=experts, I=expert intermediate size, k=experts per token
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.fused_ops import silu_mul
from kernels.moe import fused_moe
from workers.model.config import ModelConfig
from workers.moe.router import BlockCoresetRouter, make_router


class DenseMLP(nn.Module):
    """SwiGLU MLP with gate and up fused into one matmul (a dense layer's MLP, or a shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.shard_sizes = (intermediate_size, intermediate_size)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(hidden)))  # [T, 2I] -> [T, I] -> [T, E]


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        assert moe is not None
        self.top_k = moe.top_k
        self.policy = make_router(moe)
        self.stats = MoEStats(moe.num_experts)
        self.router = nn.Linear(config.hidden_size, moe.num_experts, bias=False)  # HF: `gate`
        self.experts_gate_up = nn.Parameter(torch.empty(moe.num_experts, 2 * moe.expert_intermediate_size,
                                                        config.hidden_size), requires_grad=False)
        self.experts_down = nn.Parameter(torch.empty(moe.num_experts, config.hidden_size,
                                                     moe.expert_intermediate_size), requires_grad=False)
        # DeepSeek-V3: a per-expert bias on the selection scores (HF: gate.e_score_correction_bias)
        self.score_bias = (nn.Parameter(torch.zeros(moe.num_experts), requires_grad=False)
                           if moe.scoring == "sigmoid" else None)
        self.shared_expert = (DenseMLP(config.hidden_size, moe.shared_intermediate_size)
                              if moe.shared_intermediate_size else None)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if moe.shared_expert_gate else None
        # Expert-parallel (workers/moe/expert_parallel.py): the stacks hold this rank's experts only and this
        # runs dispatch / local experts / combine; None = every expert here.
        self.expert_parallel = None

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, E] -> (weights [T, k] float32, expert ids [T, k])."""
        return self.policy.route(self.router(hidden).float(), self.score_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.route(hidden)
        self.stats.add(expert_ids, self.policy.block_size if isinstance(self.policy, BlockCoresetRouter) else 32)
        if self.expert_parallel is not None:
            out = self.expert_parallel.run(hidden, weights, expert_ids, self.experts_gate_up, self.experts_down)
        else:
            out = fused_moe(hidden, self.experts_gate_up, self.experts_down, weights, expert_ids)
        out = out.to(hidden.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
            out += shared
        return out


class MoEStats:
    """What one MoE layer's router did, lifetime: tokens routed per expert (the load an expert-placement balancer
    reads), and distinct experts per block of consecutive rows (dMoE's measure: fewer means fewer expert weights
    read and, expert-parallel, less all-to-all traffic)."""

    def __init__(self, num_experts: int):
        self.expert_tokens = torch.zeros(num_experts, dtype=torch.long, device="cpu")  # (the model is built on meta)
        self.num_blocks = 0
        self.distinct_experts = 0  # summed over blocks

    def add(self, expert_ids: torch.Tensor, block_size: int) -> None:
        num_tokens = expert_ids.shape[0]
        if not num_tokens:
            return
        ids = expert_ids.detach().cpu()
        self.expert_tokens += torch.bincount(ids.flatten(), minlength=self.expert_tokens.numel())
        blocks = (torch.arange(num_tokens) // block_size)[:, None].expand_as(ids)
        used = torch.zeros(int(blocks[-1, 0]) + 1, self.expert_tokens.numel(), dtype=torch.bool)
        used[blocks, ids] = True
        self.num_blocks += used.shape[0]
        self.distinct_experts += int(used.sum())

    @property
    def mean_distinct_experts_per_block(self) -> float:
        return self.distinct_experts / self.num_blocks if self.num_blocks else 0.0


def set_block_routing(model: nn.Module, block_size: int, threshold: float) -> None:
    """Every MoE layer of the model routes in dMoE blocks (block_size > 0) or freely (0)."""
    for module in model.modules():
        if isinstance(module, SparseMoE):
            inner = module.policy.inner if isinstance(module.policy, BlockCoresetRouter) else module.policy
            module.policy = BlockCoresetRouter(inner, block_size, threshold) if block_size else inner


def moe_stats(model: nn.Module) -> list[MoEStats]:
    return [module.stats for module in model.modules() if isinstance(module, SparseMoE)]
