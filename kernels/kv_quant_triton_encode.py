# T=tokens, Hkv=KV heads, D=head dim, NB=code bytes per token per KV head, NG=scale groups per head,
# NBq=QJL sign bytes per token per KV head (ceil(D / 8))
"""Triton encode of KV into the format of kernels/kv_quant_layout.py: transform + quantize + pack in one pass.

Twin of ``reference_kv_encode`` (kernels/kv_quant_ref.py); CUDA, or CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from kernels.kv_quant_layout import SCALE_MODES, CodeLayout, check_layout, layout_tensors
from kernels.qjl import qjl_num_bytes
from kernels.triton_support import HAS_TRITON as _HAS_TRITON, tl, triton

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
    check_layout(layout, Hkv, D, layout.num_bytes, "encode")
    if x.stride(-1) != 1:  # the kernel assumes unit stride along D; views of a projection usually have it
        x = x.contiguous()
    transform = transform.float().contiguous()
    center = center.float().contiguous()
    bits, bitpos, group, codebook, boundaries = layout_tensors(layout)

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
        SCALE_MODE=SCALE_MODES.index(layout.scale_mode),
        BLOCK_D=triton.next_power_of_2(D), BLOCK_NB=triton.next_power_of_2(layout.num_bytes),
        BLOCK_NG=triton.next_power_of_2(layout.num_groups),
        WITH_QJL=with_qjl, QJL_BYTES=qjl_num_bytes(D), BLOCK_NBQ=triton.next_power_of_2(qjl_num_bytes(D)),
    )
    return encoded
