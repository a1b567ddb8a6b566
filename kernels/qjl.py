# T=tokens, B=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, N=blocks, S=block size,
# NBq=sign bytes per token per KV head (ceil(D / 8))
"""QJL residual: a 1-bit sketch of what the MSE codes missed, for unbiased key inner products (TurboQuant-prod).

For one token of one KV head, in the keys' transformed space (kernels/kv_quant_layout.py):

* ``r = y - y_hat`` — the MSE codes' residual (``y_hat`` decoded from the stored codes and fp16 scales);
* ``z = sign(P @ r)`` with ``P`` a fixed [D, D] standard Gaussian matrix per KV head; 0 counts as +1.
  Bit ``j`` of the token's NBq bytes is ``z_j > 0``: byte ``j >> 3``, shift ``j & 7``;
* ``gamma = |r|`` — one fp16 per token and head.

For a Gaussian row p, E[sign(p.r) p] = sqrt(2/pi) r / |r|, so ``r_tilde = sqrt(pi/2) / D * gamma * P^T z`` has
E[r_tilde] = r: q.(y_hat + r_tilde) is an unbiased estimate of q.y for every query (the MSE part alone is
biased: Lloyd-Max cells shrink toward their centroids). Attention never builds r_tilde: it adds
``gamma * (c P q) . z`` (c = sqrt(pi/2) / D) to each score, with the query's sketch ``c P q`` made once per step.
The price is variance: Var = gamma^2 / D * (pi/2 |q|^2 - (q.r/|r|)^2) per score, so the error is between
sqrt(pi/2 - 1) (q along r) and sqrt(pi/2) (q across r, the typical case) times gamma |q| / sqrt(D), and softmax's
exponential turns it into a bias of its own — why the TurboQuant authors (and our measurements) keep MSE-only
keys by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QJL_SCALE = math.sqrt(math.pi / 2)


def qjl_num_bytes(head_dim: int) -> int:
    return -(-head_dim // 8)


def qjl_projection(num_kv_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    """[Hkv, D, D] float32 i.i.d. N(0, 1), seeded: both tiers build the same matrix from the codec's name."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_kv_heads, head_dim, head_dim, generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class QJLResidual:
    """What decode attention needs for the residual term: the pages and the queries' sketch."""

    signs: torch.Tensor  # [N, S, Hkv, NBq] uint8
    norms: torch.Tensor  # [N, S, Hkv] float16, gamma = |r|
    query: torch.Tensor  # [B, H, D] float32, c * P q (q in the keys' transformed space, before the softmax scale)


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """positive [..., D] bool -> [..., NBq] uint8 (bit j at byte j >> 3, shift j & 7)."""
    head_dim = positive.shape[-1]
    padded = torch.zeros(*positive.shape[:-1], qjl_num_bytes(head_dim) * 8, dtype=torch.int32,
                         device=positive.device)
    padded[..., :head_dim] = positive.to(torch.int32)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=positive.device))
    return (padded.view(*positive.shape[:-1], -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """packed [..., NBq] uint8 -> z [..., D] float32 in {-1, +1}."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[..., None] >> shifts) & 1  # [..., NBq, 8]
    return bits.flatten(-2)[..., :head_dim].float() * 2 - 1


def reference_qjl_encode(residual: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """residual [T, Hkv, D] float32, projection [Hkv, D, D] -> (signs [T, Hkv, NBq] uint8, norms [T, Hkv] float16)."""
    projected = torch.einsum("hij,thj->thi", projection.float(), residual)
    return pack_signs(projected >= 0), residual.norm(dim=-1).to(torch.float16)


def qjl_sketch_query(query: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """query [B, H, D] in the keys' transformed space -> c * P q [B, H, D] float32 (each head by its KV head's P)."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = projection.shape[0]
    grouped = query.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    sketch = torch.einsum("hij,bhgj->bhgi", projection.float(), grouped) * (QJL_SCALE / head_dim)
    return sketch.reshape(num_seqs, num_heads, head_dim)


def qjl_decode(signs: torch.Tensor, norms: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """signs [..., Hkv, NBq], norms [..., Hkv] -> r_tilde [..., Hkv, D] float32 (the unbiased residual estimate)."""
    head_dim = projection.shape[-1]
    z = unpack_signs(signs, head_dim)
    back = torch.einsum("hji,...hj->...hi", projection.float(), z)  # P^T z
    return back * (norms.float()[..., None] * (QJL_SCALE / head_dim))
