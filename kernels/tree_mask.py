# B=decode rows, L=key positions covered
"""Token-tree attention for decode rows, as one int64 per row: the tail mask.

A verify pass lays a draft tree's nodes into consecutive slots after the held K/V, one decode row each. A row
must see the held prefix and its own ancestors, not its cousins. Every row already attends to its first
``seq_lens[b]`` tokens (through its own slot); ``tail_masks[b]`` then hides some of the last 64 of them: bit i
stands for the token ``seq_lens[b] - 1 - i`` (bit 0: the row itself), set = visible. Tokens further back are
always visible, so a tree of up to 64 rows (the known token and 63 drafts) fits. A linear chain, and every
row that is not part of a tree, is all ones: -1. ``tail_masks=None`` means every row is -1.

Every attention path (the torch reference, SDPA, the Triton kernels, the C kernels) reads the mask by this
definition; ``visible_tokens`` is its torch statement.
"""

from __future__ import annotations

import torch

TAIL_BITS = 64
ALL_VISIBLE = -1  # int64 with every bit set


def visible_tokens(seq_lens: torch.Tensor, tail_masks: torch.Tensor | None, num_positions: int) -> torch.Tensor:
    """[B, L] bool: which of positions 0..L-1 row b attends to (seq_lens [B] int32, tail_masks [B] int64)."""
    positions = torch.arange(num_positions, device=seq_lens.device)
    back = seq_lens.long()[:, None] - 1 - positions[None, :]  # how far behind the row's own token
    visible = back >= 0
    if tail_masks is None:
        return visible
    # Arithmetic shift of a negative mask still leaves the right bit in place 0.
    bits = (tail_masks.long()[:, None] >> back.clamp(0, TAIL_BITS - 1)) & 1
    return visible & ((back >= TAIL_BITS) | (bits == 1))


def check_tail_masks(tail_masks: torch.Tensor | None, num_rows: int, device: torch.device) -> None:
    if tail_masks is None:
        return
    assert tail_masks.shape == (num_rows,), f"tail_masks must be [B={num_rows}], got {tuple(tail_masks.shape)}"
    assert tail_masks.dtype == torch.int64, f"tail_masks must be int64, got {tail_masks.dtype}"
    assert tail_masks.device == device, f"tail_masks on {tail_masks.device}, query on {device}"
