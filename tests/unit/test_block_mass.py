"""Per-block attention mass (the eviction scores' by-product): references vs a naive oracle, Triton vs references."""

import os

# Must be set before triton is imported anywhere: @triton.jit picks the interpreter at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import kv_quant as kq  # noqa: E402
from kernels import paged_attention as pa  # noqa: E402
from tests.unit.test_kv_quant_kernels import make_paged_codes  # noqa: E402
from tests.unit.test_paged_attention import make_paged_inputs  # noqa: E402

triton_required = pytest.mark.skipif(not pa._HAS_TRITON, reason="triton is a pinned dependency; missing here")


def random_weights(num_blocks: int, block_size: int, num_kv_heads: int, seed: int) -> torch.Tensor:
    return torch.rand(num_blocks, block_size, num_kv_heads, generator=torch.Generator().manual_seed(seed)) + 0.1


def naive_block_mass(keys_of, query, block_tables, seq_lens, scale, block_size, num_kv_heads, weights):
    """Oracle: per sequence and query head, float64 softmax over its tokens, summed per block (x weight)."""
    B, H, _ = query.shape
    G = H // num_kv_heads
    mass = torch.zeros(B, num_kv_heads, block_tables.shape[1], dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        blocks = block_tables[b, :math.ceil(n / block_size)].long()
        keys = keys_of(blocks)[:n].double()  # [n, Hkv, D]
        for h in range(H):
            probs = torch.softmax(keys[:, h // G] @ query[b, h].double() * scale, dim=0)
            if weights is not None:
                probs = probs * weights[blocks].reshape(-1, num_kv_heads)[:n, h // G].double()
            for t in range(n):
                mass[b, h // G, t // block_size] += probs[t]
    return mass


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "value-weighted"])
@pytest.mark.parametrize("seq_lens,H,Hkv,D,S", [([37, 1, 64, 100], 9, 3, 64, 16), ([5, 40], 4, 4, 16, 8)])
def test_reference_block_mass_matches_oracle(seq_lens, H, Hkv, D, S, weighted):
    query, key_cache, value_cache, block_tables, lens = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=len(seq_lens))
    weights = random_weights(key_cache.shape[0], S, Hkv, seed=1) if weighted else None
    out, mass = pa.reference_paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 0.125,
                                                    token_weights=weights, with_block_mass=True)
    torch.testing.assert_close(out, pa.reference_paged_decode_attention(query, key_cache, value_cache,
                                                                        block_tables, lens, 0.125))
    expected = naive_block_mass(lambda blocks: key_cache[blocks].flatten(0, 1), query, block_tables, lens, 0.125,
                                S, Hkv, weights)
    assert mass.shape == (len(seq_lens), Hkv, block_tables.shape[1])
    torch.testing.assert_close(mass.double(), expected, atol=1e-5, rtol=1e-5)
    if not weighted:  # every query head's probabilities sum to 1: G per KV head
        torch.testing.assert_close(mass.sum(-1), torch.full((len(seq_lens), Hkv), H / Hkv), atol=1e-4, rtol=0)


def test_dispatcher_returns_block_mass_on_cpu_even_for_small_batches():
    """Small CPU batches normally take SDPA, which hides its probabilities: asking for the mass must not."""
    inputs = make_paged_inputs([3], 2, 1, 8, 4, seed=0)
    out, mass = pa.paged_decode_attention(*inputs, 0.3, with_block_mass=True)
    assert mass.shape == (1, 1, inputs[3].shape[1])
    torch.testing.assert_close(mass.sum(), torch.tensor(2.0))


@triton_required
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "value-weighted"])
@pytest.mark.parametrize("seq_lens,H,Hkv,D,S", [([37, 1, 64, 100], 9, 3, 64, 16), ([5, 40, 17], 4, 2, 16, 8)])
def test_triton_block_mass_matches_reference(seq_lens, H, Hkv, D, S, weighted):
    inputs = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=sum(seq_lens))
    weights = random_weights(inputs[1].shape[0], S, Hkv, seed=2) if weighted else None
    out_ref, mass_ref = pa.reference_paged_decode_attention(*inputs, 0.125, token_weights=weights,
                                                            with_block_mass=True)
    out, mass = pa.triton_paged_decode_attention(*inputs, 0.125, token_weights=weights, with_block_mass=True)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mass, mass_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "value-weighted"])
def test_quant_reference_block_mass_matches_oracle(weighted):
    inputs = make_paged_codes([13, 1, 30], 3, 2, 32, 8, "mixed", "uniform4", seed=3)
    query, key_codes, key_scales, key_layout = inputs[:4]
    block_tables, lens = inputs[7], inputs[8]
    weights = random_weights(key_codes.shape[0], 8, 2, seed=4) if weighted else None
    out, mass = kq.reference_quant_paged_decode_attention(*inputs, 0.2, token_weights=weights, with_block_mass=True)
    torch.testing.assert_close(out, kq.reference_quant_paged_decode_attention(*inputs, 0.2))
    expected = naive_block_mass(
        lambda blocks: kq.reference_kv_decode(key_codes[blocks], key_scales[blocks], key_layout).flatten(0, 1),
        query, block_tables, lens, 0.2, 8, 2, weights)
    torch.testing.assert_close(mass.double(), expected, atol=1e-5, rtol=1e-5)


@triton_required
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "value-weighted"])
@pytest.mark.parametrize("seq_lens,G,Hkv,D,S,key_kind,value_kind",
                         [([13, 1, 30], 3, 2, 32, 8, "mixed", "uniform4"), ([7, 20], 3, 1, 64, 16, "mixed", "int8")])
def test_quant_triton_block_mass_matches_reference(seq_lens, G, Hkv, D, S, key_kind, value_kind, weighted):
    inputs = make_paged_codes(seq_lens, G, Hkv, D, S, key_kind, value_kind, seed=G + D)
    weights = random_weights(inputs[1].shape[0], S, Hkv, seed=5) if weighted else None
    out_ref, mass_ref = kq.reference_quant_paged_decode_attention(*inputs, 0.2, token_weights=weights,
                                                                  with_block_mass=True)
    out, mass = kq.triton_quant_paged_decode_attention(*inputs, 0.2, token_weights=weights, with_block_mass=True)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(mass, mass_ref, atol=1e-5, rtol=1e-4)
