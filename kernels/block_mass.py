# B=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, N=blocks in the pool, S=block size (tokens),
# M=block-table columns, L=gathered tokens (a multiple of S)
"""Per-block attention mass: the by-product of decode attention that eviction policies score blocks by.

``block_mass[b, h, j]`` = sum over the G query heads of KV head h and over the tokens t of sequence b's
j-th block of ``p[g, t] * w[t, h]``, where p is the softmax the attention computed and w an optional
per-token weight (the value norm, for value-aware eviction; 1 when absent). Columns past a sequence's
blocks are 0.

The references sum the probabilities they already materialise. The Triton kernels cannot (the softmax
is online, its normaliser is known only after the last block), so each block writes the log of its
weighted, max-shifted exponential sum; ``block_mass_from_lse`` divides by the final normaliser.
"""

from __future__ import annotations

import torch

from kernels.triton_support import HAS_TRITON as _HAS_TRITON, tl, triton


def gather_token_weights(token_weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """token_weights [N, S, Hkv], table [B, nb] int64 -> [B, nb*S, Hkv] float32."""
    B, nb = table.shape
    _, S, Hkv = token_weights.shape
    return token_weights[table].view(B, nb * S, Hkv).float()


def check_token_weights(token_weights: torch.Tensor, key_cache: torch.Tensor) -> torch.Tensor:
    """Weights for the pages of key_cache (any [N, S, Hkv, ...] page array) must be [N, S, Hkv] float32 on its
    device with unit stride along Hkv: the kernels index them that way, and a mismatch is an out-of-bounds read."""
    N, S, Hkv = key_cache.shape[:3]
    assert tuple(token_weights.shape) == (N, S, Hkv), (
        f"token_weights must be [N={N}, S={S}, Hkv={Hkv}], got {tuple(token_weights.shape)}")
    assert token_weights.dtype == torch.float32, f"token_weights must be float32, got {token_weights.dtype}"
    assert token_weights.device == key_cache.device, "token_weights must live beside the cache"
    assert token_weights.stride(2) == 1, "token_weights must be contiguous along Hkv"
    return token_weights


def mass_buffers(out: torch.Tensor, num_columns: int, key_cache: torch.Tensor, token_weights: torch.Tensor | None,
                 with_block_mass: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernels' (block_lse [B, H, M], lse [B, H], weights) arguments; out [B, H, D] is the attention output.

    Without ``with_block_mass`` they are placeholders (the kernel's constexpr flags keep it from touching them).
    """
    if not with_block_mass:
        return out, out, out
    B, H, _ = out.shape
    # Blocks a sequence does not visit keep -inf, i.e. mass 0.
    block_lse = torch.full((B, H, num_columns), float("-inf"), dtype=torch.float32, device=out.device)
    lse = torch.zeros(B, H, dtype=torch.float32, device=out.device)
    weights = check_token_weights(token_weights, key_cache) if token_weights is not None else out
    return block_lse, lse, weights


def block_mass_from_probs(probs: torch.Tensor, weights: torch.Tensor | None, block_size: int,
                          num_columns: int) -> torch.Tensor:
    """probs [B, Hkv, G, L] (0 past each sequence), weights [B, L, Hkv] or None -> block mass [B, Hkv, M]."""
    B, Hkv, _, L = probs.shape
    per_token = probs.sum(2)  # [B, Hkv, L]
    if weights is not None:
        per_token = per_token * weights.permute(0, 2, 1)
    per_block = per_token.view(B, Hkv, L // block_size, block_size).sum(-1)
    out = probs.new_zeros(B, Hkv, num_columns)
    out[:, :, : per_block.shape[-1]] = per_block
    return out


def block_mass_from_lse(block_lse: torch.Tensor, lse: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """block_lse [B, H, M] (-inf where unvisited), lse [B, H] -> block mass [B, Hkv, M]."""
    B, H, M = block_lse.shape
    mass = torch.exp(block_lse - lse[:, :, None])  # exp(-inf) = 0 for unvisited blocks
    return mass.view(B, num_kv_heads, H // num_kv_heads, M).sum(2)


if _HAS_TRITON:

    @triton.jit
    def store_block_log_mass(s, weight_ptrs, tok_mask, out_ptrs, g_mask, WITH_WEIGHTS: tl.constexpr):
        """s [G, S] one block's scores (-inf where masked) -> stores log(sum_t exp(s[g, t]) * w[t]) per row.

        w is loaded from weight_ptrs [S] (or 1 on valid tokens). Shifted by the block's own row max, so it never
        overflows; a row whose weighted sum is 0 stores -inf (mass 0).
        """
        if WITH_WEIGHTS:
            weights = tl.load(weight_ptrs, mask=tok_mask, other=0.0).to(tl.float32)
        else:
            weights = tok_mask.to(tl.float32)
        block_max = tl.max(s, axis=1)
        block_max = tl.where(block_max == float("-inf"), 0.0, block_max)  # a block a tree row hides entirely
        total = tl.sum(tl.exp(s - block_max[:, None]) * weights[None, :], axis=1)
        tl.store(out_ptrs, block_max + tl.log(total), mask=g_mask)
