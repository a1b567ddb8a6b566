# T=tokens, B=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, N=blocks,
# S=block size (tokens), M=max blocks per sequence, NB=code bytes per token per KV head, NG=scale groups per head,
# L=gathered tokens
"""Encoded KV in plain torch: encode, decode and paged decode attention over the codes.

The spec of the format in kernels/kv_quant_layout.py, the twin every Triton kernel is tested against, and the
production path on CPU (kernels/kv_quant.py dispatches here for non-CUDA tensors).
"""

from __future__ import annotations

import torch

from kernels.block_mass import block_mass_from_probs, gather_token_weights
from kernels.kv_quant_layout import CodeLayout
from kernels.qjl import QJLResidual, reference_qjl_encode, unpack_signs
from kernels.tree_mask import visible_tokens

# Decode chunks of about this many elements on the CPU path (same reasoning as paged_attention).
_CPU_CHUNK_ELEMS = 4 * 1024 * 1024


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
    invalid = ~visible_tokens(seq_lens, tail_masks, L)  # [B, L]
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
