# B=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, N=blocks, S=block size (tokens),
# M=max blocks per sequence, NB=code bytes per token per KV head, NG=scale groups per head
"""Triton paged decode attention that reads encoded KV pages directly (dequantization fused into the tile loads).

Twin of ``reference_quant_paged_decode_attention`` (kernels/kv_quant_ref.py); CUDA, or CPU under
TRITON_INTERPRET=1. The format, and why the query comes in transformed: kernels/kv_quant_layout.py.
"""

from __future__ import annotations

import torch

from kernels.block_mass import block_mass_from_lse, mass_buffers
from kernels.kv_quant_layout import CodeLayout, check_layout, layout_tensors
from kernels.qjl import QJLResidual, qjl_num_bytes
from kernels.triton_support import HAS_TRITON as _HAS_TRITON, tl, triton
from kernels.tree_mask import check_tail_masks

if _HAS_TRITON:
    from kernels.block_mass import store_block_log_mass

    @triton.jit
    def _load_channel_layout(bits_ptr, bitpos_ptr, group_ptr, kvh, offs_d, d_mask, D: tl.constexpr,
                             NUM_BYTES: tl.constexpr, stride_codebook, stride_scale_group):
        """Per-channel decode constants of one KV head, [BLOCK_D] each; loaded once per program."""
        bits = tl.load(bits_ptr + kvh * D + offs_d, mask=d_mask, other=1)
        bitpos = tl.load(bitpos_ptr + kvh * D + offs_d, mask=d_mask, other=0)
        # Offset of the channel's group scale inside a token's NG scales (0 on padded channels: in bounds).
        scale_col = tl.load(group_ptr + kvh * D + offs_d, mask=d_mask, other=0) * stride_scale_group
        byte = bitpos >> 3
        shift = bitpos & 7
        code_mask = (1 << bits) - 1
        codebook_row = bits * stride_codebook
        # A code ending in the last byte has no second byte to read (the stream is exactly NB bytes).
        has_high_byte = (byte + 1 < NUM_BYTES) & d_mask
        return byte, shift, code_mask, codebook_row, has_high_byte, scale_col

    @triton.jit
    def _decode_tile(codes_ptr, scales_ptr, code_rows, scale_rows, tok_mask, d_mask,
                     byte, shift, code_mask, codebook_ptr, codebook_row, has_high_byte, scale_col):
        """Decoded values [BLOCK_S, BLOCK_D] float32 of one block's tokens; masked tokens/channels are 0."""
        low = tl.load(codes_ptr + code_rows[:, None] + byte[None, :],
                      mask=tok_mask[:, None] & d_mask[None, :], other=0).to(tl.int32)
        high = tl.load(codes_ptr + code_rows[:, None] + byte[None, :] + 1,
                       mask=tok_mask[:, None] & has_high_byte[None, :], other=0).to(tl.int32)
        code = ((low | (high << 8)) >> shift[None, :]) & code_mask[None, :]
        # code < 2**bits <= 256, so the gather stays inside the codebook row even for garbage bytes.
        level = tl.load(codebook_ptr + codebook_row[None, :] + code)
        # Each channel gathers its group's scale: an [S, D] load over the block's [S, NG] scales, which are
        # a few contiguous bytes per token, so the repeated addresses hit the same cache lines.
        # other=0.0: an unused slot's scale may be inf/NaN garbage; a 0 scale keeps it out of the math.
        channel_scale = tl.load(scales_ptr + scale_rows[:, None] + scale_col[None, :],
                                mask=tok_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        return tl.where(d_mask[None, :], level * channel_scale, 0.0)

    @triton.jit
    def _quant_paged_decode_kernel(
        q_ptr,
        k_codes_ptr, k_scales_ptr, k_bits_ptr, k_bitpos_ptr, k_group_ptr, k_codebook_ptr,
        v_codes_ptr, v_scales_ptr, v_bits_ptr, v_bitpos_ptr, v_group_ptr, v_codebook_ptr,
        bt_ptr, sl_ptr, tm_ptr, out_ptr,
        w_ptr, block_lse_ptr, lse_ptr,
        z_ptr, gamma_ptr, sketch_ptr,
        scale,
        stride_qb, stride_qh,
        stride_kcn, stride_kcs, stride_kch,
        stride_ksn, stride_kss, stride_ksh, stride_ksg,
        stride_vcn, stride_vcs, stride_vch,
        stride_vsn, stride_vss, stride_vsh, stride_vsg,
        stride_k_codebook, stride_v_codebook,
        stride_btb,
        stride_ob, stride_oh,
        stride_wn, stride_ws,
        stride_mb, stride_mh, stride_lb,
        stride_zn, stride_zs, stride_zh,
        stride_gn, stride_gs, stride_gh,
        stride_pb, stride_ph,
        G: tl.constexpr, D: tl.constexpr, K_NUM_BYTES: tl.constexpr, V_NUM_BYTES: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
        WITH_MASS: tl.constexpr, WITH_WEIGHTS: tl.constexpr, WITH_QJL: tl.constexpr, HAS_TAIL: tl.constexpr,
    ):
        # Same schedule as _paged_decode_kernel: one program per (sequence, KV head) serving its G query
        # heads, so each block's codes are read and decoded once for the whole group.
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
        if WITH_QJL:  # the queries' sketch c P q (kernels/qjl.py), scaled like q
            sketch = tl.load(
                sketch_ptr + seq * stride_pb + heads[:, None] * stride_ph + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :],
                other=0.0,
            ) * scale

        # K and V have their own layouts (bits, byte count, number of scale groups).
        k_byte, k_shift, k_code_mask, k_codebook_row, k_has_high, k_scale_col = _load_channel_layout(
            k_bits_ptr, k_bitpos_ptr, k_group_ptr, kvh, offs_d, d_mask, D, K_NUM_BYTES, stride_k_codebook, stride_ksg)
        v_byte, v_shift, v_code_mask, v_codebook_row, v_has_high, v_scale_col = _load_channel_layout(
            v_bits_ptr, v_bitpos_ptr, v_group_ptr, kvh, offs_d, d_mask, D, V_NUM_BYTES, stride_v_codebook, stride_vsg)

        seq_len = tl.load(sl_ptr + seq)
        if HAS_TAIL:
            tail_mask = tl.load(tm_ptr + seq)  # int64: bit i = token seq_len - 1 - i is visible (tree_mask.py)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of scores
        l_i = tl.zeros([BLOCK_G], tl.float32)  # running softmax denominator
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running probs @ V

        # Only the sequence's own blocks are visited, so block_tables padding is never read.
        # A tree row may hide every token of a block (m_safe below); its own token is always visible.
        for j in range(0, tl.cdiv(seq_len, BLOCK_S)):
            # int64: block * stride overflows int32 for pools over 2^31 bytes.
            block = tl.load(bt_ptr + seq * stride_btb + j).to(tl.int64)
            tok_mask = j * BLOCK_S + offs_s < seq_len
            if HAS_TAIL:  # a tree row: hide the cousins among its last 64 tokens
                back = (seq_len - 1 - (j * BLOCK_S + offs_s)).to(tl.int64)
                bit = (tail_mask >> tl.minimum(tl.maximum(back, 0), 63)) & 1
                tok_mask = tok_mask & ((back >= 64) | (bit == 1))
            k_hat = _decode_tile(
                k_codes_ptr, k_scales_ptr,
                block * stride_kcn + offs_s * stride_kcs + kvh * stride_kch,
                block * stride_ksn + offs_s * stride_kss + kvh * stride_ksh,
                tok_mask, d_mask, k_byte, k_shift, k_code_mask, k_codebook_ptr, k_codebook_row, k_has_high,
                k_scale_col)
            v_hat = _decode_tile(
                v_codes_ptr, v_scales_ptr,
                block * stride_vcn + offs_s * stride_vcs + kvh * stride_vch,
                block * stride_vsn + offs_s * stride_vss + kvh * stride_vsh,
                tok_mask, d_mask, v_byte, v_shift, v_code_mask, v_codebook_ptr, v_codebook_row, v_has_high,
                v_scale_col)

            # [G, S] scores via broadcast-multiply-reduce (see _paged_decode_kernel for why not tl.dot).
            s = tl.sum(q[:, None, :] * k_hat[None, :, :], axis=2)
            if WITH_QJL:  # + gamma_t * sketch . z_t, z_t in {-1, +1} from the token's sign bits
                sign_byte = tl.load(
                    z_ptr + block * stride_zn + offs_s[:, None] * stride_zs + kvh * stride_zh + (offs_d >> 3)[None, :],
                    mask=tok_mask[:, None] & d_mask[None, :], other=0).to(tl.int32)
                z = tl.where(((sign_byte >> (offs_d & 7)[None, :]) & 1) == 1, 1.0, -1.0)  # [BLOCK_S, BLOCK_D]
                gamma = tl.load(gamma_ptr + block * stride_gn + offs_s * stride_gs + kvh * stride_gh,
                                mask=tok_mask, other=0.0).to(tl.float32)  # 0 on masked tokens: no NaN garbage
                s += tl.sum(sketch[:, None, :] * z[None, :, :], axis=2) * gamma[None, :]
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
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v_hat[None, :, :], axis=1)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out,
            mask=g_mask[:, None] & d_mask[None, :],
        )
        if WITH_MASS:
            tl.store(lse_ptr + seq * stride_lb + heads, m_i + tl.log(l_i), mask=g_mask)


def triton_quant_paged_decode_attention(
    query: torch.Tensor,  # [B, H, D] transformed by the key transform (see kernels/kv_quant_layout.py)
    key_codes: torch.Tensor,  # [N, S, Hkv, NBk] uint8
    key_scales: torch.Tensor,  # [N, S, Hkv, NGk] float16
    key_layout: CodeLayout,
    value_codes: torch.Tensor,  # [N, S, Hkv, NBv] uint8
    value_scales: torch.Tensor,  # [N, S, Hkv, NGv] float16
    value_layout: CodeLayout,
    block_tables: torch.Tensor,  # [B, M] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    *,
    token_weights: torch.Tensor | None = None,  # [N, S, Hkv] float32
    with_block_mass: bool = False,
    qjl: QJLResidual | None = None,
    tail_masks: torch.Tensor | None = None,  # [B] int64: tree rows (kernels/tree_mask.py)
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``reference_quant_paged_decode_attention`` -> [B, H, D] float32 (transformed value space).

    Needs CUDA, or TRITON_INTERPRET=1 for CPU tensors.
    """
    if not _HAS_TRITON:
        raise RuntimeError(
            "triton_quant_paged_decode_attention: triton is not installed; use reference_quant_paged_decode_attention")
    # A bad shape here is an out-of-bounds read on the GPU, not an exception: check first.
    assert query.dim() == 3, f"query must be [B, H, D], got shape {tuple(query.shape)}"
    B, H, D = query.shape
    assert key_codes.dim() == 4 and value_codes.dim() == 4, "key/value codes must be [N, S, Hkv, NB]"
    N, S, Hkv, _ = key_codes.shape
    assert tuple(value_codes.shape[:3]) == (N, S, Hkv), (
        f"value codes {tuple(value_codes.shape)} do not match key codes {tuple(key_codes.shape)} in [N, S, Hkv]"
    )
    assert key_codes.dtype == torch.uint8 and value_codes.dtype == torch.uint8, "codes must be uint8"
    assert tuple(key_scales.shape) == (N, S, Hkv, key_layout.num_groups), (
        f"key scales must be [N={N}, S={S}, Hkv={Hkv}, NG={key_layout.num_groups}], got {tuple(key_scales.shape)}"
    )
    assert tuple(value_scales.shape) == (N, S, Hkv, value_layout.num_groups), (
        f"value scales must be [N={N}, S={S}, Hkv={Hkv}, NG={value_layout.num_groups}], "
        f"got {tuple(value_scales.shape)}"
    )
    assert Hkv > 0 and H % Hkv == 0, f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}"
    check_layout(key_layout, Hkv, D, key_codes.shape[3], "key")
    check_layout(value_layout, Hkv, D, value_codes.shape[3], "value")
    assert S > 0 and S & (S - 1) == 0, f"block size S={S} must be a power of two (it is the kernel's tile height)"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, (
        f"block_tables must be [B={B}, M], got shape {tuple(block_tables.shape)}"
    )
    assert block_tables.dtype == torch.int32, f"block_tables must be int32, got {block_tables.dtype}"
    assert seq_lens.shape == (B,) and seq_lens.dtype == torch.int32, "seq_lens must be [B] int32"
    check_tail_masks(tail_masks, B, query.device)
    # Copying the small query/tables is cheap, copying the pool is not: codes must already be byte-contiguous.
    assert key_codes.stride(-1) == 1 and value_codes.stride(-1) == 1, "key/value codes must be contiguous along NB"
    G = H // Hkv
    if qjl is not None:
        assert tuple(qjl.signs.shape) == (N, S, Hkv, qjl_num_bytes(D)) and qjl.signs.dtype == torch.uint8, (
            f"qjl signs must be uint8 [N={N}, S={S}, Hkv={Hkv}, {qjl_num_bytes(D)}], got {tuple(qjl.signs.shape)}"
        )
        assert tuple(qjl.norms.shape) == (N, S, Hkv), f"qjl norms must be [N, S, Hkv], got {tuple(qjl.norms.shape)}"
        assert tuple(qjl.query.shape) == (B, H, D), f"qjl query must be [B, H, D], got {tuple(qjl.query.shape)}"
        assert qjl.signs.stride(-1) == 1, "qjl signs must be contiguous along their bytes"
        qjl = QJLResidual(qjl.signs, qjl.norms, qjl.query.float().contiguous())
    query = query.contiguous()
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    k_bits, k_bitpos, k_group, k_codebook, _ = layout_tensors(key_layout)
    v_bits, v_bitpos, v_group, v_codebook, _ = layout_tensors(value_layout)

    out = torch.empty(B, H, D, dtype=torch.float32, device=query.device)
    block_lse, lse, weights = mass_buffers(out, block_tables.shape[1], key_codes, token_weights, with_block_mass)
    if B == 0:
        return (out, block_mass_from_lse(block_lse, lse, Hkv)) if with_block_mass else out
    _quant_paged_decode_kernel[(B, Hkv)](
        query,
        key_codes, key_scales, k_bits, k_bitpos, k_group, k_codebook,
        value_codes, value_scales, v_bits, v_bitpos, v_group, v_codebook,
        block_tables, seq_lens, tail_masks.contiguous() if tail_masks is not None else seq_lens, out,
        weights, block_lse, lse,
        *((qjl.signs, qjl.norms, qjl.query) if qjl is not None else (key_codes, key_scales, query)),  # unused: any
        float(scale),
        query.stride(0), query.stride(1),
        key_codes.stride(0), key_codes.stride(1), key_codes.stride(2),
        key_scales.stride(0), key_scales.stride(1), key_scales.stride(2), key_scales.stride(3),
        value_codes.stride(0), value_codes.stride(1), value_codes.stride(2),
        value_scales.stride(0), value_scales.stride(1), value_scales.stride(2), value_scales.stride(3),
        k_codebook.stride(0), v_codebook.stride(0),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        weights.stride(0), weights.stride(1),
        block_lse.stride(0), block_lse.stride(1), lse.stride(0),
        *((qjl.signs.stride(0), qjl.signs.stride(1), qjl.signs.stride(2)) if qjl is not None else (0, 0, 0)),
        *((qjl.norms.stride(0), qjl.norms.stride(1), qjl.norms.stride(2)) if qjl is not None else (0, 0, 0)),
        *((qjl.query.stride(0), qjl.query.stride(1)) if qjl is not None else (0, 0)),
        G=G, D=D, K_NUM_BYTES=key_layout.num_bytes, V_NUM_BYTES=value_layout.num_bytes,
        BLOCK_G=triton.next_power_of_2(G), BLOCK_S=S, BLOCK_D=triton.next_power_of_2(D),
        WITH_MASS=with_block_mass, WITH_WEIGHTS=with_block_mass and token_weights is not None,
        WITH_QJL=qjl is not None, HAS_TAIL=tail_masks is not None,
    )
    return (out, block_mass_from_lse(block_lse, lse, Hkv)) if with_block_mass else out
