"""KVCodec: how KV pages are stored, written, read back and attended over.

Every page write and read goes through a codec so compressed formats plug in without touching
the model or the scheduler. A codec owns its decode attention because a compressed codec must
fuse dequantization into the kernel (never materialise a full-precision copy of the cache).

# N=blocks in the pool, S=block size (tokens), Hkv=KV heads, D=head dim, T=tokens written, Bd=decode sequences
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kernels.paged_attention import paged_decode_attention


@dataclass
class LayerPages:
    """One layer's share of the paged pool in the codec's storage format; block b is row b of every tensor."""

    key: torch.Tensor  # [N, S, Hkv, *] codec storage
    value: torch.Tensor  # [N, S, Hkv, *] codec storage

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.key, self.value)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCodec(ABC):
    name: str

    @abstractmethod
    def allocate(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device) -> LayerPages: ...

    @abstractmethod
    def write(self, pages: LayerPages, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Encode key/value [T, Hkv, D] into the slots slot_mapping [T] (block_id * S + offset)."""

    @abstractmethod
    def gather(self, pages: LayerPages, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded K and V of the given blocks in order: ([n*S, Hkv, D], [n*S, Hkv, D])."""

    @abstractmethod
    def decode_attention(self, query: torch.Tensor, pages: LayerPages, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """query [Bd, H, D] -> [Bd, H, D] over each sequence's first seq_lens[b] cached tokens."""

    @abstractmethod
    def bytes_per_token(self, layer: int) -> int:
        """Exact storage bytes one token costs in `layer`, metadata included."""


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class IdentityCodec(KVCodec):
    """Stores K/V as-is in a float dtype (fp32 / fp16 / bf16)."""

    def __init__(self, dtype: torch.dtype, num_kv_heads: int, head_dim: int):
        self.dtype = dtype
        self.name = {v: k for k, v in _DTYPES.items()}[dtype]
        self._num_kv_heads = num_kv_heads
        self._head_dim = head_dim

    def allocate(self, num_blocks, block_size, num_kv_heads, head_dim, device) -> LayerPages:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return LayerPages(key=torch.zeros(shape, dtype=self.dtype, device=device),
                          value=torch.zeros(shape, dtype=self.dtype, device=device))

    def write(self, pages, slot_mapping, key, value) -> None:
        num_kv_heads, head_dim = pages.key.shape[2], pages.key.shape[3]
        pages.key.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(self.dtype))
        pages.value.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(self.dtype))

    def gather(self, pages, block_ids):
        num_kv_heads, head_dim = pages.key.shape[2], pages.key.shape[3]
        return (pages.key[block_ids].reshape(-1, num_kv_heads, head_dim),
                pages.value[block_ids].reshape(-1, num_kv_heads, head_dim))

    def decode_attention(self, query, pages, block_tables, seq_lens, scale):
        out = paged_decode_attention(query.to(self.dtype), pages.key, pages.value, block_tables, seq_lens, scale)
        return out.to(query.dtype)

    def bytes_per_token(self, layer: int) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self._num_kv_heads * self._head_dim * element_size


def make_codec(name: str, model_dtype: torch.dtype, num_kv_heads: int, head_dim: int) -> KVCodec:
    """`auto` stores KV in the model's dtype; float names pick an identity codec of that dtype."""
    if name == "auto":
        return IdentityCodec(model_dtype, num_kv_heads, head_dim)
    if name in _DTYPES:
        return IdentityCodec(_DTYPES[name], num_kv_heads, head_dim)
    raise ValueError(f"unknown kv codec {name!r}; available: auto, {', '.join(_DTYPES)}")
