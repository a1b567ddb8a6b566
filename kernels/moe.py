# T=tokens, E=hidden size, X=experts, I=expert intermediate size, k=experts per token, R=T*k routed rows
"""The fused MoE layer's expert part: out[t] = sum_j w[t, j] * down[x] @ silu_mul(gate_up[x] @ hidden[t]), x =
ids[t, j].

* ``reference_moe`` - the spec: token by token, expert by expert, in float32.
* ``grouped_moe``   - the fast path: the T*k (token, expert) rows sorted by expert, each expert's rows gathered into
  one contiguous block and multiplied once (a grouped GEMM: two matmuls per expert that has tokens, none for
  the others), results weighted and scattered back with one index_add. Its float32 sums run in another order
  than the reference's, so the two agree to rounding.
* ``fused_moe``     - the dispatcher the model calls.

Weights are stacked per expert: gate_up [X, 2I, E] (gate rows first), down [X, E, I], Hugging Face's fused layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(hidden, gate_up, down, weights, expert_ids) -> None:
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, hidden_in = gate_up.shape
    assert hidden_in == hidden_size and two_i % 2 == 0, f"gate_up {tuple(gate_up.shape)} vs hidden {hidden_size}"
    assert tuple(down.shape) == (num_experts, hidden_size, two_i // 2), (
        f"down must be [X={num_experts}, E={hidden_size}, I={two_i // 2}], got {tuple(down.shape)}")
    assert weights.shape == expert_ids.shape and weights.shape[0] == num_tokens, "weights/ids must be [T, k]"


def reference_moe(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  expert_ids: torch.Tensor) -> torch.Tensor:
    """hidden [T, E], weights [T, k], expert_ids [T, k] -> [T, E] float32."""
    _check(hidden, gate_up, down, weights, expert_ids)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for token in range(hidden.shape[0]):
        x = hidden[token].float()
        for slot in range(expert_ids.shape[1]):
            expert = int(expert_ids[token, slot])
            gate, up = (gate_up[expert].float() @ x).chunk(2)
            out[token] += float(weights[token, slot]) * (down[expert].float() @ (F.silu(gate) * up))
    return out


def grouped_moe(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                expert_ids: torch.Tensor) -> torch.Tensor:
    """Same contract as reference_moe; the work is a grouped GEMM over the experts that have tokens."""
    _check(hidden, gate_up, down, weights, expert_ids)
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)  # [R]
    order = torch.argsort(flat_ids, stable=True)  # rows grouped by expert, tokens in order within each
    tokens = order // top_k  # [R] the token of each sorted row
    row_weights = weights.reshape(-1)[order].float()
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()
    gathered = hidden.float().index_select(0, tokens)  # [R, E], contiguous per expert
    results = torch.empty_like(gathered)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        rows = gathered[start:start + count]
        gate, up = (rows @ gate_up[expert].float().t()).chunk(2, dim=-1)
        results[start:start + count] = (F.silu(gate) * up) @ down[expert].float().t()
        start += count
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, tokens, results * row_weights[:, None])


def fused_moe(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
              expert_ids: torch.Tensor) -> torch.Tensor:
    return grouped_moe(hidden, gate_up, down, weights, expert_ids)
