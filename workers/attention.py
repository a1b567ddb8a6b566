"""Attention over the paged KV cache, driven by an explicit AttentionMetadata (no hidden globals).

The flattened batch puts decode tokens (one per sequence) first, then prefill chunks.
Invariant: a token's K/V is written to its slot before any query attends to it.

# T=tokens in the step, H=query heads, Hkv=KV heads, D=head dim, Bd=decode sequences, M=max blocks per sequence
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.kv.block_scores import ScoreCollector, Weighting, observation_block_mass, value_weights
from workers.kv.codecs import KVCodec, LayerPages


@dataclass(frozen=True)
class PrefillChunk:
    query_start: int  # offset of the chunk's first token in the flattened batch
    query_len: int  # tokens computed this step
    context_len: int  # tokens already in the cache before this chunk (prefix hit or earlier chunks)
    block_ids: torch.Tensor  # [ceil((context_len + query_len) / S)] int64, the sequence's blocks in order
    observe_window: int = 0  # the chunk's last queries that vote for the blocks to keep (end of prefill)
    observe_weighting: Weighting = "none"


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: block_id * S + offset for every token in the step
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [Bd, M] int32
    decode_seq_lens: torch.Tensor | None  # [Bd] int32, including the token decoded this step
    prefills: tuple[PrefillChunk, ...]
    scores: ScoreCollector | None = None  # eviction by-products, when the engine keeps block scores


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
    scores = meta.scores
    if scores is not None and scores.store is not None:
        scores.store.write(pages.layer, meta.slot_mapping, value)
    out = torch.empty_like(query)
    num_decode = meta.num_decode_tokens
    if num_decode:
        args = (query[:num_decode], pages, meta.decode_block_tables, meta.decode_seq_lens, scale)
        if scores is not None and scores.collect_decode:
            out[:num_decode], mass = codec.decode_attention(
                *args, token_weights=scores.decode_weights(pages.layer), with_block_mass=True)
            scores.add_decode(mass)
        else:
            out[:num_decode] = codec.decode_attention(*args)
    for chunk_index, chunk in enumerate(meta.prefills):
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
            weights = value_weights(chunk_value, chunk.observe_weighting, scores.output_map(pages.layer))
            scores.add_observation(chunk_index, observation_block_mass(
                chunk_query[-chunk.observe_window:], chunk_key, weights, scale, scores.block_size))
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
