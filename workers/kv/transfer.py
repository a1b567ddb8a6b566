"""The bytes of a KV transfer: encoded blocks packed into one flat buffer and scattered back into pages.

Blocks travel as the codec stores them (never dequantized): one flat byte buffer per transfer, in (layer,
tensor, block) order, so the receiver scatters straight into the pages it reserved. The channels that move
the buffers between replicas live in workers/dist/.

# L=layers, n=blocks moved, N=blocks in the pool
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from workers.kv.codecs import LayerPages


class KVTransferError(RuntimeError):
    """A transfer could not complete (peer gone, timeout, layout mismatch)."""


@dataclass(frozen=True)
class PeerEndpoint:
    """Where a receiving replica's rendezvous store listens."""

    host: str
    port: int


def block_nbytes(pages: list[LayerPages]) -> int:
    """Bytes one block occupies across all layers (what a transfer moves per block)."""
    return sum(t[0].numel() * t.element_size() for layer in pages for t in layer.tensors())


def layout_digest(pages: list[LayerPages]) -> int:
    """A 63-bit digest of what a block's bytes mean (every page tensor's dtype and per-block shape, in order):
    two replicas whose digests differ must not exchange blocks."""
    description = repr([(str(t.dtype), tuple(t.shape[1:])) for layer in pages for t in layer.tensors()])
    return int.from_bytes(hashlib.blake2b(description.encode(), digest_size=8).digest(), "little") >> 1


def pack_blocks(pages: list[LayerPages], block_ids: list[int]) -> torch.Tensor:
    """[n blocks across L layers] -> one flat uint8 buffer, exactly n * block_nbytes(pages) long."""
    index = torch.tensor(block_ids, dtype=torch.long, device=pages[0].device)
    parts = [t.index_select(0, index).contiguous().view(torch.uint8).reshape(-1)
             for layer in pages for t in layer.tensors()]
    return torch.cat(parts)


def unpack_blocks(buffer: torch.Tensor, pages: list[LayerPages], block_ids: list[int]) -> None:
    """Inverse of pack_blocks: scatter the buffer into the given (reserved) blocks of `pages`."""
    expected = len(block_ids) * block_nbytes(pages)
    if buffer.numel() != expected:
        raise KVTransferError(f"KV buffer has {buffer.numel()} bytes, layout expects {expected}")
    index = torch.tensor(block_ids, dtype=torch.long, device=pages[0].device)
    offset = 0
    for layer in pages:
        for t in layer.tensors():
            row_shape = t.shape[1:]
            nbytes = len(block_ids) * t[0].numel() * t.element_size()
            rows = buffer[offset:offset + nbytes].view(t.dtype).view(len(block_ids), *row_shape)
            t.index_copy_(0, index, rows)
            offset += nbytes
