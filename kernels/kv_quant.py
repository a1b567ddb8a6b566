# T=tokens, B=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, N=blocks,
# S=block size (tokens), M=max blocks per sequence, NB=code bytes per token per KV head, NG=scale groups per head,
# L=gathered tokens
"""Encoded KV: encode (transform + quantize + pack) and paged decode attention that reads codes directly.

The encoded format of one token of one KV head (the spec both the torch reference and the Triton
kernels implement):

* ``y = transform[h] @ (x - center[h])`` — a fixed per-head D x D map chosen by the codec (a random
  rotation, optionally with per-channel normalisation and a channel permutation).
* Channel ``j`` of ``y`` gets ``bits[h, j]`` in 1..8 bits. Its code sits at bit ``bitpos[h, j]`` of a
  little-endian bit stream of NB bytes: byte ``bitpos >> 3``, shift ``bitpos & 7``; a code never spans
  more than two bytes, so it is read as a 16-bit word ``b0 | b1 << 8``.
* Channels are split into NG scale groups (``group[h, j]``; a codec makes each group one bit width).
  The decoded value is ``codebook[bits, code] * scale[group]`` with one fp16 scale per token, head and
  group. For a group g of width w_g:
  ``scale_mode`` "norm": the codes quantize ``y_g * sqrt(w_g) / |y_g|`` and the stored scale is
  ``|y_g| / |codebook values of g|`` (norm-corrected: the decoded group keeps its true norm).
  ``scale_mode`` "rms": the same codes, the stored scale is ``|y_g| / sqrt(w_g)`` (no correction).
  ``scale_mode`` "absmax": the codes quantize ``y_g / scale`` with ``scale = max|y_g| / 127`` (int8).
  A group with no channels in some head keeps scale 0 (its slot exists so all heads share one shape).
* Optional (keys, ``qjl_projection`` given): a QJL residual of what the codes decode to, ceil(D / 8) sign
  bytes and one fp16 norm per token and head; attention adds its term to each score (kernels/qjl.py).

Attention never un-transforms keys: q.x = q.center + (transform^-T q).y, and the first term is the same
for every key of a query, so softmax ignores it. The caller passes the transformed query; the output is
in the transformed value space and the caller maps it back once per query (``center + transform^-1 o``).

* ``reference_*`` — plain torch; the spec and the production path on CPU.
* ``triton_*``    — Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).
* ``kv_encode`` / ``quant_paged_decode_attention`` — dispatchers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.block_mass import block_mass_from_lse, block_mass_from_probs, gather_token_weights, mass_buffers
from kernels.qjl import QJLResidual, qjl_num_bytes, reference_qjl_encode, unpack_signs
from kernels.triton_support import HAS_TRITON as _HAS_TRITON, tl, triton

if _HAS_TRITON:
    from kernels.block_mass import store_block_log_mass

_SCALE_MODES = ("norm", "rms", "absmax")  # the Triton kernel receives the index

# Decode chunks of about this many elements on the CPU path (same reasoning as paged_attention).
_CPU_CHUNK_ELEMS = 4 * 1024 * 1024


@dataclass(frozen=True)
class CodeLayout:
    """Where each transformed channel's code lives and how it decodes (one side, K or V, of one layer)."""

    bits: torch.Tensor  # [Hkv, D] int32, 1..8
    bitpos: torch.Tensor  # [Hkv, D] int32, start bit of the channel's code in the token's stream
    group: torch.Tensor  # [Hkv, D] int32, the channel's scale group in 0..NG-1
    num_groups: int  # NG
    codebook: torch.Tensor  # [9, 256] float32, row b = the 2**b levels for b-bit channels
    boundaries: torch.Tensor  # [9, 255] float32, row b = the 2**b - 1 decision thresholds (+inf padded)
    num_bytes: int  # NB
    scale_mode: str  # "norm" | "rms" | "absmax"


def _channel_codes(u: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    """u [T, Hkv, D] normalised values -> codes [T, Hkv, D] int32 (index of the nearest level)."""
    codes = torch.empty(u.shape, dtype=torch.int32, device=u.device)
    for bits in layout.bits.unique().tolist():
        mask = layout.bits == bits  # [Hkv, D]
        thresholds = layout.boundaries[bits, : 2**bits - 1].contiguous()
        values = u[:, mask]  # [T, C]
        codes[:, mask] = torch.searchsorted(thresholds, values.contiguous(), right=False).to(torch.int32)
    return codes


def _group_sum(values: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    """values [T, Hkv, D] -> per-group sums [T, Hkv, NG]."""
    T, Hkv, D = values.shape
    out = torch.zeros(T, Hkv, layout.num_groups, dtype=values.dtype, device=values.device)
    return out.scatter_add_(2, layout.group.long().expand(T, Hkv, D), values)


def _group_max(values: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    T, Hkv, D = values.shape
    out = torch.zeros(T, Hkv, layout.num_groups, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(2, layout.group.long().expand(T, Hkv, D), values, reduce="amax")


def reference_kv_encode(x: torch.Tensor, transform: torch.Tensor, center: torch.Tensor, layout: CodeLayout,
                        qjl_projection: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """x [T, Hkv, D] -> (codes [T, Hkv, NB] uint8, scales [T, Hkv, NG] float16).

    With ``qjl_projection`` [Hkv, D, D] also the QJL residual of what the stored codes decode to
    (kernels/qjl.py): -> (codes, scales, signs [T, Hkv, NBq] uint8, norms [T, Hkv] float16).
    """
    T, Hkv, D = x.shape
    y = torch.einsum("hij,thj->thi", transform, x.float() - center)  # [T, Hkv, D]
    group = layout.group.long().expand(T, Hkv, D)
    width = _group_sum(torch.ones_like(y), layout)  # [T, Hkv, NG] channels per group
    if layout.scale_mode in ("norm", "rms"):
        norm = _group_sum(y * y, layout).sqrt()  # [T, Hkv, NG]
        u = y * (width.sqrt() / norm.clamp_min(1e-30)).gather(2, group)
    else:
        absmax = _group_max(y.abs(), layout)
        u = y / (absmax / 127).clamp_min(1e-30).gather(2, group)
    codes = _channel_codes(u, layout)
    levels = layout.codebook[layout.bits.long(), codes.long()]  # [T, Hkv, D]
    if layout.scale_mode == "norm":
        scale = norm / _group_sum(levels * levels, layout).sqrt().clamp_min(1e-30)
    elif layout.scale_mode == "rms":
        scale = norm / width.clamp_min(1).sqrt()
    else:
        scale = absmax / 127
    # Pack: shift each code to its bit position; the low byte lands on byte bitpos>>3, the high on the next.
    shifted = codes << (layout.bitpos & 7)  # [T, Hkv, D] < 2**15
    byte = (layout.bitpos >> 3).long().expand(T, Hkv, D)
    packed = torch.zeros(T, Hkv, layout.num_bytes + 1, dtype=torch.int32, device=x.device)
    packed.scatter_add_(2, byte, shifted & 0xFF)
    packed.scatter_add_(2, byte + 1, shifted >> 8)  # bits never overlap, so add == or
    codes, scales = packed[..., : layout.num_bytes].to(torch.uint8), scale.to(torch.float16)
    if qjl_projection is None:
        return codes, scales
    # The residual of what the pages will decode to (reference_kv_decode): levels times the fp16-rounded scales.
    y_hat = levels * scales.float().gather(2, group)
    return (codes, scales, *reference_qjl_encode(y - y_hat, qjl_projection))


def reference_kv_decode(codes: torch.Tensor, scales: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    """codes [..., Hkv, NB] uint8, scales [..., Hkv, NG] -> transformed values y [..., Hkv, D] float32."""
    Hkv, D = layout.bits.shape
    lead = codes.shape[:-2]
    codes = codes.reshape(-1, Hkv, layout.num_bytes).long()
    byte = (layout.bitpos >> 3).long()  # [Hkv, D]
    index = byte.expand(codes.shape[0], Hkv, D)
    low = codes.gather(2, index)
    # The second byte of a code that ends in the last byte is never needed: read byte NB-1 again, masked.
    high = codes.gather(2, (index + 1).clamp_max(layout.num_bytes - 1)) * (index + 1 < layout.num_bytes)
    word = (low | (high << 8)) >> (layout.bitpos & 7).long()
    code = word & ((1 << layout.bits.long()) - 1)
    channel_scale = scales.reshape(-1, Hkv, layout.num_groups).float().gather(
        2, layout.group.long().expand(codes.shape[0], Hkv, D))
    values = layout.codebook[layout.bits.long(), code] * channel_scale
    return values.reshape(*lead, Hkv, D)


def reference_quant_paged_decode_attention(
    query: torch.Tensor,  # [B, H, D] transformed by the key transform (see module doc)
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """-> [B, H, D] float32 in the transformed value space. Decodes blocks chunk by chunk (never the whole cache).

    With ``with_block_mass`` also returns the per-block attention mass [B, Hkv, M] (kernels/block_mass.py).
    With ``qjl`` each score also gets the keys' QJL residual term (kernels/qjl.py).
    """
    B, H, D = query.shape
    N, S, Hkv, _ = key_codes.shape
    G = H // Hkv
    if B == 0:
        out = query.new_empty(B, H, D, dtype=torch.float32)
        return (out, query.new_zeros(B, Hkv, block_tables.shape[1], dtype=torch.float32)) if with_block_mass else out
    num_blocks = -(-int(seq_lens.max()) // S)
    L = num_blocks * S
    chunk_blocks = max(1, min(num_blocks, _CPU_CHUNK_ELEMS // (B * S * Hkv * D)))
    table = block_tables[:, :num_blocks].long()
    q = (query.float() * scale).view(B, Hkv, G, D)
    invalid = torch.arange(L, device=query.device)[None, :] >= seq_lens[:, None].long()  # [B, L]
    sketch = None if qjl is None else (qjl.query.float() * scale).view(B, Hkv, G, D)

    def decoded(codes, scales, layout, c0, c1) -> torch.Tensor:
        idx = table[:, c0:c1].reshape(-1)
        return reference_kv_decode(codes[idx], scales[idx], layout).view(B, (c1 - c0) * S, Hkv, D)

    scores = torch.empty(B, Hkv, G, L, dtype=torch.float32, device=query.device)
    for c0 in range(0, num_blocks, chunk_blocks):
        c1 = min(c0 + chunk_blocks, num_blocks)
        keys = decoded(key_codes, key_scales, key_layout, c0, c1)  # [B, l, Hkv, D]
        scores[..., c0 * S: c1 * S] = torch.einsum("bhgd,blhd->bhgl", q, keys)
        if qjl is not None:
            idx = table[:, c0:c1].reshape(-1)
            z = unpack_signs(qjl.signs[idx], D).view(B, (c1 - c0) * S, Hkv, D)
            gamma = qjl.norms[idx].float().view(B, (c1 - c0) * S, Hkv)
            scores[..., c0 * S: c1 * S] += torch.einsum("bhgd,blhd->bhgl", sketch, z) * \
                gamma.permute(0, 2, 1)[:, :, None, :]
    scores.masked_fill_(invalid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.zeros(B, Hkv, G, D, dtype=torch.float32, device=query.device)
    for c0 in range(0, num_blocks, chunk_blocks):
        c1 = min(c0 + chunk_blocks, num_blocks)
        values = decoded(value_codes, value_scales, value_layout, c0, c1)
        out += torch.einsum("bhgl,blhd->bhgd", probs[..., c0 * S: c1 * S], values)
    out = out.view(B, H, D)
    if not with_block_mass:
        return out
    weights = gather_token_weights(token_weights, table) if token_weights is not None else None
    return out, block_mass_from_probs(probs, weights, S, block_tables.shape[1])


def kv_encode(x, transform, center, layout, qjl_projection=None):
    if x.is_cuda and _HAS_TRITON:
        return triton_kv_encode(x, transform, center, layout, qjl_projection)
    return reference_kv_encode(x, transform, center, layout, qjl_projection)


def quant_paged_decode_attention(query, key_codes, key_scales, key_layout, value_codes, value_scales, value_layout,
                                 block_tables, seq_lens, scale, *, token_weights=None, with_block_mass=False,
                                 qjl=None):
    attend = triton_quant_paged_decode_attention if query.is_cuda and _HAS_TRITON \
        else reference_quant_paged_decode_attention
    return attend(query, key_codes, key_scales, key_layout, value_codes, value_scales, value_layout,
                  block_tables, seq_lens, scale, token_weights=token_weights, with_block_mass=with_block_mass,
                  qjl=qjl)


def _check_layout(layout: CodeLayout, num_kv_heads: int, head_dim: int, code_bytes: int, side: str) -> None:
    """Cheap metadata checks: on the GPU a layout that does not fit the cache is an out-of-bounds read."""
    assert tuple(layout.bits.shape) == (num_kv_heads, head_dim), (
        f"{side} layout bits shape {tuple(layout.bits.shape)} != (Hkv={num_kv_heads}, D={head_dim})"
    )
    assert tuple(layout.bitpos.shape) == (num_kv_heads, head_dim), (
        f"{side} layout bitpos shape {tuple(layout.bitpos.shape)} != (Hkv={num_kv_heads}, D={head_dim})"
    )
    assert tuple(layout.group.shape) == (num_kv_heads, head_dim), (
        f"{side} layout group shape {tuple(layout.group.shape)} != (Hkv={num_kv_heads}, D={head_dim})"
    )
    # Group ids themselves are not checked (that would sync the GPU every call): the layout's builder
    # keeps them in 0..NG-1, and an id >= NG would make the attention kernel read past a token's scales.
    assert layout.num_groups >= 1, f"{side} layout needs at least one scale group, got NG={layout.num_groups}"
    assert tuple(layout.codebook.shape) == (9, 256), (
        f"{side} codebook must be [9, 256], got {tuple(layout.codebook.shape)}"
    )
    assert tuple(layout.boundaries.shape) == (9, 255), (
        f"{side} boundaries must be [9, 255], got {tuple(layout.boundaries.shape)}"
    )
    assert layout.num_bytes == code_bytes, f"{side} layout has NB={layout.num_bytes}, codes have {code_bytes} bytes"
    assert layout.scale_mode in _SCALE_MODES, f"unknown scale_mode {layout.scale_mode!r}"


def _layout_tensors(layout: CodeLayout) -> tuple[torch.Tensor, ...]:
    """The layout's tables in the dtypes and (contiguous) layouts the kernels index them with; tiny copies at most."""
    return (layout.bits.to(torch.int32).contiguous(), layout.bitpos.to(torch.int32).contiguous(),
            layout.group.to(torch.int32).contiguous(),
            layout.codebook.float().contiguous(), layout.boundaries.float().contiguous())


if _HAS_TRITON:

    @triton.jit
    def _kv_encode_kernel(
        x_ptr, transform_ptr, center_ptr,
        bits_ptr, bitpos_ptr, group_ptr, codebook_ptr, boundaries_ptr,
        codes_ptr, scales_ptr,
        projection_ptr, signs_ptr, norms_ptr,
        stride_xt, stride_xh,
        stride_ct, stride_ch,
        stride_st, stride_sh,
        stride_zt, stride_zh,
        stride_nt, stride_nh,
        stride_codebook, stride_boundaries,
        D: tl.constexpr, NUM_BYTES: tl.constexpr, NUM_GROUPS: tl.constexpr, SCALE_MODE: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_NG: tl.constexpr,
        WITH_QJL: tl.constexpr, QJL_BYTES: tl.constexpr, BLOCK_NBQ: tl.constexpr,
    ):
        # One program per (token, KV head): the whole D-vector is needed at once (every group's norm or
        # absmax sets that group's scale, and every channel's code lands in a shared byte stream).
        token = tl.program_id(0).to(tl.int64)  # int64: token * stride overflows int32 for big batches
        kvh = tl.program_id(1)

        offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D = D rounded up to a power of two
        d_mask = offs_d < D

        x = tl.load(x_ptr + token * stride_xt + kvh * stride_xh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        center = tl.load(center_ptr + kvh * D + offs_d, mask=d_mask, other=0.0)
        centered = x - center
        # y = transform[h] @ centered as a broadcast-multiply-reduce: one matvec per program, and tl.dot
        # would need a 16-row operand. Padded rows/cols load 0, so padded channels of y are exactly 0.
        transform = tl.load(
            transform_ptr + kvh * D * D + offs_d[:, None] * D + offs_d[None, :],
            mask=d_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        y = tl.sum(transform * centered[None, :], axis=1)  # [BLOCK_D]

        # Scale groups as a one-hot [BLOCK_NG, BLOCK_D] membership tile (NG is small): a per-group reduction
        # is a masked row reduction, and handing each channel its group's value is a masked column sum
        # (exactly one term is non-zero, so it is exact). Padded channels (group -1) and padded groups
        # (>= NG) belong nowhere, so an empty group -- also a real one that some head lacks -- reduces to 0.
        group = tl.load(group_ptr + kvh * D + offs_d, mask=d_mask, other=-1)
        offs_g = tl.arange(0, BLOCK_NG)  # BLOCK_NG = NG rounded up to a power of two
        member = group[None, :] == offs_g[:, None]
        width = tl.sum(member.to(tl.float32), axis=1)  # [BLOCK_NG] channels per group

        # The *_rn forms are IEEE-rounded like torch (plain sqrt and / are approximate on the GPU), and the
        # operations follow the reference's order, so codes only differ from the reference where a summation
        # order (the matvec, a group's sum of squares) moves u across a threshold.
        if SCALE_MODE == 2:  # absmax
            absmax = tl.max(tl.where(member, tl.abs(y)[None, :], 0.0), axis=1)  # [BLOCK_NG]
            step = tl.div_rn(absmax, 127.0)
            channel_step = tl.sum(tl.where(member, step[:, None], 0.0), axis=0)  # [BLOCK_D]
            u = tl.div_rn(y, tl.maximum(channel_step, 1e-30))  # the clamp keeps a zero group at u = 0, not NaN
        else:  # norm, rms: the codes quantize y_g standardised to unit RMS
            norm = tl.sqrt_rn(tl.sum(tl.where(member, (y * y)[None, :], 0.0), axis=1))  # [BLOCK_NG]
            factor = tl.div_rn(tl.sqrt_rn(width), tl.maximum(norm, 1e-30))
            u = y * tl.sum(tl.where(member, factor[:, None], 0.0), axis=0)

        # code = number of the channel's thresholds strictly below u (searchsorted, right=False), found by
        # binary search over the ascending row: 8 gathered loads per channel instead of a [D, 256] compare
        # tile (which would not fit in registers on the GPU for D >= 128). Only the first 2**bits - 1
        # entries of the boundaries row are thresholds, so steps past them are never taken.
        bits = tl.load(bits_ptr + kvh * D + offs_d, mask=d_mask, other=1)
        num_thresholds = (1 << bits) - 1
        code = tl.zeros([BLOCK_D], tl.int32)  # stays 0 on padded channels
        for step_log2 in tl.static_range(7, -1, -1):
            candidate = code + (1 << step_log2)
            in_row = (candidate <= num_thresholds) & d_mask
            threshold = tl.load(boundaries_ptr + bits * stride_boundaries + candidate - 1, mask=in_row,
                                other=float("inf"))
            code = tl.where(threshold < u, candidate, code)
        level = tl.load(codebook_ptr + bits * stride_codebook + code, mask=d_mask, other=0.0)

        if SCALE_MODE == 2:
            group_scale = step
        elif SCALE_MODE == 1:  # rms: the standardising scale itself (the max only guards an empty group)
            group_scale = tl.div_rn(norm, tl.sqrt_rn(tl.maximum(width, 1.0)))
        else:
            # Norm-corrected: decoded group = levels * scale has y_g's norm, not the codebook's.
            level_norm = tl.sqrt_rn(tl.sum(tl.where(member, (level * level)[None, :], 0.0), axis=1))
            group_scale = tl.div_rn(norm, tl.maximum(level_norm, 1e-30))
        tl.store(scales_ptr + token * stride_st + kvh * stride_sh + offs_g, group_scale.to(tl.float16),
                 mask=offs_g < NUM_GROUPS)

        # Pack: the code shifted to its bit offset is < 2**15; its low byte lands on byte bitpos >> 3 and its
        # high byte on the next one. Codes never share bits, so summing the contributions per byte is an OR.
        bitpos = tl.load(bitpos_ptr + kvh * D + offs_d, mask=d_mask, other=0)
        shifted = code << (bitpos & 7)
        byte = tl.where(d_mask, bitpos >> 3, -2)  # -2: a padded channel matches no byte, not even as high part
        offs_byte = tl.arange(0, BLOCK_NB)  # BLOCK_NB = NB rounded up to a power of two
        low_part = tl.where(byte[None, :] == offs_byte[:, None], (shifted & 0xFF)[None, :], 0)
        high_part = tl.where(byte[None, :] + 1 == offs_byte[:, None], (shifted >> 8)[None, :], 0)
        packed = tl.sum(low_part + high_part, axis=1)  # [BLOCK_NB], each < 256
        tl.store(codes_ptr + token * stride_ct + kvh * stride_ch + offs_byte, packed.to(tl.uint8),
                 mask=offs_byte < NUM_BYTES)

        if WITH_QJL:  # kernels/qjl.py: sign bits of P @ (y - y_hat) and |y - y_hat|
            # y_hat as the pages decode it: each channel's level times its group's scale rounded to fp16.
            stored_scale = group_scale.to(tl.float16).to(tl.float32)
            channel_scale = tl.sum(tl.where(member, stored_scale[:, None], 0.0), axis=0)
            residual = tl.where(d_mask, y - level * channel_scale, 0.0)
            projection = tl.load(
                projection_ptr + kvh * D * D + offs_d[:, None] * D + offs_d[None, :],
                mask=d_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            projected = tl.sum(projection * residual[None, :], axis=1)  # [BLOCK_D]
            positive = (projected >= 0).to(tl.int32) << (offs_d & 7)
            offs_qb = tl.arange(0, BLOCK_NBQ)  # BLOCK_NBQ = ceil(D / 8) rounded up to a power of two
            in_byte = ((offs_d >> 3)[None, :] == offs_qb[:, None]) & d_mask[None, :]
            sign_bytes = tl.sum(tl.where(in_byte, positive[None, :], 0), axis=1)  # [BLOCK_NBQ], each < 256
            tl.store(signs_ptr + token * stride_zt + kvh * stride_zh + offs_qb, sign_bytes.to(tl.uint8),
                     mask=offs_qb < QJL_BYTES)
            gamma = tl.sqrt_rn(tl.sum(residual * residual, axis=0))
            tl.store(norms_ptr + token * stride_nt + kvh * stride_nh, gamma.to(tl.float16))

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
        bt_ptr, sl_ptr, out_ptr,
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
        WITH_MASS: tl.constexpr, WITH_WEIGHTS: tl.constexpr, WITH_QJL: tl.constexpr,
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
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of scores
        l_i = tl.zeros([BLOCK_G], tl.float32)  # running softmax denominator
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running probs @ V

        # Only the sequence's own blocks are visited, so block_tables padding is never read.
        # Each visited block holds >= 1 valid token, so m_i is finite after the first one.
        for j in range(0, tl.cdiv(seq_len, BLOCK_S)):
            # int64: block * stride overflows int32 for pools over 2^31 bytes.
            block = tl.load(bt_ptr + seq * stride_btb + j).to(tl.int64)
            tok_mask = j * BLOCK_S + offs_s < seq_len
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
            alpha = tl.exp(m_i - m_new)  # rescales what was accumulated under the old max
            p = tl.exp(s - m_new[:, None])
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


def triton_kv_encode(x: torch.Tensor, transform: torch.Tensor, center: torch.Tensor, layout: CodeLayout,
                     qjl_projection: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Triton twin of ``reference_kv_encode``: x [T, Hkv, D] -> (codes [T, Hkv, NB] uint8, scales [T, Hkv, NG] float16),
    plus (signs [T, Hkv, NBq] uint8, norms [T, Hkv] float16) with ``qjl_projection`` [Hkv, D, D].

    Needs CUDA, or TRITON_INTERPRET=1 for CPU tensors. transform/center are used in float32.
    """
    if not _HAS_TRITON:
        raise RuntimeError("triton_kv_encode: triton is not installed; use reference_kv_encode")
    assert x.dim() == 3, f"x must be [T, Hkv, D], got shape {tuple(x.shape)}"
    T, Hkv, D = x.shape
    assert tuple(transform.shape) == (Hkv, D, D), (
        f"transform must be [Hkv={Hkv}, D={D}, D], got {tuple(transform.shape)}"
    )
    assert tuple(center.shape) == (Hkv, D), f"center must be [Hkv={Hkv}, D={D}], got {tuple(center.shape)}"
    _check_layout(layout, Hkv, D, layout.num_bytes, "encode")
    if x.stride(-1) != 1:  # the kernel assumes unit stride along D; views of a projection usually have it
        x = x.contiguous()
    transform = transform.float().contiguous()
    center = center.float().contiguous()
    bits, bitpos, group, codebook, boundaries = _layout_tensors(layout)

    with_qjl = qjl_projection is not None
    if with_qjl:
        assert tuple(qjl_projection.shape) == (Hkv, D, D), (
            f"qjl_projection must be [Hkv={Hkv}, D={D}, D], got {tuple(qjl_projection.shape)}"
        )
        qjl_projection = qjl_projection.float().contiguous()

    codes = torch.empty(T, Hkv, layout.num_bytes, dtype=torch.uint8, device=x.device)
    scales = torch.empty(T, Hkv, layout.num_groups, dtype=torch.float16, device=x.device)
    signs = torch.empty(T, Hkv, qjl_num_bytes(D) if with_qjl else 0, dtype=torch.uint8, device=x.device)
    norms = torch.empty(T if with_qjl else 0, Hkv, dtype=torch.float16, device=x.device)
    encoded = (codes, scales, signs, norms) if with_qjl else (codes, scales)
    if T == 0:
        return encoded
    _kv_encode_kernel[(T, Hkv)](
        x, transform, center,
        bits, bitpos, group, codebook, boundaries,
        codes, scales,
        qjl_projection if with_qjl else transform, signs, norms,  # unused without QJL: any valid pointer
        x.stride(0), x.stride(1),
        codes.stride(0), codes.stride(1),
        scales.stride(0), scales.stride(1),
        signs.stride(0), signs.stride(1),
        norms.stride(0), norms.stride(1),
        codebook.stride(0), boundaries.stride(0),
        D=D, NUM_BYTES=layout.num_bytes, NUM_GROUPS=layout.num_groups,
        SCALE_MODE=_SCALE_MODES.index(layout.scale_mode),
        BLOCK_D=triton.next_power_of_2(D), BLOCK_NB=triton.next_power_of_2(layout.num_bytes),
        BLOCK_NG=triton.next_power_of_2(layout.num_groups),
        WITH_QJL=with_qjl, QJL_BYTES=qjl_num_bytes(D), BLOCK_NBQ=triton.next_power_of_2(qjl_num_bytes(D)),
    )
    return encoded


def triton_quant_paged_decode_attention(
    query: torch.Tensor,  # [B, H, D] transformed by the key transform (see module doc)
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
    _check_layout(key_layout, Hkv, D, key_codes.shape[3], "key")
    _check_layout(value_layout, Hkv, D, value_codes.shape[3], "value")
    assert S > 0 and S & (S - 1) == 0, f"block size S={S} must be a power of two (it is the kernel's tile height)"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, (
        f"block_tables must be [B={B}, M], got shape {tuple(block_tables.shape)}"
    )
    assert block_tables.dtype == torch.int32, f"block_tables must be int32, got {block_tables.dtype}"
    assert seq_lens.shape == (B,) and seq_lens.dtype == torch.int32, "seq_lens must be [B] int32"
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
    k_bits, k_bitpos, k_group, k_codebook, _ = _layout_tensors(key_layout)
    v_bits, v_bitpos, v_group, v_codebook, _ = _layout_tensors(value_layout)

    out = torch.empty(B, H, D, dtype=torch.float32, device=query.device)
    block_lse, lse, weights = mass_buffers(out, block_tables.shape[1], key_codes, token_weights, with_block_mass)
    if B == 0:
        return (out, block_mass_from_lse(block_lse, lse, Hkv)) if with_block_mass else out
    _quant_paged_decode_kernel[(B, Hkv)](
        query,
        key_codes, key_scales, k_bits, k_bitpos, k_group, k_codebook,
        value_codes, value_scales, v_bits, v_bitpos, v_group, v_codebook,
        block_tables, seq_lens, out,
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
        WITH_QJL=qjl is not None,
    )
    return (out, block_mass_from_lse(block_lse, lse, Hkv)) if with_block_mass else out
