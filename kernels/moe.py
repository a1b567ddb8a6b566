# T=tokens, E=hidden size, X=experts, I=expert intermediate size, k=experts per token, R=T*k routed rows
"""The fused MoE layer's expert part: out[t] = sum_j w[t, j] * down[x] @ silu_mul(gate_up[x] @ hidden[t]), x =
ids[t, j].

* ``reference_moe`` - the spec: token by token, expert by expert, in float32.
* ``grouped_moe``   - the fast path: the T*k (token, expert) rows sorted by expert, each expert's rows gathered into
  one contiguous block and multiplied once (a grouped GEMM: two matmuls per expert that has tokens, none for
  the others), results weighted and scattered back with one index_add. Its float32 sums run in another order
  than the reference's, so the two agree to rounding.
* ``triton_moe``    - the same grouped GEMM in Triton (CUDA, or CPU under TRITON_INTERPRET=1): rows aligned per
  expert into blocks (``moe_align``), one launch for gate_up over each row's token, one for down with the routing
  weight folded in.
* ``fused_moe``     - the dispatcher the model calls: Triton on CUDA, the grouped torch path elsewhere.

Weights are stacked per expert: gate_up [X, 2I, E] (gate rows first), down [X, E, I], Hugging Face's fused layout.
An expert id of -1 is an empty slot (its weight is ignored): expert-parallel, a rank receives each token once with
only the slots whose experts it holds filled (workers/moe/expert_parallel.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.triton_support import HAS_TRITON as _HAS_TRITON, tl, triton


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
            if expert < 0:
                continue
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
    num_empty = int((flat_ids < 0).sum())  # empty slots (-1) sort first: drop them
    order = order[num_empty:]
    tokens = order // top_k  # [R] the token of each sorted row
    row_weights = weights.reshape(-1)[order].float()
    counts = torch.bincount(flat_ids[order], minlength=gate_up.shape[0]).tolist()
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
    if hidden.is_cuda and _HAS_TRITON:
        return triton_moe(hidden, gate_up, down, weights, expert_ids)
    return grouped_moe(hidden, gate_up, down, weights, expert_ids)


# ---- Triton: the grouped GEMM as one launch per matmul ---------------------------------------------------------
# R=T*k routed rows, Rp=rows padded per expert to a multiple of BLOCK_M, M=row blocks
def moe_align(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] -> (sorted_rows [Rp]: flat (token, slot) ids grouped by expert, each expert's run padded to
    a multiple of block_m with the sentinel R; block_experts [M]: the expert of each block of block_m rows). Empty
    slots (-1) appear in no block."""
    flat = expert_ids.reshape(-1)
    num_rows = flat.shape[0]
    order = torch.argsort(flat, stable=True)
    order = order[int((flat < 0).sum()):]  # empty slots sort first
    counts = torch.bincount(flat[order], minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    sorted_rows = torch.full((int(padded.sum()),), num_rows, dtype=torch.int64, device=flat.device)
    starts = torch.cumsum(padded, 0) - padded
    within = torch.arange(order.shape[0], device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    sorted_rows[starts[flat[order]] + within] = order
    block_experts = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), padded // block_m)
    return sorted_rows, block_experts


if _HAS_TRITON:

    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr, b_ptr, c_ptr, rows_ptr, experts_ptr, weights_ptr,
        num_rows, N, K, top_k,
        stride_am, stride_bx, stride_bn, stride_cm,
        A_BY_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One program per (block of BLOCK_M rows of one expert, BLOCK_N output columns): C[row] = A[row'] @ B[x]^T,
        # row' the row's token (A_BY_TOKEN: the first matmul reads the hidden states) or the row itself.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows = tl.load(rows_ptr + offs_m)  # padding rows hold num_rows
        valid = rows < num_rows
        a_rows = rows // top_k if A_BY_TOKEN else rows
        expert = tl.load(experts_ptr + pid_m).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + offs_k < K
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :],
                        mask=valid[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            b = tl.load(b_ptr + expert * stride_bx + offs_n[:, None] * stride_bn + (k0 + offs_k)[None, :],
                        mask=(offs_n < N)[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        if MUL_WEIGHT:
            acc = acc * tl.load(weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
        tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :], acc,
                 mask=valid[:, None] & (offs_n < N)[None, :])


def triton_moe(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
               expert_ids: torch.Tensor, block_m: int = 16, block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """Same contract as reference_moe: two grouped-GEMM launches (gate_up over each row's token, then down with the
    routing weight folded in) over rows aligned per expert; silu_mul between them; the k rows of a token summed."""
    if not _HAS_TRITON:
        raise RuntimeError("triton_moe: triton is not installed; use grouped_moe")
    _check(hidden, gate_up, down, weights, expert_ids)
    num_tokens, top_k = expert_ids.shape
    num_experts, two_i, hidden_size = gate_up.shape
    intermediate = two_i // 2
    hidden, gate_up, down = hidden.contiguous(), gate_up.contiguous(), down.contiguous()
    rows, block_experts = moe_align(expert_ids, num_experts, block_m)
    num_rows = num_tokens * top_k
    flat_weights = weights.reshape(-1).float().contiguous()
    first = torch.empty(num_rows, two_i, dtype=torch.float32, device=hidden.device)
    grid = (block_experts.shape[0], triton.cdiv(two_i, block_n))
    _grouped_gemm_kernel[grid](hidden, gate_up, first, rows, block_experts, flat_weights,
                               num_rows, two_i, hidden_size, top_k,
                               hidden.stride(0), gate_up.stride(0), gate_up.stride(1), first.stride(0),
                               A_BY_TOKEN=True, MUL_WEIGHT=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    act = (F.silu(first[:, :intermediate]) * first[:, intermediate:]).contiguous()  # [R, I]
    # zeros: an empty slot's row is never written and must add nothing to its token's sum
    second = torch.zeros(num_rows, hidden_size, dtype=torch.float32, device=hidden.device)
    grid = (block_experts.shape[0], triton.cdiv(hidden_size, block_n))
    _grouped_gemm_kernel[grid](act, down, second, rows, block_experts, flat_weights,
                               num_rows, hidden_size, intermediate, top_k,
                               act.stride(0), down.stride(0), down.stride(1), second.stride(0),
                               A_BY_TOKEN=False, MUL_WEIGHT=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return second.view(num_tokens, top_k, hidden_size).sum(dim=1)
