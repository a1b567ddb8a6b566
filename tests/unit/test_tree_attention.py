"""Tree rows in paged decode attention: every path (torch reference, SDPA, C kernel, Triton, the encoded-KV
reference and Triton) hides exactly the tokens a row's tail mask clears, on fresh random inputs."""

import os

# Must be set before triton is imported anywhere: @triton.jit picks the interpreter at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import kv_quant as kq  # noqa: E402
from kernels import paged_attention as pa  # noqa: E402
from kernels.cpu_native import native_kernels, native_paged_decode_attention  # noqa: E402
from kernels.tree_mask import visible_tokens  # noqa: E402
from test_kv_quant_kernels import make_paged_codes  # noqa: E402
from test_paged_attention import make_paged_inputs  # noqa: E402


def random_tail_masks(seq_lens: list[int], *, seed: int) -> torch.Tensor:
    """A random mask per row (bit 0, the row itself, always set); every third row a chain (-1)."""
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for row, length in enumerate(seq_lens):
        if row % 3 == 2:
            masks.append(-1)
            continue
        bits = torch.randint(0, 2, (64,), generator=gen).tolist()
        bits[0] = 1
        value = sum(bit << index for index, bit in enumerate(bits))
        masks.append(value - (1 << 64) if value >= 1 << 63 else value)  # as a signed int64
    return torch.tensor(masks, dtype=torch.int64)


def visible_positions(length: int, mask: int) -> list[int]:
    """The oracle's own reading of the mask: token t is hidden iff it is among the last 64 and its bit is 0."""
    return [t for t in range(length) if length - 1 - t >= 64 or (mask >> (length - 1 - t)) & 1]


def naive_tree_attention(query, key_cache, value_cache, block_tables, seq_lens, tail_masks, scale):
    B, H, D = query.shape
    _, S, Hkv, _ = key_cache.shape
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        length = int(seq_lens[b])
        keep = visible_positions(length, int(tail_masks[b]))
        blocks = [int(block_tables[b, i]) for i in range(math.ceil(length / S))]
        k = torch.cat([key_cache[i] for i in blocks])[keep].double()
        v = torch.cat([value_cache[i] for i in blocks])[keep].double()
        for h in range(H):
            probs = torch.softmax(k[:, h // (H // Hkv)] @ query[b, h].double() * scale, dim=0)
            out[b, h] = probs @ v[:, h // (H // Hkv)]
    return out


def test_visible_tokens_reads_bit_i_as_the_token_i_behind_the_row():
    seq_lens = torch.tensor([5, 70, 3], dtype=torch.int32)
    # row 0 sees itself and the token two back (bits 0 and 2), nothing else of its 5; row 1 hides its last 64 but
    # itself; row 2 is a chain
    masks = torch.tensor([0b101, 1, -1], dtype=torch.int64)
    visible = visible_tokens(seq_lens, masks, 72)
    assert visible[0].nonzero().flatten().tolist() == [2, 4]
    assert visible[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 69]
    assert visible[2].nonzero().flatten().tolist() == [0, 1, 2]
    assert torch.equal(visible_tokens(seq_lens, None, 72), visible_tokens(seq_lens, torch.full((3,), -1), 72))


# (seq_lens, H, Hkv, D, S)
TREE_CASES = [
    pytest.param([37, 1, 64, 100, 70], 9, 3, 64, 16, id="gqa9/3-d64"),  # SmolLM2's shape
    pytest.param([130, 9, 66], 12, 2, 128, 16, id="gqa6-d128"),  # Qwen2.5-Coder's shape
    pytest.param([5, 80, 3, 41], 4, 4, 32, 8, id="mha-d32-S8"),
]


@pytest.mark.parametrize("seq_lens,H,Hkv,D,S", TREE_CASES)
@pytest.mark.parametrize("path", ["reference", "sdpa", "native", "triton", "dispatcher"])
def test_every_dense_path_hides_what_the_mask_clears(seq_lens, H, Hkv, D, S, path):
    query, keys, values, tables, lens = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=len(seq_lens) + D)
    masks = random_tail_masks(seq_lens, seed=D)
    scale = 1 / math.sqrt(D)
    expected = naive_tree_attention(query, keys, values, tables, lens, masks, scale)
    if path == "native" and native_kernels() is None:
        pytest.fail("the native kernels must build here (a C compiler is part of the set-up)")
    attend = {"reference": pa.reference_paged_decode_attention, "sdpa": pa.sdpa_paged_decode_attention,
              "native": native_paged_decode_attention, "triton": pa.triton_paged_decode_attention,
              "dispatcher": pa.paged_decode_attention}[path]
    out = attend(query, keys, values, tables, lens, scale, tail_masks=masks)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)
    # and the mask matters: without it the rows with cleared bits differ
    plain = attend(query, keys, values, tables, lens, scale)
    assert not torch.allclose(plain.double(), expected, atol=1e-3)


def test_native_tree_rows_over_fp16_pages_match_the_reference():
    seq_lens = [40, 90, 7]
    query, keys, values, tables, lens = make_paged_inputs(seq_lens, 9, 3, 64, 16, seed=5, dtype=torch.float32)
    keys, values = keys.clamp(-8, 8).half(), values.clamp(-8, 8).half()
    masks = random_tail_masks(seq_lens, seed=11)
    out = native_paged_decode_attention(query, keys, values, tables, lens, 0.125, tail_masks=masks)
    assert out is not None
    expected = pa.reference_paged_decode_attention(query, keys, values, tables, lens, 0.125, tail_masks=masks)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


def test_block_mass_of_a_tree_row_leaves_its_hidden_tokens_out():
    seq_lens = [50, 20]
    query, keys, values, tables, lens = make_paged_inputs(seq_lens, 4, 2, 16, 8, seed=3)
    masks = torch.tensor([0b1, -1], dtype=torch.int64)  # row 0 sees none of its last 63 tokens: blocks 2-6 empty
    out, mass = pa.reference_paged_decode_attention(query, keys, values, tables, lens, 0.25, tail_masks=masks,
                                                    with_block_mass=True)
    triton_out, triton_mass = pa.triton_paged_decode_attention(query, keys, values, tables, lens, 0.25,
                                                               tail_masks=masks, with_block_mass=True)
    torch.testing.assert_close(triton_out, out, rtol=0, atol=2e-5)
    torch.testing.assert_close(triton_mass, mass, rtol=0, atol=2e-5)
    # every token but the row's own (token 49, block 6) is among its last 64 and hidden: all the mass of both
    # query heads of each KV head is there
    expected = torch.zeros_like(mass[0])
    expected[:, 6] = 2.0
    torch.testing.assert_close(mass[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_encoded_kv_paths_hide_what_the_mask_clears(path):
    seq_lens = [13, 70, 30]
    inputs = make_paged_codes(seq_lens, 3, 2, 32, 8, "mixed", "uniform4", seed=9)
    query, key_codes, key_scales, key_layout, value_codes, value_scales, value_layout, tables, lens = inputs
    masks = random_tail_masks(seq_lens, seed=4)
    scale = 1 / math.sqrt(32)
    # the oracle: decoded pages through the dense oracle
    num_blocks, block_size, num_kv_heads, _ = key_codes.shape
    keys = kq.reference_kv_decode(key_codes, key_scales, key_layout).view(num_blocks, block_size, num_kv_heads, 32)
    values = kq.reference_kv_decode(value_codes, value_scales, value_layout).view(num_blocks, block_size,
                                                                                  num_kv_heads, 32)
    expected = naive_tree_attention(query, keys, values, tables, lens, masks, scale)
    attend = (kq.reference_quant_paged_decode_attention if path == "reference"
              else kq.triton_quant_paged_decode_attention)
    out = attend(*inputs, scale, tail_masks=masks)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=5e-5)
