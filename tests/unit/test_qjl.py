# T=tokens, B=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, N=blocks, S=block size,
# NBq=sign bytes per token per KV head
"""QJL residual (TurboQuant-prod keys): the estimator against its math (unbiased, bounded variance), the reference
encode and attention against plain oracles, then the Triton kernels (interpreted on CPU) against the reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import kv_quant as kq  # noqa: E402
from kernels.qjl import (QJLResidual, pack_signs, qjl_decode, qjl_num_bytes, qjl_projection,  # noqa: E402
                         qjl_sketch_query, reference_qjl_encode, unpack_signs)
from tests.unit.test_kv_quant_kernels import make_plan, make_tokens, unpack_codes  # noqa: E402
from workers.kv.quant_plan import build_side_plan  # noqa: E402


@pytest.mark.parametrize("head_dim", [64, 24, 13])
def test_sign_bits_pack_little_endian_and_round_trip(head_dim):
    positive = torch.rand(5, 3, head_dim, generator=torch.Generator().manual_seed(head_dim)) > 0.5
    packed = pack_signs(positive)
    assert packed.shape == (5, 3, qjl_num_bytes(head_dim)) and packed.dtype == torch.uint8
    expected = np.packbits(positive.numpy(), axis=-1, bitorder="little")  # bit j at byte j >> 3, shift j & 7
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_signs(packed, head_dim), positive.float() * 2 - 1)


def test_residual_estimate_is_unbiased_with_the_predicted_variance():
    """E_P[q . r_tilde] = q . r; Var = (pi/2 - 1) / D * |q|^2 |r|^2 for q parallel to r, and at most
    pi / (2 D) * |q|^2 |r|^2 for any q (the QJL lemma)."""
    D, trials = 64, 4000
    gen = torch.Generator().manual_seed(0)
    residual = torch.randn(1, 1, D, generator=gen)
    queries = torch.stack([residual[0, 0], torch.randn(D, generator=gen)])  # parallel, and a random direction
    estimates = torch.empty(trials, 2)
    for trial in range(trials):
        projection = qjl_projection(1, D, seed=1000 + trial)
        signs, norms = reference_qjl_encode(residual, projection)
        estimates[trial] = queries @ qjl_decode(signs, norms, projection)[0, 0]
    exact = queries @ residual[0, 0]
    spread = estimates.std(0)
    assert ((estimates.mean(0) - exact).abs() < 4 * spread / math.sqrt(trials)).all()  # unbiased
    predicted = math.sqrt((math.pi / 2 - 1) / D) * queries[0].norm() * residual.norm()
    assert abs(spread[0] / predicted - 1) < 0.1
    bound = math.sqrt(math.pi / (2 * D)) * queries[1].norm() * residual.norm()
    assert spread[1] <= bound * 1.05


def test_reference_encode_stores_the_signs_and_norm_of_the_codes_own_residual():
    plan = build_side_plan(torch.full((2, 32), 3), seed=3, qjl=True)
    x = make_tokens(plan, 9, seed=4)
    codes, scales, signs, norms = kq.reference_kv_encode(x, plan.transform, plan.center, plan.layout,
                                                         plan.qjl_projection)
    plain_codes, plain_scales = kq.reference_kv_encode(x, plan.transform, plan.center, plan.layout)
    assert torch.equal(codes, plain_codes) and torch.equal(scales, plain_scales)  # the MSE part is unchanged
    y = torch.einsum("hij,thj->thi", plan.transform.double(), (x - plan.center).double())
    residual = y - kq.reference_kv_decode(codes, scales, plan.layout).double()  # what the pages decode to
    projected = torch.einsum("hij,thj->thi", plan.qjl_projection.double(), residual)
    assert signs.shape == (9, 2, 4) and norms.shape == (9, 2) and norms.dtype == torch.float16
    decided = projected.abs() > 1e-5  # float32 vs float64 may flip a sign only at ~0
    assert torch.equal(unpack_signs(signs, 32)[decided], torch.where(projected >= 0, 1.0, -1.0).float()[decided])
    torch.testing.assert_close(norms.double(), residual.norm(dim=-1), rtol=1e-3, atol=1e-6)
    assert (norms[0] == 0).all()  # token 0 is the center: y = 0 is coded exactly, nothing left over


def paged_qjl_inputs(seq_lens, G, Hkv, D, S, *, seed, key_garbage=30.0):
    """Paged keys encoded with a QJL residual (and values without), shuffled blocks, garbage in unused slots
    (`key_garbage` in the unused key scales and QJL norms)."""
    gen = torch.Generator().manual_seed(seed)
    key_plan = build_side_plan(torch.full((Hkv, D), 2), seed=seed, qjl=True)
    value_plan = make_plan("uniform4", Hkv, D, seed=seed + 1)
    blocks_needed = [math.ceil(n / S) for n in seq_lens]
    N, M = sum(blocks_needed) + 2, max(blocks_needed) + 1
    arrays = {
        "key_codes": torch.randint(0, 256, (N, S, Hkv, key_plan.layout.num_bytes), generator=gen, dtype=torch.uint8),
        "key_scales": torch.full((N, S, Hkv, 1), key_garbage, dtype=torch.float16),
        "signs": torch.randint(0, 256, (N, S, Hkv, qjl_num_bytes(D)), generator=gen, dtype=torch.uint8),
        "norms": torch.full((N, S, Hkv), key_garbage, dtype=torch.float16),
        "value_codes": torch.randint(0, 256, (N, S, Hkv, value_plan.layout.num_bytes), generator=gen,
                                     dtype=torch.uint8),
        "value_scales": torch.full((N, S, Hkv, 1), 30.0, dtype=torch.float16),
    }
    perm = torch.randperm(N, generator=gen)
    block_tables = torch.randint(0, N, (len(seq_lens), M), generator=gen, dtype=torch.int32)
    used = 0
    for b, (num_tokens, num_blocks) in enumerate(zip(seq_lens, blocks_needed)):
        ids = perm[used:used + num_blocks]
        used += num_blocks
        block_tables[b, :num_blocks] = ids.to(torch.int32)
        keys = key_plan.center + torch.randn(num_tokens, Hkv, D, generator=gen) * 2
        values = torch.randn(num_tokens, Hkv, D, generator=gen)
        encoded = {**dict(zip(("key_codes", "key_scales", "signs", "norms"), kq.reference_kv_encode(
            keys, key_plan.transform, key_plan.center, key_plan.layout, key_plan.qjl_projection))),
            **dict(zip(("value_codes", "value_scales"), kq.reference_kv_encode(
                values, value_plan.transform, value_plan.center, value_plan.layout)))}
        for t in range(num_tokens):
            for name, array in encoded.items():
                arrays[name][ids[t // S], t % S] = array[t]
    query = torch.randn(len(seq_lens), G * Hkv, D, generator=gen)
    qjl = QJLResidual(arrays["signs"], arrays["norms"], qjl_sketch_query(query, key_plan.qjl_projection))
    args = (query, arrays["key_codes"], arrays["key_scales"], key_plan.layout, arrays["value_codes"],
            arrays["value_scales"], value_plan.layout, block_tables, torch.tensor(seq_lens, dtype=torch.int32))
    return args, qjl, key_plan


def test_reference_attention_with_qjl_equals_dense_attention_over_mse_plus_residual_keys():
    D, S, G, Hkv = 32, 4, 2, 2
    args, qjl, key_plan = paged_qjl_inputs([9, 1, 14], G, Hkv, D, S, seed=5)
    query, key_codes, key_scales, key_layout, value_codes, value_scales, value_layout, block_tables, seq_lens = args
    scale = D ** -0.5
    out = kq.reference_quant_paged_decode_attention(*args, scale, qjl=qjl)
    without = kq.reference_quant_paged_decode_attention(*args, scale)
    assert (out - without).abs().max() > 1e-3  # the residual term is really there
    for b, n in enumerate(seq_lens.tolist()):
        blocks = block_tables[b, :math.ceil(n / S)].long()
        keys = (kq.reference_kv_decode(key_codes[blocks], key_scales[blocks], key_layout)
                + qjl_decode(qjl.signs[blocks], qjl.norms[blocks], key_plan.qjl_projection)).reshape(-1, Hkv, D)[:n]
        values = kq.reference_kv_decode(value_codes[blocks], value_scales[blocks], value_layout).reshape(-1, Hkv, D)[:n]
        for h in range(G * Hkv):
            probs = torch.softmax(keys[:, h // G].double() @ query[b, h].double() * scale, dim=0)
            torch.testing.assert_close(out[b, h].double(), probs @ values[:, h // G].double(), rtol=0, atol=1e-5)


pytestmark_triton = pytest.mark.skipif(not kq._HAS_TRITON, reason="triton is not installed")


@pytestmark_triton
@pytest.mark.parametrize("kind,Hkv,D", [("uniform3", 2, 64), ("mixed", 3, 32), ("sparse", 1, 24)])
def test_triton_encode_with_qjl_matches_reference(kind, Hkv, D):
    plan = make_plan(kind, Hkv, D, seed=9)
    projection = qjl_projection(Hkv, D, seed=10)
    x = make_tokens(plan, 10, seed=11)
    ref = kq.reference_kv_encode(x, plan.transform, plan.center, plan.layout, projection)
    got = kq.triton_kv_encode(x, plan.transform, plan.center, plan.layout, projection)
    assert [t.shape for t in got] == [t.shape for t in ref] and [t.dtype for t in got] == [t.dtype for t in ref]
    same_codes = (unpack_codes(got[0], plan.layout) == unpack_codes(ref[0], plan.layout)).all(-1)  # [T, Hkv]
    assert same_codes.float().mean() >= 0.9  # summation order may move a code across a threshold, rarely
    # Where the codes agree, the residual is the same up to float rounding: signs may differ only where a
    # projection is ~0, and the norms agree to fp16 precision.
    sign_agreement = (unpack_signs(got[2], D) == unpack_signs(ref[2], D))[same_codes].float().mean()
    assert sign_agreement >= 0.99
    torch.testing.assert_close(got[3][same_codes].float(), ref[3][same_codes].float(), rtol=2e-3, atol=1e-4)
    assert (got[3][0] == 0).all()


@pytestmark_triton
@pytest.mark.parametrize("seq_lens,G,Hkv,D,S", [([5, 1, 16], 2, 2, 32, 8), ([7, 3], 3, 1, 64, 4),
                                                ([6], 1, 3, 24, 4)])
def test_triton_attention_with_qjl_matches_reference(seq_lens, G, Hkv, D, S):
    args, qjl, _ = paged_qjl_inputs(seq_lens, G, Hkv, D, S, seed=sum(seq_lens))
    scale = D ** -0.5
    expected = kq.reference_quant_paged_decode_attention(*args, scale, qjl=qjl)
    torch.testing.assert_close(kq.triton_quant_paged_decode_attention(*args, scale, qjl=qjl), expected,
                               rtol=0, atol=1e-4)
    # Block mass (eviction scores) sees the same scores, residual included.
    _, mass = kq.triton_quant_paged_decode_attention(*args, scale, qjl=qjl, with_block_mass=True)
    _, expected_mass = kq.reference_quant_paged_decode_attention(*args, scale, qjl=qjl, with_block_mass=True)
    torch.testing.assert_close(mass, expected_mass, rtol=0, atol=1e-4)


@pytestmark_triton
def test_triton_attention_with_qjl_ignores_nan_garbage_in_unused_slots():
    """Unused slots' key scales and residual norms may hold anything: the kernel masks them before the math."""
    finite_args, finite_qjl, _ = paged_qjl_inputs([5, 2], 2, 2, 32, 4, seed=8)
    args, qjl, _ = paged_qjl_inputs([5, 2], 2, 2, 32, 4, seed=8, key_garbage=float("nan"))
    assert torch.isnan(qjl.norms).any() and torch.isnan(args[2]).any()
    out = kq.triton_quant_paged_decode_attention(*args, 32 ** -0.5, qjl=qjl)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, kq.reference_quant_paged_decode_attention(*finite_args, 32 ** -0.5,
                                                                              qjl=finite_qjl), rtol=0, atol=1e-4)
