# B=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, N=blocks in the pool,
# S=block size (tokens), M=max blocks per sequence, L=tokens covered by the gathered blocks
"""Decode-time attention over a paged KV cache.

One query token per sequence attends to its ``seq_lens[b]`` cached tokens, which live in
fixed-size blocks of a shared pool: token ``t`` of sequence ``b`` is at
``cache[block_tables[b, t // S], t % S]``. With ``tail_masks`` [B] int64 a row also hides some of its last 64
tokens: a draft tree's rows see their ancestors only (kernels/tree_mask.py).

* ``reference_paged_decode_attention`` - plain torch: the spec; on the CPU the path for block mass, or without C.
* ``triton_paged_decode_attention``   - Triton kernel (GPU, or CPU under TRITON_INTERPRET=1).
* ``native_paged_decode_attention``   - C kernel reading pages in place (CPU: fp32 query over fp32 or fp16 pages;
  kernels/cpu_native.py).
* ``paged_decode_attention``          - validates shapes and picks: Triton on CUDA; on the CPU the C kernel, else
  SDPA over gathered pages (small batches) or the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.block_mass import block_mass_from_lse, block_mass_from_probs, gather_token_weights, mass_buffers
from kernels.cpu_native import native_paged_decode_attention
from kernels.tree_mask import check_tail_masks, visible_tokens
from kernels.triton_support import HAS_TRITON as _HAS_TRITON, tl, triton

if _HAS_TRITON:
    from kernels.block_mass import store_block_log_mass

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PAGE_DTYPES = {torch.float32: (torch.float16, torch.bfloat16), torch.float16: (), torch.bfloat16: ()}

# The CPU path gathers K (then V) in chunks of blocks so the gather buffer stays about this
# many elements (32 MiB in fp32) however long the sequences are: one gather for B=32 x 8192
# tokens would allocate hundreds of MiB per call, and faulting in that fresh memory costs
# more than the attention math. Measured ~2x faster than a single gather at B=32, 8k tokens
# (9/3 heads, D=64); 4-16M elements all performed about the same, 1-3M was slower.
_CPU_CHUNK_ELEMS = 8 * 1024 * 1024


def _check_inputs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """Cheap metadata-only checks (no device sync, no reading of tensor values)."""
    assert query.dim() == 3, f"query must be [B, H, D], got shape {tuple(query.shape)}"
    assert key_cache.dim() == 4, f"key_cache must be [N, S, Hkv, D], got shape {tuple(key_cache.shape)}"
    assert value_cache.shape == key_cache.shape, (
        f"value_cache shape {tuple(value_cache.shape)} != key_cache shape {tuple(key_cache.shape)}"
    )
    B, H, D = query.shape
    _, _, Hkv, Dk = key_cache.shape
    assert Dk == D, f"head dim mismatch: query D={D}, cache D={Dk}"
    assert Hkv > 0 and H % Hkv == 0, f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}"
    assert query.dtype in _SUPPORTED_DTYPES, f"query dtype {query.dtype} not in {_SUPPORTED_DTYPES}"
    # An fp32 query may attend over lower-precision pages (the CPU paths do the math in fp32 either way).
    assert value_cache.dtype == key_cache.dtype and key_cache.dtype in (query.dtype, *_PAGE_DTYPES[query.dtype]), (
        f"cache dtypes ({key_cache.dtype}, {value_cache.dtype}) must match query dtype {query.dtype}"
    )
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, (
        f"block_tables must be [B={B}, M], got shape {tuple(block_tables.shape)}"
    )
    assert block_tables.dtype == torch.int32, f"block_tables must be int32, got {block_tables.dtype}"
    assert seq_lens.shape == (B,), f"seq_lens must be [B={B}], got shape {tuple(seq_lens.shape)}"
    assert seq_lens.dtype == torch.int32, f"seq_lens must be int32, got {seq_lens.dtype}"
    devices = {t.device for t in (query, key_cache, value_cache, block_tables, seq_lens)}
    assert len(devices) == 1, f"all inputs must be on one device, got {devices}"


def reference_paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    chunk_blocks: int | None = None,
    token_weights: torch.Tensor | None = None,
    with_block_mass: bool = False,
    tail_masks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch paged decode attention; fp32 math, output in query's dtype.

    With ``with_block_mass`` also returns the per-block attention mass [B, Hkv, M] (kernels/block_mass.py),
    weighted per token by ``token_weights`` [N, S, Hkv] when given.

    Two passes over the sequences' blocks, ``chunk_blocks`` block columns at a time
    (default: sized from ``_CPU_CHUNK_ELEMS``): pass 1 fills the full score matrix
    [Hkv, B, G, L] (small: no D), one exact softmax, pass 2 accumulates probs @ V.
    Loops run over chunks and KV heads only, never over the batch.
    """
    B, H, D = query.shape
    N, S, Hkv, _ = key_cache.shape
    G = H // Hkv
    if B == 0:
        out = query.new_empty(B, H, D)
        return (out, query.new_zeros(B, Hkv, block_tables.shape[1], dtype=torch.float32)) if with_block_mass else out

    # Only gather as many block columns as the longest sequence needs; the rest of
    # block_tables is padding.
    n_blocks = -(-int(seq_lens.max()) // S)
    assert n_blocks <= block_tables.shape[1], (
        f"max(seq_lens) needs {n_blocks} blocks but block_tables has only {block_tables.shape[1]} columns"
    )
    L = n_blocks * S
    if chunk_blocks is None:
        chunk_blocks = max(1, _CPU_CHUNK_ELEMS // (B * S * Hkv * D))
    chunk_blocks = min(chunk_blocks, n_blocks)

    device = query.device
    table = block_tables[:, :n_blocks].long()
    invalid = ~visible_tokens(seq_lens, tail_masks, L)  # [B, L]
    # Scale folded into q: B*H*D multiplies instead of B*H*L.
    q = (query.float() * scale).view(B, Hkv, G, D)
    # Pool viewed as rows of one block each (a free view of a contiguous pool), so a gather
    # is one contiguous memcpy per block.
    k_rows = key_cache.reshape(N, S * Hkv * D)
    v_rows = value_cache.reshape(N, S * Hkv * D)
    buf = torch.empty(B * chunk_blocks, S * Hkv * D, dtype=key_cache.dtype, device=device)

    def gather(rows: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """Blocks c0..c1-1 of every sequence as fp32 [B, (c1-c0)*S, Hkv, D]."""
        idx = table[:, c0:c1].reshape(-1)
        out = torch.index_select(rows, 0, idx, out=buf[: idx.numel()])
        return out.view(B, (c1 - c0) * S, Hkv, D).float()

    # Looping over KV heads lets bmm read K/V for head h in place through strides
    # (row stride Hkv*D); a single [B, Hkv, L, D] matmul would first need a transpose copy
    # of all of K and V, which costs more than the matmuls themselves. Scores and output are
    # head-major [Hkv, B, ...] so each per-head bmm writes a contiguous slice (a strided
    # out= makes baddbmm fall back to one small matmul per sequence).
    scores = torch.empty(Hkv, B, G, L, dtype=torch.float32, device=device)
    for c0 in range(0, n_blocks, chunk_blocks):
        c1 = min(c0 + chunk_blocks, n_blocks)
        k = gather(k_rows, c0, c1)
        for h in range(Hkv):
            torch.bmm(q[:, h], k[:, :, h].transpose(1, 2), out=scores[h, :, :, c0 * S : c1 * S])
    # masked_fill (not an additive mask) so that inf/NaN garbage in padding slots cannot leak.
    scores.masked_fill_(invalid[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # seq_len >= 1, so no row is all -inf

    out = torch.zeros(Hkv, B, G, D, dtype=torch.float32, device=device)
    for c0 in range(0, n_blocks, chunk_blocks):
        c1 = min(c0 + chunk_blocks, n_blocks)
        v = gather(v_rows, c0, c1)
        # probs are exactly 0 past seq_len, but 0 * NaN = NaN: zero those V rows too, in case
        # the pool holds uninitialised memory. Only the (few) rows past seq_len are touched (a tree's hidden
        # cousins are written, finite K/V).
        past_end = torch.arange(c0 * S, c1 * S, device=device)[None, :] >= seq_lens[:, None].long()
        bad_rows = past_end.reshape(-1).nonzero().squeeze(1)
        v.view(-1, Hkv * D).index_fill_(0, bad_rows, 0.0)
        for h in range(Hkv):
            out[h].baddbmm_(probs[h, :, :, c0 * S : c1 * S], v[:, :, h])
    out = out.transpose(0, 1).reshape(B, H, D).to(query.dtype)
    if not with_block_mass:
        return out
    weights = gather_token_weights(token_weights, table) if token_weights is not None else None
    return out, block_mass_from_probs(probs.permute(1, 0, 2, 3), weights, S, block_tables.shape[1])


# Below this many gathered tokens (B x L) one fused SDPA call beats the chunked reference: at small
# sizes the cost is the number of ops, not bytes (measured on 2 cores: B=1, L=150: 0.18 vs 0.31 ms).
SDPA_MAX_GATHERED_TOKENS = 2048


def sdpa_paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    tail_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather whole pages, then one torch SDPA call with a length mask (small-batch CPU fast path)."""
    B, H, D = query.shape
    _, S, Hkv, _ = key_cache.shape
    n_blocks = -(-int(seq_lens.max()) // S)
    L = n_blocks * S
    table = block_tables[:, :n_blocks].long()
    # [B, Hkv, L, D] (a view of the gather: no second copy); lower-precision pages widen to the query's dtype
    key = key_cache[table].to(query.dtype).view(B, L, Hkv, D).transpose(1, 2)
    value = value_cache[table].to(query.dtype).view(B, L, Hkv, D).transpose(1, 2)
    mask = visible_tokens(seq_lens, tail_masks, L).view(B, 1, 1, L)
    out = F.scaled_dot_product_attention(query.unsqueeze(2), key, value, attn_mask=mask, scale=scale,
                                         enable_gqa=True)  # [B, H, 1, D]
    return out.view(B, H, D)


if _HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, tm_ptr, out_ptr,
        w_ptr, block_lse_ptr, lse_ptr,
        scale,
        stride_qb, stride_qh,
        stride_kn, stride_ks, stride_kh,
        stride_vn, stride_vs, stride_vh,
        stride_btb,
        stride_ob, stride_oh,
        stride_wn, stride_ws,
        stride_mb, stride_mh, stride_lb,
        G: tl.constexpr, D: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
        WITH_MASS: tl.constexpr, WITH_WEIGHTS: tl.constexpr, HAS_TAIL: tl.constexpr,
    ):
        # One program per (sequence, KV head), handling that head's G query heads together:
        # decode is bound by reading K/V, and this way each K/V tile is loaded once for all
        # G query heads instead of G times (3x less traffic for the 9/3 GQA model).
        seq = tl.program_id(0)
        kvh = tl.program_id(1)

        offs_g = tl.arange(0, BLOCK_G)  # BLOCK_G = G rounded up to a power of two
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D = D rounded up to a power of two
        g_mask = offs_g < G
        d_mask = offs_d < D
        heads = kvh * G + offs_g

        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        q = q * scale  # padded rows/cols are 0, so their scores are finite (0), never NaN

        seq_len = tl.load(sl_ptr + seq)
        if HAS_TAIL:
            tail_mask = tl.load(tm_ptr + seq)  # int64: bit i = token seq_len - 1 - i is visible (tree_mask.py)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of scores
        l_i = tl.zeros([BLOCK_G], tl.float32)  # running softmax denominator
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running probs @ V

        # Only the sequence's own blocks are visited, so block_tables padding is never read.
        # A tree row may hide every token of a block (m_safe below); its own token is always visible.
        for j in range(0, tl.cdiv(seq_len, BLOCK_S)):
            # int64: block * stride_kn overflows int32 for pools over 2^31 elements.
            block = tl.load(bt_ptr + seq * stride_btb + j).to(tl.int64)
            tok_mask = j * BLOCK_S + offs_s < seq_len
            kv_mask = tok_mask[:, None] & d_mask[None, :]
            if HAS_TAIL:  # a tree row: hide the cousins among its last 64 tokens (their K/V is written, finite)
                back = (seq_len - 1 - (j * BLOCK_S + offs_s)).to(tl.int64)
                bit = (tail_mask >> tl.minimum(tl.maximum(back, 0), 63)) & 1
                tok_mask = tok_mask & ((back >= 64) | (bit == 1))
            # other=0.0 also keeps NaN garbage of the last block's unused slots out of the math.
            k = tl.load(
                k_ptr + block * stride_kn + offs_s[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)
            v = tl.load(
                v_ptr + block * stride_vn + offs_s[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)

            # [G, S] scores via broadcast-multiply-reduce: tl.dot would need G padded to 16
            # rows, and decode is memory-bound anyway.
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            s = tl.where(tok_mask[None, :], s, float("-inf"))
            if WITH_MASS:  # eviction scores: the block's share of the softmax, finished by block_mass_from_lse
                store_block_log_mass(s, w_ptr + block * stride_wn + offs_s * stride_ws + kvh, tok_mask,
                                     block_lse_ptr + seq * stride_mb + heads * stride_mh + j, g_mask, WITH_WEIGHTS)

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A tree row can hide whole blocks, so the max may still be -inf: shift by 0 then (every p is 0).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)  # rescales what was accumulated under the old max
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
        if WITH_MASS:
            tl.store(lse_ptr + seq * stride_lb + heads, m_i + tl.log(l_i), mask=g_mask)


def triton_paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    token_weights: torch.Tensor | None = None,
    with_block_mass: bool = False,
    tail_masks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton paged decode attention (needs CUDA, or TRITON_INTERPRET=1 for CPU tensors).

    ``token_weights`` / ``with_block_mass`` / ``tail_masks`` as in ``reference_paged_decode_attention``.
    """
    if not _HAS_TRITON:
        raise RuntimeError("triton_paged_decode_attention: triton is not installed; use reference_paged_decode_attention")
    # A bad shape here is an out-of-bounds read on the GPU, not an exception: check first.
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens)
    check_tail_masks(tail_masks, query.shape[0], query.device)
    B, H, D = query.shape
    _, S, Hkv, _ = key_cache.shape
    G = H // Hkv
    assert S > 0 and S & (S - 1) == 0, f"block size S={S} must be a power of two (it is the kernel's tile height)"
    # The kernel assumes unit stride along D; copying the small query/tables is cheap,
    # copying the pool is not, so the caches must already be laid out that way.
    assert key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1, "key/value cache must be contiguous along D"
    query = query.contiguous()
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()

    out = torch.empty_like(query)
    block_lse, lse, weights = mass_buffers(out, block_tables.shape[1], key_cache, token_weights, with_block_mass)
    if B == 0:
        return (out, block_mass_from_lse(block_lse, lse, Hkv)) if with_block_mass else out
    _paged_decode_kernel[(B, Hkv)](
        query, key_cache, value_cache, block_tables, seq_lens,
        tail_masks.contiguous() if tail_masks is not None else seq_lens, out,
        weights, block_lse, lse,
        float(scale),
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        weights.stride(0), weights.stride(1),
        block_lse.stride(0), block_lse.stride(1), lse.stride(0),
        G=G, D=D,
        BLOCK_G=triton.next_power_of_2(G), BLOCK_S=S, BLOCK_D=triton.next_power_of_2(D),
        WITH_MASS=with_block_mass, WITH_WEIGHTS=with_block_mass and token_weights is not None,
        HAS_TAIL=tail_masks is not None,
    )
    return (out, block_mass_from_lse(block_lse, lse, Hkv)) if with_block_mass else out


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    token_weights: torch.Tensor | None = None,
    with_block_mass: bool = False,
    tail_masks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Paged decode attention: Triton kernel on CUDA when available, torch reference otherwise.

    With ``with_block_mass`` returns (out, block mass [B, Hkv, M]); see kernels/block_mass.py. ``tail_masks``
    [B] int64: tree rows (kernels/tree_mask.py).
    """
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens)
    check_tail_masks(tail_masks, query.shape[0], query.device)
    masks = {"tail_masks": tail_masks} if tail_masks is not None else {}  # old callers never see the kwarg
    if query.is_cuda and key_cache.dtype != query.dtype:
        query = query.to(key_cache.dtype)  # the Triton kernel reads one dtype; the output returns to fp32 below
        out = paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale,
                                     token_weights=token_weights, with_block_mass=with_block_mass, **masks)
        return (out[0].float(), out[1]) if with_block_mass else out.float()
    if query.is_cuda and _HAS_TRITON:
        return triton_paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale,
                                             token_weights=token_weights, with_block_mass=with_block_mass, **masks)
    if not with_block_mass and query.device.type == "cpu":
        out = native_paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale, **masks)
        if out is not None:
            return out
    # SDPA never exposes its probabilities, so a call that wants the block mass takes the reference.
    if not with_block_mass and query.shape[0] * block_tables.shape[1] * key_cache.shape[1] <= SDPA_MAX_GATHERED_TOKENS:
        return sdpa_paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale, **masks)
    return reference_paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale,
                                            token_weights=token_weights, with_block_mass=with_block_mass, **masks)
