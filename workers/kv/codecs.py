"""KVCodec: how KV pages are stored, written, read back and attended over.

Every page write and read goes through a codec so compressed formats plug in without touching
the model or the scheduler. A codec owns its decode attention because a compressed codec must
fuse dequantization into the kernel (never materialise a full-precision copy of the cache).
Codecs may differ per layer (Block-GTQ budgets, layers left uncompressed), so pages know their layer.

# N=blocks in the pool, S=block size (tokens), Hkv=KV heads, D=head dim, T=tokens written, Bd=decode sequences
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kernels.cpu_native import native_kv_write
from kernels.paged_attention import paged_decode_attention


@dataclass
class LayerPages:
    """One layer's share of the paged pool in the codec's storage format; block b is row b of every array."""

    layer: int
    arrays: dict[str, torch.Tensor]  # name -> [N, S, ...] codec storage (e.g. "key"/"value", or codes + scales)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.arrays[name]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.arrays.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.arrays.values())).device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCodec(ABC):
    name: str
    # A lossless codec lets a fresh prompt attend to its K/V as computed; a lossy one makes every query attend
    # to the decoded cache, so a token's output does not depend on how its prompt was chunked or transferred.
    lossless: bool = True

    @abstractmethod
    def allocate(self, layer: int, num_blocks: int, block_size: int, device: torch.device) -> LayerPages: ...

    @abstractmethod
    def write(self, pages: LayerPages, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Encode key/value [T, Hkv, D] into the slots slot_mapping [T] (block_id * S + offset)."""

    @abstractmethod
    def gather(self, pages: LayerPages, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded K and V of the given blocks in order: ([n*S, Hkv, D], [n*S, Hkv, D])."""

    @abstractmethod
    def decode_attention(self, query: torch.Tensor, pages: LayerPages, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, *, token_weights: torch.Tensor | None = None,
                         with_block_mass: bool = False, tail_masks: torch.Tensor | None = None
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """query [Bd, H, D] -> [Bd, H, D] over each sequence's first seq_lens[b] cached tokens (less the ones a
        draft tree's row hides: tail_masks [Bd] int64, kernels/tree_mask.py).

        With ``with_block_mass`` returns (out, per-block attention mass [Bd, Hkv, M]), each token's probability
        weighted by ``token_weights`` [N, S, Hkv] when given (kernels/block_mass.py).
        """

    @abstractmethod
    def bytes_per_token(self, layer: int) -> int:
        """Exact storage bytes one token costs in `layer`, metadata included."""


FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class IdentityCodec(KVCodec):
    """Stores K/V as-is in a float dtype (fp32 / fp16 / bf16)."""

    def __init__(self, dtype: torch.dtype, num_kv_heads: int, head_dim: int, lossless: bool = True):
        self.dtype = dtype
        self.lossless = lossless  # False when pages round the model's activations (fp16 pages, fp32 model)
        self.name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def allocate(self, layer, num_blocks, block_size, device) -> LayerPages:
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return LayerPages(layer, {"key": torch.zeros(shape, dtype=self.dtype, device=device),
                                  "value": torch.zeros(shape, dtype=self.dtype, device=device)})

    def write(self, pages, slot_mapping, key, value) -> None:
        if native_kv_write(key, value, slot_mapping, pages["key"], pages["value"]):
            return  # one native call on the CPU, rows read in place; index_copy_ is its twin
        for name, tensor in (("key", key), ("value", value)):
            storage = pages[name]
            storage.view(-1, *storage.shape[2:]).index_copy_(0, slot_mapping, tensor.to(storage.dtype))

    def gather(self, pages, block_ids):
        return pages["key"][block_ids].flatten(0, 1), pages["value"][block_ids].flatten(0, 1)

    def decode_attention(self, query, pages, block_tables, seq_lens, scale, *, token_weights=None,
                         with_block_mass=False, tail_masks=None):
        # An fp32 query attends over fp16/bf16 pages as it is: on the CPU the math is fp32 on every path (the
        # native kernel widens fp16 rows in registers: half the bytes of an fp32 cache to read); on CUDA the
        # dispatcher hands Triton the query in the pages' dtype.
        model_dtype = query.dtype
        if model_dtype != torch.float32:
            query = query.to(self.dtype)
        result = paged_decode_attention(query, pages["key"], pages["value"], block_tables, seq_lens,
                                        scale, token_weights=token_weights, with_block_mass=with_block_mass,
                                        tail_masks=tail_masks)
        if with_block_mass:
            return result[0].to(model_dtype), result[1]
        return result.to(model_dtype)

    def bytes_per_token(self, layer: int) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_kv_heads * self.head_dim * element_size

