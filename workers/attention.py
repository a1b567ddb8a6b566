"""Attention over the paged KV cache, driven by an explicit AttentionMetadata (no hidden globals).

The flattened batch puts decode tokens (one per sequence) first, then prefill chunks.
Invariant: a token's K/V is written to its slot before any query attends to it.

# T=tokens in the step, H=query heads, Hkv=KV heads, D=head dim, Bd=decode sequences, M=max blocks per sequence
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from workers.kv.codecs import KVCodec, LayerPages


class AttentionProbe(Protocol):
    """What a step hook (eviction scoring: workers/kv/block_scores.ScoreCollector) sees of the attention: the
    values as written, every decode row's attention mass per block, an observation window's queries. Attention
    calls it at these points and knows nothing of what it does with them."""

    collect_decode: bool  # decode rows report their per-block attention mass this step

    def write(self, layer: int, slot_mapping: torch.Tensor, value: torch.Tensor) -> None: ...

    def decode_weights(self, layer: int) -> torch.Tensor | None: ...

    def add_decode(self, mass: torch.Tensor) -> None: ...

    def observe(self, observer: int, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scale: float) -> None: ...


@dataclass(frozen=True)
class PrefillChunk:
    query_start: int  # offset of the chunk's first token in the flattened batch
    query_len: int  # tokens computed this step
    context_len: int  # tokens already in the cache before this chunk (prefix hit or earlier chunks)
    block_ids: torch.Tensor  # [ceil((context_len + query_len) / S)] int64, the sequence's blocks in order
    observe_window: int = 0  # the chunk's last queries that the probe observes (eviction's observation window)
    observer: int = -1  # who observes them: the request's index in the step (the probe's key)


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: block_id * S + offset for every token in the step
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [Bd, M] int32
    decode_seq_lens: torch.Tensor | None  # [Bd] int32, including the token decoded this step
    prefills: tuple[PrefillChunk, ...]
    probe: AttentionProbe | None = None  # a step hook's view of the attention (eviction scores), or None
    # [Bd] int64 or None: rows of a draft tree hide their cousins among their last 64 tokens (kernels/tree_mask.py)
    decode_tail_masks: torch.Tensor | None = None


def paged_attention(
    query: torch.Tensor,  # [T, H, D], already rotated
    key: torch.Tensor,  # [T, Hkv, D], already rotated
    value: torch.Tensor,  # [T, Hkv, D]
    pages: LayerPages,
    codec: KVCodec,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    codec.write(pages, meta.slot_mapping, key, value)
    probe = meta.probe
    if probe is not None:
        probe.write(pages.layer, meta.slot_mapping, value)
    out = torch.empty_like(query)
    num_decode = meta.num_decode_tokens
    if num_decode:
        args = (query[:num_decode], pages, meta.decode_block_tables, meta.decode_seq_lens, scale)
        tails = {"tail_masks": meta.decode_tail_masks} if meta.decode_tail_masks is not None else {}
        if probe is not None and probe.collect_decode:
            out[:num_decode], mass = codec.decode_attention(
                *args, token_weights=probe.decode_weights(pages.layer), with_block_mass=True, **tails)
            probe.add_decode(mass)
        else:
            out[:num_decode] = codec.decode_attention(*args, **tails)
    for chunk in meta.prefills:
        end = chunk.query_start + chunk.query_len
        chunk_query = query[chunk.query_start:end]
        if chunk.context_len == 0 and codec.lossless:
            # A fresh prompt attends to its own K/V as computed (the usual prefill rule; saves a gather).
            # A lossy codec takes the gather path: every query sees the decoded cache, so outputs do not
            # depend on chunking, prefix hits or which tier ran the prefill.
            chunk_key, chunk_value = key[chunk.query_start:end], value[chunk.query_start:end]
        else:
            total_len = chunk.context_len + chunk.query_len
            chunk_key, chunk_value = codec.gather(pages, chunk.block_ids)
            chunk_key, chunk_value = chunk_key[:total_len], chunk_value[:total_len]
        out[chunk.query_start:end] = causal_attention(chunk_query, chunk_key, chunk_value, scale)
        if chunk.observe_window:
            probe.observe(chunk.observer, pages.layer, chunk_query[-chunk.observe_window:], chunk_key, chunk_value,
                          scale)
    return out


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """query [Tq, H, D] are the LAST Tq positions of key/value [Tk, Hkv, D] (bottom-right causal)."""
    num_queries, num_keys = query.shape[0], key.shape[0]
    q = query.transpose(0, 1).unsqueeze(0)  # [1, H, Tq, D]
    k = key.to(query.dtype).transpose(0, 1).unsqueeze(0)  # [1, Hkv, Tk, D]
    v = value.to(query.dtype).transpose(0, 1).unsqueeze(0)
    if num_queries == num_keys:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # SDPA's is_causal is top-left aligned; queries sit at the end of the keys, so build the mask.
        query_pos = torch.arange(num_keys - num_queries, num_keys, device=query.device).unsqueeze(1)
        key_pos = torch.arange(num_keys, device=query.device).unsqueeze(0)
        mask = key_pos <= query_pos  # [Tq, Tk]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)  # [Tq, H, D]
