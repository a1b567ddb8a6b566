# T=tokens, B=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, N=blocks in the pool,
# S=block size (tokens), M=max blocks per sequence, NB=code bytes per token per KV head
"""Encoded KV: the torch reference checked against independent oracles (bit-level unpacking, nearest
level, dense softmax attention), then the Triton kernels (interpreted on CPU) checked against the reference."""

import os

# Must be set before triton is imported anywhere: @triton.jit picks the interpreter at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import kv_quant as kq  # noqa: E402
from workers.kv.quant_plan import SidePlan, build_side_plan  # noqa: E402

pytestmark = pytest.mark.skipif(not kq._HAS_TRITON, reason="triton is not installed")


def make_plan(kind: str, num_kv_heads: int, head_dim: int, *, seed: int) -> SidePlan:
    """kind: "mixed" (per-channel 1..8 bits, calibrated center/sigma), "uniform3", "uniform4", "int8"."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "mixed":
        bits = torch.randint(1, 9, (num_kv_heads, head_dim), generator=gen)
        bits[:, 0], bits[:, 1] = 1, 8  # always both extremes
        center = torch.randn(num_kv_heads, head_dim, generator=gen) * 0.5
        sigma = torch.rand(num_kv_heads, head_dim, generator=gen) + 0.5
        return build_side_plan(bits, center=center, sigma=sigma, seed=seed)
    if kind in ("uniform3", "uniform4"):
        return build_side_plan(torch.full((num_kv_heads, head_dim), int(kind[-1])), seed=seed)
    if kind == "int8":
        return build_side_plan(torch.full((num_kv_heads, head_dim), 8), rotate=False, codebook="int8",
                               scale_mode="absmax")
    raise ValueError(kind)


def unpack_codes(codes: torch.Tensor, layout: kq.CodeLayout) -> torch.Tensor:
    """Oracle unpacker, bit by bit (independent of the 16-bit-word trick): [..., Hkv, NB] -> [..., Hkv, D] int64."""
    stream = torch.from_numpy(np.unpackbits(codes.numpy(), axis=-1, bitorder="little")).long()  # [..., Hkv, NB*8]
    Hkv, D = layout.bits.shape
    offsets = torch.arange(8)
    index = (layout.bitpos.long()[..., None] + offsets).clamp_max(stream.shape[-1] - 1)  # [Hkv, D, 8]
    weight = (offsets < layout.bits.long()[..., None]).long() << offsets  # bits past the code's width weigh 0
    gathered = stream.gather(-1, index.reshape(Hkv, D * 8).expand(*stream.shape[:-1], D * 8))
    return (gathered.reshape(*stream.shape[:-1], D, 8) * weight).sum(-1)


def make_tokens(plan: SidePlan, num_tokens: int, *, seed: int) -> torch.Tensor:
    """Random x [T, Hkv, D] around the plan's center, with token 0 exactly at the center (y = 0, the guarded case)."""
    gen = torch.Generator().manual_seed(seed)
    Hkv, D = plan.center.shape
    x = plan.center + torch.randn(num_tokens, Hkv, D, generator=gen) * 2.0
    x[0] = plan.center
    return x


# ---------------------------------------------------------------------------------------------------------------
# Reference-only: the spec itself against independent oracles.


@pytest.mark.parametrize("kind", ["mixed", "uniform3", "int8"])
def test_reference_encode_picks_nearest_level_and_decode_is_exact(kind):
    Hkv, D, T = 2, 32, 16
    plan = make_plan(kind, Hkv, D, seed=7)
    # No rotation, unit sigma, zero center: y = P x is an exact permutation, so u can be computed here exactly.
    plan = build_side_plan(plan.layout.bits[:, torch.randperm(D, generator=torch.Generator().manual_seed(1))],
                           rotate=False, codebook="int8" if kind == "int8" else "gaussian",
                           scale_mode=plan.layout.scale_mode)
    layout = plan.layout
    x = torch.randn(T, Hkv, D, generator=torch.Generator().manual_seed(2)) * 3.0
    codes, scales = kq.reference_kv_encode(x, plan.transform, plan.center, layout)
    assert codes.shape == (T, Hkv, layout.num_bytes) and codes.dtype == torch.uint8
    assert scales.shape == (T, Hkv) and scales.dtype == torch.float16

    y = torch.einsum("hij,thj->thi", plan.transform.double(), x.double())
    if layout.scale_mode == "norm":
        u = y * math.sqrt(D) / y.norm(dim=-1, keepdim=True)
    else:
        u = y / (y.abs().amax(dim=-1, keepdim=True) / 127)
    channel_codes = unpack_codes(codes, layout)
    bits = layout.bits.long().expand(T, Hkv, D)
    assert (channel_codes < (1 << bits)).all()
    levels = layout.codebook.double()[bits, channel_codes]
    # Nearest level among the channel's 2**bits (up to float32 rounding of the midpoint thresholds).
    level_ids = torch.arange(256)
    candidates = layout.codebook.double()[bits]  # [T, Hkv, D, 256]
    distances = (u[..., None] - candidates).abs().masked_fill(level_ids >= (1 << bits[..., None]), math.inf)
    assert ((u - levels).abs() <= distances.amin(-1) + 1e-5).all()

    # Decode is exactly codebook[bits, code] * scale, and the scale follows the scale mode.
    decoded = kq.reference_kv_decode(codes, scales, layout)
    assert torch.equal(decoded, layout.codebook[bits, channel_codes] * scales.float()[..., None])
    if layout.scale_mode == "norm":
        expected_scale = y.norm(dim=-1) / levels.norm(dim=-1)
        # The decoded vector keeps y's norm (up to the fp16 scale).
        torch.testing.assert_close(decoded.double().norm(dim=-1), y.norm(dim=-1), rtol=1e-3, atol=0)
    else:
        expected_scale = y.abs().amax(dim=-1) / 127
    torch.testing.assert_close(scales.double(), expected_scale, rtol=1e-3, atol=0)


def make_paged_codes(seq_lens: list[int], G: int, Hkv: int, D: int, S: int, key_kind: str, value_kind: str,
                     *, seed: int, garbage_scale: float = 50.0):
    """Random encoded paged inputs. Every unused pool slot (whole unused blocks, the tail of each sequence's
    last block) holds random code bytes and `garbage_scale`; blocks are shuffled, block_tables padding is random."""
    gen = torch.Generator().manual_seed(seed)
    key_plan = make_plan(key_kind, Hkv, D, seed=seed)
    value_plan = make_plan(value_kind, Hkv, D, seed=seed + 100)
    B = len(seq_lens)
    blocks_needed = [math.ceil(n / S) for n in seq_lens]
    M = max(blocks_needed) + 2  # always some padding columns
    N = sum(blocks_needed) + 3

    def pool(plan):
        codes = torch.randint(0, 256, (N, S, Hkv, plan.layout.num_bytes), generator=gen, dtype=torch.uint8)
        scales = torch.full((N, S, Hkv), garbage_scale, dtype=torch.float16)
        return codes, scales

    key_codes, key_scales = pool(key_plan)
    value_codes, value_scales = pool(value_plan)
    perm = torch.randperm(N, generator=gen)
    block_tables = torch.randint(0, N, (B, M), generator=gen, dtype=torch.int32)
    used = 0
    for b, (num_tokens, num_blocks) in enumerate(zip(seq_lens, blocks_needed)):
        ids = perm[used:used + num_blocks]
        used += num_blocks
        block_tables[b, :num_blocks] = ids.to(torch.int32)
        for plan, codes_pool, scales_pool in ((key_plan, key_codes, key_scales),
                                              (value_plan, value_codes, value_scales)):
            x = plan.center + torch.randn(num_tokens, Hkv, D, generator=gen) * 2.0
            codes, scales = kq.reference_kv_encode(x, plan.transform, plan.center, plan.layout)
            for t in range(num_tokens):
                codes_pool[ids[t // S], t % S] = codes[t]
                scales_pool[ids[t // S], t % S] = scales[t]
    query = torch.randn(B, G * Hkv, D, generator=gen)
    return (query, key_codes, key_scales, key_plan.layout, value_codes, value_scales, value_plan.layout,
            block_tables, torch.tensor(seq_lens, dtype=torch.int32))


def dense_attention(query, key_codes, key_scales, key_layout, value_codes, value_scales, value_layout,
                    block_tables, seq_lens, scale) -> torch.Tensor:
    """Oracle: per sequence, decode its tokens, float64 softmax attention per query head."""
    B, H, D = query.shape
    _, S, Hkv, _ = key_codes.shape
    G = H // Hkv
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        blocks = block_tables[b, :math.ceil(n / S)].long()
        keys = kq.reference_kv_decode(key_codes[blocks], key_scales[blocks], key_layout).reshape(-1, Hkv, D)[:n]
        values = kq.reference_kv_decode(value_codes[blocks], value_scales[blocks], value_layout).reshape(-1, Hkv, D)[:n]
        for h in range(H):
            probs = torch.softmax(keys[:, h // G].double() @ query[b, h].double() * scale, dim=0)
            out[b, h] = probs @ values[:, h // G].double()
    return out


def test_reference_attention_equals_dense_attention_over_decoded_kv():
    inputs = make_paged_codes([13, 1, 30], 3, 2, 32, 8, "mixed", "uniform4", seed=3)
    scale = 1 / math.sqrt(32)
    out = kq.reference_quant_paged_decode_attention(*inputs, scale)
    assert out.shape == (3, 6, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dense_attention(*inputs, scale), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Triton (interpreted) vs the reference.

# (kind, Hkv, D, T, seed)
ENCODE_CASES = [
    pytest.param("mixed", 2, 64, 12, 0, id="mixed-h2-d64"),
    pytest.param("mixed", 3, 32, 8, 1, id="mixed-h3-d32"),
    pytest.param("mixed", 1, 24, 6, 2, id="mixed-h1-d24-non-pow2"),
    pytest.param("uniform3", 1, 64, 8, 3, id="uniform3-d64"),
    pytest.param("uniform4", 2, 32, 8, 4, id="uniform4-d32"),
    pytest.param("int8", 2, 64, 8, 5, id="int8-absmax-d64"),
]


@pytest.mark.parametrize("kind,Hkv,D,T,seed", ENCODE_CASES)
def test_triton_encode_matches_reference(kind, Hkv, D, T, seed):
    plan = make_plan(kind, Hkv, D, seed=seed)
    layout = plan.layout
    x = make_tokens(plan, T, seed=seed + 10)
    ref_codes, ref_scales = kq.reference_kv_encode(x, plan.transform, plan.center, layout)
    codes, scales = kq.triton_kv_encode(x, plan.transform, plan.center, layout)
    assert codes.shape == ref_codes.shape and codes.dtype == torch.uint8
    assert scales.shape == ref_scales.shape and scales.dtype == torch.float16

    # The matvec sums in a different order than torch's einsum, so a y within float rounding of a threshold
    # may land on the neighbouring level: allow rare off-by-one codes, nothing else.
    ref_channel_codes, channel_codes = unpack_codes(ref_codes, layout), unpack_codes(codes, layout)
    differs = channel_codes != ref_channel_codes
    assert differs.float().mean() <= 1e-3, f"{int(differs.sum())} of {differs.numel()} channel codes differ"
    assert ((channel_codes - ref_channel_codes).abs() <= 1).all()
    # Whole byte streams match too: bytes past a head's last code (a head with fewer bits than NB*8) stay zero.
    same_token = ~differs.any(-1)  # [T, Hkv]
    assert torch.equal(codes[same_token], ref_codes[same_token])
    # Same codes: the scale is the same up to one fp16 rounding step of a float32 norm that may differ by an ulp.
    torch.testing.assert_close(scales[same_token].float(), ref_scales[same_token].float(), rtol=1e-3, atol=0)
    torch.testing.assert_close(kq.reference_kv_decode(codes, scales, layout),
                               kq.reference_kv_decode(ref_codes, ref_scales, layout), rtol=0.05, atol=0.05)
    assert (scales[0] == 0).all()  # token 0 is x == center: y = 0 encodes to scale 0, no NaN


@pytest.mark.parametrize("kind", ["mixed", "int8"])
def test_triton_encode_is_bit_exact_when_the_transform_is_a_permutation(kind):
    """rotate=False and sigma=1 make y = P (x - center) exact in any summation order: no excuse for any difference."""
    Hkv, D, T = 2, 32, 12
    bits = make_plan(kind, Hkv, D, seed=11).layout.bits
    bits = bits[:, torch.randperm(D, generator=torch.Generator().manual_seed(12))]  # P is not the identity
    center = torch.randn(Hkv, D, generator=torch.Generator().manual_seed(13))
    plan = build_side_plan(bits, center=center, rotate=False, codebook="int8" if kind == "int8" else "gaussian",
                           scale_mode="absmax" if kind == "int8" else "norm")
    x = make_tokens(plan, T, seed=14).to(torch.float16)  # also exercises a non-fp32 input
    ref_codes, ref_scales = kq.reference_kv_encode(x, plan.transform, plan.center, plan.layout)
    codes, scales = kq.triton_kv_encode(x, plan.transform, plan.center, plan.layout)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)


# (seq_lens, G, Hkv, D, S, key kind, value kind, seed)
ATTENTION_CASES = [
    pytest.param([5, 1, 16], 2, 2, 32, 8, "mixed", "mixed", 0, id="mixed-gqa2-h2-d32-S8"),
    pytest.param([1], 3, 1, 64, 4, "uniform4", "uniform3", 1, id="single-token-g3-d64"),
    pytest.param([9, 13], 1, 3, 32, 4, "int8", "int8", 2, id="int8-mha-h3-S4"),
    pytest.param([7, 1, 12], 3, 1, 64, 16, "mixed", "int8", 3, id="mixed-k-int8-v-S16"),
    pytest.param([6, 3], 2, 1, 24, 4, "mixed", "uniform3", 4, id="d24-non-pow2"),
]


@pytest.mark.parametrize("seq_lens,G,Hkv,D,S,key_kind,value_kind,seed", ATTENTION_CASES)
def test_triton_attention_matches_reference(seq_lens, G, Hkv, D, S, key_kind, value_kind, seed):
    inputs = make_paged_codes(seq_lens, G, Hkv, D, S, key_kind, value_kind, seed=seed)
    scale = 1 / math.sqrt(D)
    expected = kq.reference_quant_paged_decode_attention(*inputs, scale)
    out = kq.triton_quant_paged_decode_attention(*inputs, scale)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_triton_attention_ignores_nan_garbage_in_unused_slots():
    """Unused slots may hold anything; the kernel masks them before they touch the math (the reference
    would turn a NaN value scale into NaN output via 0 * NaN, so it is fed finite garbage here)."""
    finite = make_paged_codes([5, 2], 2, 2, 32, 4, "mixed", "mixed", seed=5, garbage_scale=50.0)
    poisoned = make_paged_codes([5, 2], 2, 2, 32, 4, "mixed", "mixed", seed=5, garbage_scale=float("nan"))
    scale = 1 / math.sqrt(32)
    out = kq.triton_quant_paged_decode_attention(*poisoned, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, kq.reference_quant_paged_decode_attention(*finite, scale), rtol=0, atol=1e-4)
