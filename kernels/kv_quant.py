"""Encoded KV: encode (transform + quantize + pack) and paged decode attention that reads codes directly.

Callers import from here; each part lives in its own file:

* kernels/kv_quant_layout.py           — the format (``CodeLayout``), and why attention takes a transformed query.
* kernels/kv_quant_ref.py              — ``reference_*``: plain torch; the spec and the production path on CPU.
* kernels/kv_quant_triton_encode.py    — ``triton_kv_encode`` (CUDA, or CPU under TRITON_INTERPRET=1).
* kernels/kv_quant_triton_attention.py — ``triton_quant_paged_decode_attention`` (likewise).
* ``kv_encode`` / ``quant_paged_decode_attention`` (here) — dispatchers: Triton for CUDA tensors when it is
  installed, the reference otherwise.
"""

from __future__ import annotations

from kernels.kv_quant_layout import CodeLayout
from kernels.kv_quant_ref import reference_kv_decode, reference_kv_encode, reference_quant_paged_decode_attention
from kernels.kv_quant_triton_attention import triton_quant_paged_decode_attention
from kernels.kv_quant_triton_encode import triton_kv_encode
from kernels.triton_support import HAS_TRITON as _HAS_TRITON

# `from kernels.kv_quant import ...` is the public path (workers/kv, tests); the files behind it are internal.
__all__ = [
    "CodeLayout", "kv_encode", "quant_paged_decode_attention",
    "reference_kv_decode", "reference_kv_encode", "reference_quant_paged_decode_attention",
    "triton_kv_encode", "triton_quant_paged_decode_attention",
]


def kv_encode(x, transform, center, layout, qjl_projection=None):
    if x.is_cuda and _HAS_TRITON:
        return triton_kv_encode(x, transform, center, layout, qjl_projection)
    return reference_kv_encode(x, transform, center, layout, qjl_projection)


def quant_paged_decode_attention(query, key_codes, key_scales, key_layout, value_codes, value_scales, value_layout,
                                 block_tables, seq_lens, scale, *, token_weights=None, with_block_mass=False,
                                 qjl=None, tail_masks=None):
    attend = triton_quant_paged_decode_attention if query.is_cuda and _HAS_TRITON \
        else reference_quant_paged_decode_attention
    return attend(query, key_codes, key_scales, key_layout, value_codes, value_scales, value_layout,
                  block_tables, seq_lens, scale, token_weights=token_weights, with_block_mass=with_block_mass,
                  qjl=qjl, tail_masks=tail_masks)
