# Hkv=KV heads, D=head dim, NB=code bytes per token per KV head, NG=scale groups per head
"""The encoded KV format: ``CodeLayout``, and the checks a kernel runs on one before it reads a cache with it.

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

kernels/kv_quant_ref.py is the torch reference of this spec, kernels/kv_quant_triton_*.py the Triton kernels,
kernels/kv_quant.py the dispatcher callers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_MODES = ("norm", "rms", "absmax")  # the Triton kernel receives the index


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


def check_layout(layout: CodeLayout, num_kv_heads: int, head_dim: int, code_bytes: int, side: str) -> None:
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
    assert layout.scale_mode in SCALE_MODES, f"unknown scale_mode {layout.scale_mode!r}"


def layout_tensors(layout: CodeLayout) -> tuple[torch.Tensor, ...]:
    """The layout's tables in the dtypes and (contiguous) layouts the kernels index them with; tiny copies at most."""
    return (layout.bits.to(torch.int32).contiguous(), layout.bitpos.to(torch.int32).contiguous(),
            layout.group.to(torch.int32).contiguous(),
            layout.codebook.float().contiguous(), layout.boundaries.float().contiguous())
