"""Paged decode attention: torch reference vs a naive oracle, Triton (interpreted) vs reference."""

import os

# Must be set before triton is imported anywhere: @triton.jit picks the interpreter at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import cpu_native  # noqa: E402
from kernels import paged_attention as pa  # noqa: E402
from kernels.cpu_native import native_kernels, native_paged_decode_attention  # noqa: E402

GARBAGE = 1e30  # huge but finite; NaN/inf garbage is tested separately


def make_paged_inputs(
    seq_lens: list[int],
    H: int,
    Hkv: int,
    D: int,
    S: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    extra_blocks: int = 5,
    garbage: float = GARBAGE,
) -> tuple[torch.Tensor, ...]:
    """Random paged inputs. Every pool slot not holding a real token (unused blocks, the tail of
    each sequence's last block) is filled with `garbage`; blocks are assigned in shuffled order
    and block_tables padding points at random (garbage) blocks."""
    gen = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    blocks_needed = [math.ceil(n / S) for n in seq_lens]
    M = max(blocks_needed) + 2  # always some padding columns
    N = sum(blocks_needed) + extra_blocks

    key_cache = torch.full((N, S, Hkv, D), garbage, dtype=dtype)
    value_cache = torch.full((N, S, Hkv, D), -garbage, dtype=dtype)
    perm = torch.randperm(N, generator=gen)  # non-contiguous, out-of-order pages
    block_tables = torch.randint(0, N, (B, M), generator=gen, dtype=torch.int32)  # padding = random ids
    used = 0
    for b, (n_tok, n_blk) in enumerate(zip(seq_lens, blocks_needed)):
        ids = perm[used : used + n_blk]
        used += n_blk
        block_tables[b, :n_blk] = ids.to(torch.int32)
        for t in range(n_tok):
            key_cache[ids[t // S], t % S] = torch.randn(Hkv, D, generator=gen).to(dtype)
            value_cache[ids[t // S], t % S] = torch.randn(Hkv, D, generator=gen).to(dtype)
    query = torch.randn(B, H, D, generator=gen).to(dtype)
    return query, key_cache, value_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32)


def naive_attention(query, key_cache, value_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    """Oracle: per sequence, rebuild contiguous K/V from the pages, per head, float64 softmax."""
    B, H, D = query.shape
    _, S, Hkv, _ = key_cache.shape
    G = H // Hkv
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        blocks = [int(block_tables[b, i]) for i in range(math.ceil(n / S))]
        k = torch.cat([key_cache[i] for i in blocks])[:n].double()  # [n, Hkv, D]
        v = torch.cat([value_cache[i] for i in blocks])[:n].double()
        for h in range(H):
            probs = torch.softmax(k[:, h // G] @ query[b, h].double() * scale, dim=0)
            out[b, h] = probs @ v[:, h // G]
    return out


# (seq_lens, H, Hkv, D, S)
REFERENCE_CASES = [
    pytest.param([37, 1, 64, 100], 9, 3, 64, 16, id="gqa9/3-d64-mixed"),  # the real model
    pytest.param([1], 9, 3, 64, 16, id="gqa-single-token"),
    pytest.param([1, 1, 1], 4, 4, 32, 8, id="mha-all-len1"),
    pytest.param([32, 48, 16], 4, 4, 32, 16, id="mha-multiple-of-S"),
    pytest.param([5, 200, 77, 130, 9], 8, 2, 16, 32, id="gqa8/2-S32"),
    pytest.param([50, 3], 6, 1, 24, 4, id="mqa-d24-S4"),
]


@pytest.mark.parametrize("seq_lens,H,Hkv,D,S", REFERENCE_CASES)
def test_reference_matches_naive(seq_lens, H, Hkv, D, S):
    inputs = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=sum(seq_lens) * 31 + H * 7 + D)
    scale = D**-0.5
    expected = naive_attention(*inputs, scale)
    out = pa.reference_paged_decode_attention(*inputs, scale)
    assert out.dtype == torch.float32 and out.shape == inputs[0].shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_lens,H,Hkv,D,S", REFERENCE_CASES)
def test_sdpa_fast_path_matches_naive(seq_lens, H, Hkv, D, S):
    inputs = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=sum(seq_lens) * 17 + H)
    scale = D**-0.5
    out = pa.sdpa_paged_decode_attention(*inputs, scale)
    torch.testing.assert_close(out.double(), naive_attention(*inputs, scale), atol=1e-5, rtol=1e-5)


def test_sdpa_fast_path_ignores_finite_garbage():
    # Precondition of the SDPA path: pages hold finite values (the pool is zero-initialised and only
    # ever receives model K/V); masked slots then contribute exactly nothing.
    seq_lens, H, Hkv, D, S = [13, 40, 1], 6, 2, 16, 8
    clean = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=3, garbage=0.0)
    dirty = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=3, garbage=1e4)
    torch.testing.assert_close(pa.sdpa_paged_decode_attention(*dirty, 0.25),
                               pa.sdpa_paged_decode_attention(*clean, 0.25), atol=0, rtol=0)


@pytest.mark.parametrize("chunk_blocks", [1, 2, 3])
def test_reference_chunked_matches_naive(chunk_blocks):
    # Small chunks force the multi-chunk gather path that long sequences take in production.
    inputs = make_paged_inputs([37, 1, 64, 100, 16], 9, 3, 64, 16, seed=7)
    expected = naive_attention(*inputs, 0.125)
    out = pa.reference_paged_decode_attention(*inputs, 0.125, chunk_blocks=chunk_blocks)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("garbage", [1e4, float("nan"), float("inf")])
def test_garbage_in_unused_slots_has_no_influence(impl, garbage):
    fn = {"reference": pa.reference_paged_decode_attention, "triton": pa.triton_paged_decode_attention}[impl]
    seq_lens, H, Hkv, D, S = [13, 40, 1], 6, 2, 16, 8
    clean = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=3, garbage=0.0)
    dirty = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=3, garbage=garbage)
    out_clean = fn(*clean, 0.25)
    out_dirty = fn(*dirty, 0.25)
    assert torch.isfinite(out_dirty).all()
    # Masked slots contribute exactly zero, so the result is bit-identical.
    torch.testing.assert_close(out_dirty, out_clean, atol=0, rtol=0)


def test_reference_bf16_matches_naive():
    inputs = make_paged_inputs([20, 45], 9, 3, 64, 16, seed=11, dtype=torch.bfloat16)
    expected = naive_attention(*inputs, 0.125)
    out = pa.reference_paged_decode_attention(*inputs, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


triton_required = pytest.mark.skipif(not pa._HAS_TRITON, reason="triton not installed")

# Small shapes: the interpreter runs the kernel in numpy, one program at a time.
TRITON_CASES = [
    pytest.param([37, 1, 48], 9, 3, 64, 16, id="gqa9/3-d64"),
    pytest.param([16, 5], 4, 4, 32, 8, id="mha-multiple-of-S"),
    pytest.param([1, 30], 4, 1, 16, 16, id="mqa-len1"),
    pytest.param([23, 9], 4, 2, 24, 8, id="d24-not-pow2"),
]


@triton_required
@pytest.mark.parametrize("seq_lens,H,Hkv,D,S", TRITON_CASES)
def test_triton_matches_reference(seq_lens, H, Hkv, D, S):
    inputs = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=sum(seq_lens) + D)
    scale = D**-0.5
    expected = pa.reference_paged_decode_attention(*inputs, scale)
    out = pa.triton_paged_decode_attention(*inputs, scale)
    assert out.dtype == torch.float32 and out.shape == inputs[0].shape
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@triton_required
def test_triton_bf16_matches_reference():
    inputs = make_paged_inputs([19, 8], 6, 3, 32, 8, seed=5, dtype=torch.bfloat16)
    expected = pa.reference_paged_decode_attention(*inputs, 0.2)
    out = pa.triton_paged_decode_attention(*inputs, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_triton_missing_raises_clear_error(monkeypatch):
    monkeypatch.setattr(pa, "_HAS_TRITON", False)
    inputs = make_paged_inputs([3], 2, 1, 8, 4, seed=0)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        pa.triton_paged_decode_attention(*inputs, 1.0)


def test_dispatcher_uses_torch_paths_on_cpu(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("Triton path taken for CPU tensors")

    monkeypatch.setattr(pa, "native_paged_decode_attention", lambda *args: None)  # as without a C compiler

    taken = []
    for name in ("sdpa_paged_decode_attention", "reference_paged_decode_attention"):
        original = getattr(pa, name)
        monkeypatch.setattr(pa, name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k))
    monkeypatch.setattr(pa, "triton_paged_decode_attention", must_not_run)
    small = make_paged_inputs([10, 33], 9, 3, 64, 16, seed=1)
    torch.testing.assert_close(pa.paged_decode_attention(*small, 0.125),
                               naive_attention(*small, 0.125).float(), atol=1e-5, rtol=1e-5)
    large = make_paged_inputs([1500, 900], 9, 3, 64, 16, seed=2)
    torch.testing.assert_close(pa.paged_decode_attention(*large, 0.125),
                               naive_attention(*large, 0.125).float(), atol=1e-5, rtol=1e-5)
    assert taken == ["sdpa_paged_decode_attention", "reference_paged_decode_attention"]


native_required = pytest.mark.skipif(native_kernels() is None, reason="no C compiler: native kernels are off")


# The native kernel runs as many query heads of 64 per pass over a KV head's pages as keep 12 vectors of queries
# in registers (3 with AVX-512, 1 with AVX2), split evenly; heads of 128 and of other sizes go one at a time.
# Groups of 4 (2 passes of 2), 8 wide heads, 12 (4 passes of 3) and heads of 40 (vector tails) cover each path.
NATIVE_CASES = REFERENCE_CASES + [
    pytest.param([40, 7, 129], 32, 8, 64, 16, id="gqa32/8-d64"),
    pytest.param([30, 90], 16, 2, 128, 16, id="gqa16/2-d128"),
    pytest.param([17, 64], 12, 1, 64, 16, id="mqa12-d64"),
    pytest.param([23, 50], 4, 2, 40, 16, id="gqa4/2-d40"),
]


@native_required
@pytest.mark.parametrize("page_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seq_lens,H,Hkv,D,S", NATIVE_CASES)
def test_native_matches_naive(seq_lens, H, Hkv, D, S, page_dtype):
    """fp32 queries over fp32 or fp16 pages; fp16 rows are widened exactly, so the bound is fp32's either way."""
    query, key_cache, value_cache, block_tables, lens = make_paged_inputs(seq_lens, H, Hkv, D, S,
                                                                           seed=sum(seq_lens) * 13 + H + D)
    inputs = (query, key_cache.to(page_dtype), value_cache.to(page_dtype), block_tables, lens)
    if page_dtype == torch.float16 and not native_kernels().native_has_half():
        pytest.skip("this CPU has no F16C: fp16 pages take the torch path (tested below)")
    out = native_paged_decode_attention(*inputs, D**-0.5)
    assert out.dtype == torch.float32 and out.shape == query.shape
    torch.testing.assert_close(out.double(), naive_attention(*inputs, D**-0.5), atol=1e-5, rtol=1e-5)


@native_required
def test_native_reads_query_rows_in_place_from_a_wider_row():
    """The decode query is a view into the fused qkv rows (rows H*D + 2*Hkv*D apart): read in place, same result."""
    query, key_cache, value_cache, block_tables, lens = make_paged_inputs([30, 5, 77], 9, 3, 64, 16, seed=8)
    qkv = torch.randn(3, (9 + 2 * 3) * 64)
    qkv[:, :9 * 64] = query.reshape(3, -1)
    strided = qkv[:, :9 * 64].view(3, 9, 64)
    assert strided.stride(0) == 15 * 64
    out = native_paged_decode_attention(strided, key_cache, value_cache, block_tables, lens, 0.125)
    assert torch.equal(out, native_paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 0.125))
    torch.testing.assert_close(out.double(), naive_attention(query, key_cache, value_cache, block_tables, lens, 0.125),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page_dtype", [torch.float16, torch.bfloat16])
def test_dispatcher_runs_fp32_queries_over_lower_precision_pages(page_dtype):
    """fp16 pages take the native kernel where it is built, bf16 the reference; both do fp32 math and return fp32."""
    # Unused slots hold finite garbage in the page dtype (the SDPA path's precondition; 1e30 would be fp16 inf).
    query, key_cache, value_cache, block_tables, lens = make_paged_inputs([10, 33, 70], 9, 3, 64, 16, seed=6,
                                                                           garbage=1e3)
    inputs = (query, key_cache.to(page_dtype), value_cache.to(page_dtype), block_tables, lens)
    out = pa.paged_decode_attention(*inputs, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_attention(*inputs, 0.125), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pa.reference_paged_decode_attention(*inputs, 0.125), out, atol=1e-5, rtol=1e-5)


def test_native_kernels_build_wherever_there_is_a_c_compiler():
    """The native tests skip without a compiler; with one, a build that fails must fail here, not skip quietly."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert native_kernels() is not None


@native_required
def test_native_reads_only_the_sequences_own_tokens_and_is_batch_invariant():
    """NaN/inf in every slot a sequence does not own is never read; a sequence's output is bit-identical alone and
    inside a batch, whether the work is split by whole page rows (the batch, 2 threads) or by KV head (alone)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # pinned: the batch takes the threaded whole-row split on any machine
    try:
        seq_lens, H, Hkv, D, S = [13, 700, 1, 64, 2000], 9, 3, 64, 16
        for garbage in (float("nan"), float("inf")):
            query, key_cache, value_cache, block_tables, lens = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=5,
                                                                                  garbage=garbage)
            batch = native_paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 0.125)
            assert torch.isfinite(batch).all()
            for b in range(len(seq_lens)):
                alone = native_paged_decode_attention(query[b:b + 1], key_cache, value_cache, block_tables[b:b + 1],
                                                      lens[b:b + 1], 0.125)
                assert torch.equal(alone[0], batch[b])
            clean = make_paged_inputs(seq_lens, H, Hkv, D, S, seed=5, garbage=0.0)
            torch.testing.assert_close(batch.double(), naive_attention(query, *clean[1:], 0.125), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@native_required
def test_native_refuses_tables_that_point_outside_the_pool():
    """C trusts nothing it is not told: a length past the table or a block id past the pool raises, as in torch."""
    query, key_cache, value_cache, block_tables, seq_lens = make_paged_inputs([20, 5], 9, 3, 64, 16, seed=4)
    too_long = seq_lens.clone()
    too_long[1] = block_tables.shape[1] * 16 + 1
    with pytest.raises(AssertionError, match="block_tables has only"):
        native_paged_decode_attention(query, key_cache, value_cache, block_tables, too_long, 0.125)
    for bad_id in (key_cache.shape[0], -1, 10**9):
        bad = block_tables.clone()
        bad[0, 1] = bad_id
        with pytest.raises(IndexError, match="outside the pool"):
            native_paged_decode_attention(query, key_cache, value_cache, bad, seq_lens, 0.125)


@native_required
def test_dispatcher_takes_the_native_kernel_for_fp32_cpu_and_torch_otherwise():
    inputs = make_paged_inputs([10, 33], 9, 3, 64, 16, seed=1)
    assert torch.equal(pa.paged_decode_attention(*inputs, 0.125), native_paged_decode_attention(*inputs, 0.125))
    bf16 = make_paged_inputs([10, 33], 9, 3, 64, 16, seed=1, dtype=torch.bfloat16)
    assert native_paged_decode_attention(*bf16, 0.125) is None  # fp32 only: bf16 takes the torch paths
    assert pa.paged_decode_attention(*bf16, 0.125).dtype == torch.bfloat16


def test_native_build_failure_leaves_the_torch_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("TIERSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert cpu_native._build() is None
    assert not list(tmp_path.glob("*.so"))


def test_dispatcher_rejects_bad_shapes():
    q, k, v, bt, sl = make_paged_inputs([10, 33], 9, 3, 64, 16, seed=1)
    with pytest.raises(AssertionError, match="multiple of KV heads"):
        pa.paged_decode_attention(q[:, :8], k, v, bt, sl, 0.125)
    with pytest.raises(AssertionError, match="head dim mismatch"):
        pa.paged_decode_attention(q[..., :32], k, v, bt, sl, 0.125)
    with pytest.raises(AssertionError, match="block_tables must be int32"):
        pa.paged_decode_attention(q, k, v, bt.long(), sl, 0.125)
    with pytest.raises(AssertionError, match="seq_lens must be"):
        pa.paged_decode_attention(q, k, v, bt, sl[:1], 0.125)
    with pytest.raises(AssertionError, match="must match query dtype"):
        pa.paged_decode_attention(q.half(), k, v, bt, sl, 0.125)  # only an fp32 query may read other pages
    with pytest.raises(AssertionError, match="must match query dtype"):
        pa.paged_decode_attention(q, k.half(), v, bt, sl, 0.125)
