"""The Triton grouped-GEMM MoE kernel (interpreted on the CPU) against the token-by-token reference."""

import os

# Must be set before triton is imported anywhere: @triton.jit picks the interpreter at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.moe import moe_align, reference_moe, triton_moe  # noqa: E402
from test_moe import random_moe_inputs  # noqa: E402


def test_moe_align_groups_rows_by_expert_in_padded_blocks():
    expert_ids = torch.tensor([[2, 0], [2, 1], [0, 2]])  # rows 0..5
    rows, block_experts = moe_align(expert_ids, num_experts=4, block_m=2)
    assert block_experts.tolist() == [0, 1, 2, 2]  # expert 3 has no rows, no block
    assert rows.tolist() == [1, 4, 3, 6, 0, 2, 5, 6]  # expert 0: rows 1, 4; 1: 3 + pad; 2: 0, 2, 5 + pad


@pytest.mark.parametrize("num_tokens,hidden,num_experts,intermediate,top_k,seed", [
    (1, 32, 4, 16, 1, 0),
    (37, 48, 8, 24, 2, 1),  # sizes off the block grid
    (20, 32, 16, 12, 4, 2),  # idle experts
])
def test_triton_moe_matches_the_reference(num_tokens, hidden, num_experts, intermediate, top_k, seed):
    inputs = random_moe_inputs(num_tokens, hidden, num_experts, intermediate, top_k, seed)
    torch.testing.assert_close(triton_moe(*inputs), reference_moe(*inputs), rtol=1e-4, atol=1e-4)


def test_triton_moe_skips_empty_slots():
    from test_moe import with_empty_slots

    x, gate_up, down, weights, expert_ids = random_moe_inputs(21, 32, 8, 16, 4, 5)
    ids = with_empty_slots(expert_ids, 5)
    torch.testing.assert_close(triton_moe(x, gate_up, down, weights, ids), reference_moe(x, gate_up, down, weights, ids),
                               rtol=1e-4, atol=1e-4)
