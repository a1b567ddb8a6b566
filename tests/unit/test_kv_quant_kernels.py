# T=tokens, B=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, N=blocks in the pool,
# S=block size (tokens), M=max blocks per sequence, NB=code bytes per token per KV head, NG=scale groups per head
"""Encoded KV: the torch reference checked against independent oracles (bit-level unpacking, nearest
level, dense softmax attention), then the Triton kernels (interpreted on CPU) checked against the reference."""

import os

# Must be set before triton is imported anywhere: @triton.jit picks the interpreter at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import kv_quant as kq  # noqa: E402
from workers.kv.quant_plan import SidePlan, build_side_plan  # noqa: E402

pytestmark = pytest.mark.skipif(not kq._HAS_TRITON, reason="triton is not installed")


def sparse_bits(num_kv_heads: int, head_dim: int, gen: torch.Generator) -> torch.Tensor:
    """Even heads use widths {1, 8}, odd heads {1, 4, 8} (shuffled over channels): NG = 3 once there are two
    heads, and every even head has an empty group (its slot must stay 0 and never be read)."""
    bits = torch.ones(num_kv_heads, head_dim, dtype=torch.long)
    for head in range(num_kv_heads):
        bits[head, : head_dim // 4] = 8
        if head % 2:
            bits[head, head_dim // 4: head_dim // 2] = 4
        bits[head] = bits[head, torch.randperm(head_dim, generator=gen)]
    return bits


def make_plan(kind: str, num_kv_heads: int, head_dim: int, *, seed: int) -> SidePlan:
    """kind: "mixed" (per-channel 1..8 bits, calibrated center/sigma: up to 8 groups), "sparse" (see sparse_bits),
    "sparse_rms" (the same with scale_mode "rms" and the unshrunk codebook), "uniform3", "uniform4", "int8"
    (the last three: one group), "int8_grouped" (int8 with a hand-made interleaved grouping: the format allows
    any grouping, and it is the only way to give absmax several groups; even heads lack group 2)."""
    gen = torch.Generator().manual_seed(seed)
    if kind in ("mixed", "sparse", "sparse_rms"):
        if kind == "mixed":
            bits = torch.randint(1, 9, (num_kv_heads, head_dim), generator=gen)
            bits[:, 0], bits[:, 1] = 1, 8  # always both extremes
        else:
            bits = sparse_bits(num_kv_heads, head_dim, gen)
        center = torch.randn(num_kv_heads, head_dim, generator=gen) * 0.5
        sigma = torch.rand(num_kv_heads, head_dim, generator=gen) + 0.5
        if kind == "sparse_rms":
            return build_side_plan(bits, center=center, sigma=sigma, seed=seed, codebook="gaussian_unshrunk",
                                   scale_mode="rms")
        return build_side_plan(bits, center=center, sigma=sigma, seed=seed)
    if kind in ("uniform3", "uniform4"):
        return build_side_plan(torch.full((num_kv_heads, head_dim), int(kind[-1])), seed=seed)
    if kind in ("int8", "int8_grouped"):
        plan = build_side_plan(torch.full((num_kv_heads, head_dim), 8), rotate=False, codebook="int8",
                               scale_mode="absmax")
        if kind == "int8":
            return plan
        channel = torch.arange(head_dim)
        group = torch.stack([channel % (2 + head % 2) for head in range(num_kv_heads)]).to(torch.int32)
        return dataclasses.replace(plan, layout=dataclasses.replace(plan.layout, group=group, num_groups=3))
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


def channel_scales(scales: torch.Tensor, layout: kq.CodeLayout) -> torch.Tensor:
    """scales [T, Hkv, NG] -> each channel's group scale [T, Hkv, D] (plain indexing, not the reference's gather)."""
    Hkv, D = layout.bits.shape
    return scales[:, torch.arange(Hkv)[:, None], layout.group.long()]


@pytest.mark.parametrize("kind", ["mixed", "sparse", "sparse_rms", "uniform3", "int8"])
def test_reference_encode_picks_nearest_level_and_decode_is_exact(kind):
    Hkv, D, T = 2, 32, 16
    plan = make_plan(kind, Hkv, D, seed=7)
    # No rotation, unit sigma, zero center: y = P x is an exact permutation, so u can be computed here exactly.
    plan = build_side_plan(plan.layout.bits[:, torch.randperm(D, generator=torch.Generator().manual_seed(1))],
                           rotate=False, codebook="int8" if kind == "int8" else "gaussian",
                           scale_mode=plan.layout.scale_mode)
    layout = plan.layout
    NG = layout.num_groups
    assert NG == {"sparse": 3, "sparse_rms": 3, "uniform3": 1, "int8": 1}.get(kind, NG)
    x = torch.randn(T, Hkv, D, generator=torch.Generator().manual_seed(2)) * 3.0
    codes, scales = kq.reference_kv_encode(x, plan.transform, plan.center, layout)
    assert codes.shape == (T, Hkv, layout.num_bytes) and codes.dtype == torch.uint8
    assert scales.shape == (T, Hkv, NG) and scales.dtype == torch.float16

    y = torch.einsum("hij,thj->thi", plan.transform.double(), x.double())
    channel_codes = unpack_codes(codes, layout)
    bits = layout.bits.long().expand(T, Hkv, D)
    assert (channel_codes < (1 << bits)).all()
    levels = layout.codebook.double()[bits, channel_codes]

    # Per (head, group), straight from the format's definition: u and the expected scale.
    u = torch.zeros_like(y)
    expected_scale = torch.zeros(T, Hkv, NG, dtype=torch.float64)
    empty_groups = 0
    for head in range(Hkv):
        for g in range(NG):
            members = layout.group[head] == g
            width = int(members.sum())
            if width == 0:  # a group this head lacks: scale 0
                empty_groups += 1
                continue
            assert layout.bits[head, members].unique().numel() == 1  # the codec makes each group one width
            y_g = y[:, head, members]
            if layout.scale_mode == "absmax":
                step = y_g.abs().amax(dim=-1) / 127
                u[:, head, members] = y_g / step[:, None]
                expected_scale[:, head, g] = step
            else:
                norm = y_g.norm(dim=-1)
                u[:, head, members] = y_g * math.sqrt(width) / norm[:, None]
                if layout.scale_mode == "norm":
                    expected_scale[:, head, g] = norm / levels[:, head, members].norm(dim=-1)
                else:
                    expected_scale[:, head, g] = norm / math.sqrt(width)
    if kind != "mixed":  # (random mixed bits may leave a head without some width too)
        assert empty_groups == (1 if kind.startswith("sparse") else 0)  # sparse: head 0 lacks the 4-bit group

    # Nearest level among the channel's 2**bits (up to float32 rounding of the midpoint thresholds).
    level_ids = torch.arange(256)
    candidates = layout.codebook.double()[bits]  # [T, Hkv, D, 256]
    distances = (u[..., None] - candidates).abs().masked_fill(level_ids >= (1 << bits[..., None]), math.inf)
    assert ((u - levels).abs() <= distances.amin(-1) + 1e-5).all()

    # Decode is exactly codebook[bits, code] * scale[group], and the scales follow the scale mode.
    decoded = kq.reference_kv_decode(codes, scales, layout)
    assert torch.equal(decoded, layout.codebook[bits, channel_codes] * channel_scales(scales.float(), layout))
    torch.testing.assert_close(scales.double(), expected_scale, rtol=1e-3, atol=0)  # also: empty groups are 0
    if layout.scale_mode == "norm":
        # Each decoded group keeps y_g's norm (up to the fp16 scale).
        for head in range(Hkv):
            for g in range(NG):
                members = layout.group[head] == g
                torch.testing.assert_close(decoded[:, head, members].double().norm(dim=-1),
                                           y[:, head, members].norm(dim=-1), rtol=1e-3, atol=0)


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
        scales = torch.full((N, S, Hkv, plan.layout.num_groups), garbage_scale, dtype=torch.float16)
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


@pytest.mark.parametrize("key_kind,value_kind", [("mixed", "uniform4"), ("sparse", "int8")])
def test_reference_attention_equals_dense_attention_over_decoded_kv(key_kind, value_kind):
    inputs = make_paged_codes([13, 1, 30], 3, 2, 32, 8, key_kind, value_kind, seed=3)
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
    pytest.param("sparse", 2, 32, 8, 6, id="sparse-h2-d32-empty-group"),
    pytest.param("sparse_rms", 3, 24, 6, 7, id="sparse-rms-h3-d24"),
    pytest.param("uniform3", 1, 64, 8, 3, id="uniform3-d64"),
    pytest.param("uniform4", 2, 32, 8, 4, id="uniform4-d32"),
    pytest.param("int8", 2, 64, 8, 5, id="int8-absmax-d64"),
    pytest.param("int8_grouped", 2, 32, 6, 8, id="int8-absmax-3-groups-one-empty"),
]


@pytest.mark.parametrize("kind,Hkv,D,T,seed", ENCODE_CASES)
def test_triton_encode_matches_reference(kind, Hkv, D, T, seed):
    plan = make_plan(kind, Hkv, D, seed=seed)
    layout = plan.layout
    x = make_tokens(plan, T, seed=seed + 10)
    ref_codes, ref_scales = kq.reference_kv_encode(x, plan.transform, plan.center, layout)
    codes, scales = kq.triton_kv_encode(x, plan.transform, plan.center, layout)
    assert codes.shape == ref_codes.shape and codes.dtype == torch.uint8
    assert scales.shape == ref_scales.shape == (T, Hkv, layout.num_groups) and scales.dtype == torch.float16

    # The matvec sums in a different order than torch's einsum, so a y within float rounding of a threshold
    # may land on the neighbouring level: allow rare off-by-one codes, nothing else.
    ref_channel_codes, channel_codes = unpack_codes(ref_codes, layout), unpack_codes(codes, layout)
    differs = channel_codes != ref_channel_codes
    assert differs.float().mean() <= 1e-3, f"{int(differs.sum())} of {differs.numel()} channel codes differ"
    assert ((channel_codes - ref_channel_codes).abs() <= 1).all()
    # Whole byte streams match too: bytes past a head's last code (a head with fewer bits than NB*8) stay zero.
    same_token = ~differs.any(-1)  # [T, Hkv]
    assert torch.equal(codes[same_token], ref_codes[same_token])
    # Same codes: every group scale is the same up to one fp16 rounding step of a float32 norm that may differ
    # by an ulp; a group this head lacks is exactly 0 in both.
    torch.testing.assert_close(scales[same_token].float(), ref_scales[same_token].float(), rtol=1e-3, atol=0)
    assert torch.equal(scales == 0, ref_scales == 0)
    torch.testing.assert_close(kq.reference_kv_decode(codes, scales, layout),
                               kq.reference_kv_decode(ref_codes, ref_scales, layout), rtol=0.05, atol=0.05)
    assert (scales[0] == 0).all()  # token 0 is x == center: y = 0 encodes to scale 0, no NaN


@pytest.mark.parametrize("kind", ["mixed", "sparse_rms", "int8"])
def test_triton_encode_is_bit_exact_when_the_transform_is_a_permutation(kind):
    """rotate=False and sigma=1 make y = P (x - center) exact in any summation order: no excuse for any difference."""
    Hkv, D, T = 2, 32, 12
    bits = make_plan(kind, Hkv, D, seed=11).layout.bits
    bits = bits[:, torch.randperm(D, generator=torch.Generator().manual_seed(12))]  # P is not the identity
    center = torch.randn(Hkv, D, generator=torch.Generator().manual_seed(13))
    plan = build_side_plan(bits, center=center, rotate=False, codebook="int8" if kind == "int8" else "gaussian",
                           scale_mode={"int8": "absmax", "sparse_rms": "rms"}.get(kind, "norm"))
    x = make_tokens(plan, T, seed=14).to(torch.float16)  # also exercises a non-fp32 input
    ref_codes, ref_scales = kq.reference_kv_encode(x, plan.transform, plan.center, plan.layout)
    codes, scales = kq.triton_kv_encode(x, plan.transform, plan.center, plan.layout)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)


# (seq_lens, G, Hkv, D, S, key kind, value kind, seed)
ATTENTION_CASES = [
    pytest.param([5, 1, 16], 2, 2, 32, 8, "mixed", "mixed", 0, id="mixed-gqa2-h2-d32-S8"),
    pytest.param([11, 4], 2, 2, 32, 4, "sparse", "mixed", 5, id="sparse-k-ng3-mixed-v-ng8"),
    pytest.param([3, 9], 1, 3, 24, 8, "uniform4", "sparse_rms", 6, id="uniform-k-ng1-sparse-rms-v-h3-d24"),
    pytest.param([1], 3, 1, 64, 4, "uniform4", "uniform3", 1, id="single-token-g3-d64"),
    pytest.param([9, 13], 1, 3, 32, 4, "int8_grouped", "int8", 2, id="int8-grouped-k-int8-v-mha-h3-S4"),
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
    finite = make_paged_codes([5, 2], 2, 2, 32, 4, "sparse", "mixed", seed=5, garbage_scale=50.0)
    poisoned = make_paged_codes([5, 2], 2, 2, 32, 4, "sparse", "mixed", seed=5, garbage_scale=float("nan"))
    # Head 0 lacks one width (see sparse_bits), so its last key group has no channels: that scale slot is
    # never read, even for valid tokens.
    key_layout = poisoned[3]
    assert not (key_layout.group[0] == key_layout.num_groups - 1).any()
    poisoned[2][:, :, 0, -1] = float("nan")
    scale = 1 / math.sqrt(32)
    out = kq.triton_quant_paged_decode_attention(*poisoned, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, kq.reference_quant_paged_decode_attention(*finite, scale), rtol=0, atol=1e-4)


def test_triton_attention_rejects_scales_with_the_wrong_number_of_groups():
    """K and V have their own NG; a pool laid out for the other side's NG is refused before any kernel runs."""
    inputs = list(make_paged_codes([3], 1, 2, 32, 4, "sparse", "uniform3", seed=8))
    assert inputs[3].num_groups == 3 and inputs[6].num_groups == 1
    inputs[2], inputs[5] = inputs[2][..., :1], inputs[5].expand(*inputs[5].shape[:3], 3)
    with pytest.raises(AssertionError, match="key scales"):
        kq.triton_quant_paged_decode_attention(*inputs, 1.0)
