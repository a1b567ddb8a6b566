"""ModelRunner: turns a SchedulerOutput into flat tensors + AttentionMetadata, runs the model, returns logits.

Decode rows come first in the flattened batch (one token each), then prefill chunks; logits are
computed only for rows that end a sequence's known tokens (the lm_head is the largest matmul).

# T=tokens in the step, N=rows to sample, V=vocab, Bd=decode sequences, M=max blocks per decode sequence
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.attention import AttentionMetadata, PrefillChunk
from workers.kv.block_scores import ScoreCollector, TokenWeightStore
from workers.kv.codecs import KVCodec, LayerPages
from workers.model.llama import LlamaForCausalLM
from workers.model.native_decode import NativeDecodeLayers
from workers.scheduler import ScheduledSequence
from workers.sequence import Sequence


@dataclass(frozen=True)
class ModelOutput:
    sampled_seqs: list[Sequence]  # sequences whose next token must be sampled, in logits row order
    logits: torch.Tensor  # [N, V] float32
    decode_seqs: list[Sequence]  # the step's decode rows, in order (rows of scores.decode_mass)
    observed_seqs: dict[int, Sequence]  # prefill chunk index -> the sequence whose observation window it ran
    scores: ScoreCollector | None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, codec: KVCodec, kv_pages: list[LayerPages], block_size: int,
                 weight_store: TokenWeightStore | None = None, output_maps: list[torch.Tensor] | None = None,
                 native_decode: bool = False):
        self.model = model
        self.codec = codec
        self.kv_pages = kv_pages
        self.block_size = block_size
        self.device = model.device
        # Eviction scores (workers/kv/block_scores.py): decode rows report their block mass when a sequence keeps
        # scores; value weights are written for every token when the engine's policy weighs votes by them.
        self.weight_store = weight_store
        self.output_maps = output_maps
        # Pure-decode steps on a CPU fp32 block-quantized model: all layers in one native call (None elsewhere).
        self.native_decode = NativeDecodeLayers.build(model, codec, kv_pages) if native_decode else None

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> ModelOutput:
        # A scored sequence still in prefill takes the prefill path even for a 1-token chunk, so that token's query
        # votes as part of the observation window (weighted by the spec), never as a decode vote.
        is_decode = [s.is_decode and (s.seq.score_spec is None or s.seq.prefill_done) for s in scheduled]
        decodes = [s for s, decode in zip(scheduled, is_decode) if decode]
        prefills = [s for s, decode in zip(scheduled, is_decode) if not decode]
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled_seqs: list[Sequence] = []

        for item in decodes:
            seq = item.seq
            position = seq.num_computed_tokens
            input_ids.append(seq.prompt_token_ids[position] if position < seq.num_prompt_tokens
                             else seq.output_token_ids[position - seq.num_prompt_tokens])
            positions.append(position)  # the true position: RoPE never sees evictions
            held = position - seq.num_evicted_tokens  # where its K/V goes among the held blocks
            slots.append(seq.block_table[held // block_size] * block_size + held % block_size)
            if position + 1 == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sampled_seqs.append(seq)

        chunks: list[PrefillChunk] = []
        observed_seqs: dict[int, Sequence] = {}
        for item in prefills:
            seq = item.seq
            assert not seq.num_evicted_tokens, "eviction waits for prefill to finish"
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            # The observation window is the last W known tokens' queries; chunked prefill may split it, and each
            # chunk votes with its share (causal, so the sum is what one unchunked window would give).
            num_observed = 0
            if seq.score_spec is not None and not seq.prefill_done:
                num_observed = max(0, end - max(start, seq.num_tokens - seq.score_spec.observe_window))
            if num_observed:
                observed_seqs[len(chunks)] = seq
            chunks.append(PrefillChunk(
                query_start=len(input_ids), query_len=item.num_new_tokens, context_len=start,
                block_ids=torch.tensor(seq.block_table[:-(-end // block_size)], dtype=torch.long, device=self.device),
                observe_window=num_observed,
                observe_weighting=seq.score_spec.weighting if num_observed else "none",
            ))
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            if end == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sampled_seqs.append(seq)

        decode_block_tables = decode_seq_lens = None
        if decodes:
            max_blocks = max(len(item.seq.block_table) for item in decodes)
            decode_block_tables = torch.tensor(
                [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in decodes],
                dtype=torch.int32, device=self.device)
            decode_seq_lens = torch.tensor([item.seq.num_cached_kv_tokens + 1 for item in decodes],
                                           dtype=torch.int32, device=self.device)
        scores = None
        collect_decode = any(item.seq.score_spec is not None for item in decodes)
        if self.weight_store is not None or observed_seqs or collect_decode:
            scores = ScoreCollector(block_size=block_size, collect_decode=collect_decode,
                                    store=self.weight_store, maps=self.output_maps)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decode_tokens=len(decodes),
            decode_block_tables=decode_block_tables,
            decode_seq_lens=decode_seq_lens,
            prefills=tuple(chunks),
            scores=scores,
        )
        input_ids_tensor = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        positions_tensor = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = None
        if self.native_decode is not None and self.native_decode.applies(meta, len(input_ids)):
            hidden = self.native_decode.forward(input_ids_tensor, positions_tensor, meta)
        if hidden is None:
            hidden = self.model(input_ids_tensor, positions_tensor, self.kv_pages, self.codec, meta)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, dtype=torch.long, device=self.device)])
        return ModelOutput(sampled_seqs=sampled_seqs, logits=logits.cpu(), decode_seqs=[item.seq for item in decodes],
                           observed_seqs=observed_seqs, scores=scores)
