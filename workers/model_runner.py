"""ModelRunner: ModelInput (plain records) -> flat tensors + AttentionMetadata -> model -> logits -> sampled tokens.

Decode rows come first in the flattened batch (one token each), then prefill chunks; logits are
computed only for rows that end a request's known tokens (the lm_head is the largest matmul), and for a
decode with drafts (speculative decoding) at its last known token and at every draft: the chunk path scores
them in one pass (as k + 1 decode rows), and workers/spec/verify.py keeps the accepted prefix. A draft tree's rows
(workers/spec/tree.py) sit at their depth's position and see only their ancestors (tail masks); the accepted
path's K/V then moves to the slots a chain would have filled.
The runner keeps no per-request state: everything it needs comes in the ModelInput.

# T=tokens in the step, N=rows to sample, V=vocab, Bd=decode sequences, M=max blocks per decode sequence
"""

from __future__ import annotations

import dataclasses

import torch

from workers.attention import AttentionMetadata, PrefillChunk
from workers.kv.codecs import KVCodec, LayerPages
from workers.model.llama import LlamaForCausalLM
from workers.model.native_decode import NativeDecodeLayers
from kernels.fused_ops import argmax_rows
from workers.sampler import sample
from workers.spec.tree import depths, tail_masks
from workers.spec.verify import verify_drafts
from workers.step import ModelInput, ModelOutput, ScheduledRequest


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, codec: KVCodec, kv_pages: list[LayerPages], block_size: int,
                 native_decode: bool = False):
        self.model = model
        self.codec = codec
        self.kv_pages = kv_pages
        self.block_size = block_size
        self.device = model.device
        # Pure-decode steps on a CPU fp32 block-quantized model: all layers in one native call (None elsewhere).
        self.native_decode = NativeDecodeLayers.build(model, codec, kv_pages) if native_decode else None

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> ModelOutput:
        requests = model_input.requests
        decode_rows: list[int] = []
        prefill_rows: list[int] = []
        for index in range(len(requests)):
            (decode_rows if model_input.is_decode_row(index) else prefill_rows).append(index)
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[int] = []

        # A decode with k drafts is k + 1 decode rows: row i computes token i at position start + i and attends
        # to the held K/V through its own. Every row's K/V is written before any row attends, so the rows see
        # each other causally: the same pass plain decoding runs, one row per token (and the same kernels).
        row_requests: list[int] = []  # request index of each decode row
        row_seq_lens: list[int] = []  # held K/V each decode row attends to, its own included
        row_tail_masks: list[int] | None = None  # only when some request drafted a tree
        first_rows = [0] * len(requests)
        verify_rows: dict[int, int] = {}  # request index -> its first row in verify_sample_rows (k + 1 rows)
        verify_sample_rows: list[int] = []  # sampled after the plain rows
        for index in decode_rows:
            request = requests[index]
            first_rows[index] = len(input_ids)
            if request.draft_token_ids:
                verify_rows[index] = len(verify_sample_rows)
            # A tree's draft sits at its depth's position but in the next free slot (workers/spec/tree.py).
            row_depths = [0, *depths(request.draft_parents)] if request.draft_parents else None
            if row_depths is not None and row_tail_masks is None:
                row_tail_masks = [-1] * len(row_requests)
            for offset, token_id in enumerate(request.token_ids + request.draft_token_ids):
                position = request.start_position + (row_depths[offset] if row_depths else offset)
                input_ids.append(token_id)
                positions.append(position)  # the true position: RoPE never sees evictions
                held = request.start_position + offset - request.num_evicted_tokens  # its slot among held blocks
                slots.append(request.block_table[held // block_size] * block_size + held % block_size)
                row_seq_lens.append(held + 1)
                row_requests.append(index)
                if request.draft_token_ids:
                    verify_sample_rows.append(len(input_ids) - 1)
            if row_tail_masks is not None:
                row_tail_masks.extend(tail_masks(request.draft_parents) if request.draft_parents
                                      else [-1] * request.num_query_tokens)
            if request.samples and not request.draft_token_ids:
                sample_rows.append(len(input_ids) - 1)
                sampled.append(index)

        chunks: list[PrefillChunk] = []
        for index in prefill_rows:
            request = requests[index]
            assert not request.num_evicted_tokens, "eviction waits for prefill to finish"
            start, end = request.start_position, request.end_position
            table = request.block_table
            first_rows[index] = len(input_ids)
            chunks.append(PrefillChunk(
                query_start=len(input_ids), query_len=request.num_new_tokens, context_len=start,
                block_ids=torch.tensor(table[:-(-end // block_size)], dtype=torch.long, device=self.device),
                observe_window=model_input.observe_windows.get(index, 0), observer=index,
            ))
            input_ids.extend(request.token_ids)
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            if request.samples:
                sample_rows.append(len(input_ids) - 1)
                sampled.append(index)

        decode_block_tables = decode_seq_lens = None
        if row_requests:
            tables = [requests[index].block_table for index in row_requests]
            max_blocks = max(len(table) for table in tables)
            decode_block_tables = torch.tensor([table + (0,) * (max_blocks - len(table)) for table in tables],
                                               dtype=torch.int32, device=self.device)
            # Held K/V after this step's write: the slots before the row's own, less the evicted ones, plus its own.
            decode_seq_lens = torch.tensor(row_seq_lens, dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decode_tokens=len(row_requests),
            decode_block_tables=decode_block_tables,
            decode_seq_lens=decode_seq_lens,
            prefills=tuple(chunks),
            probe=model_input.probe,
            decode_tail_masks=(torch.tensor(row_tail_masks, dtype=torch.int64, device=self.device)
                               if row_tail_masks is not None else None),
        )
        input_ids_tensor = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        positions_tensor = torch.tensor(positions, dtype=torch.long, device=self.device)
        capture = model_input.capture_layer_ids
        result = None
        if self.native_decode is not None and self.native_decode.applies(meta, len(input_ids)):
            result = self.native_decode.forward_captured(input_ids_tensor, positions_tensor, meta, capture)
        if result is None:
            result = self.model.forward_captured(input_ids_tensor, positions_tensor, self.kv_pages, self.codec,
                                                 meta, capture)
        hidden, aux_hidden = result
        rows = torch.tensor(sample_rows + verify_sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        output, moves = self._sample(requests, logits.cpu(), sampled, verify_rows, tuple(row_requests))
        if moves:
            self._move_accepted(moves, slots, aux_hidden)
        if aux_hidden is not None:
            output = dataclasses.replace(output, aux_hidden=aux_hidden, first_rows=tuple(first_rows))
        return output

    def _move_accepted(self, moves: list[tuple[int, int]], slots: list[int], aux_hidden: torch.Tensor | None) -> None:
        """(from row, to row) pairs of accepted tree drafts: their K/V (every codec array of every layer, a slot at
        a time) and captured states go where a chain would have put them. One gather then one scatter per array,
        so a row both read and written is read first."""
        source_rows = torch.tensor([source for source, _ in moves], dtype=torch.long)
        target_rows = torch.tensor([target for _, target in moves], dtype=torch.long)
        source_slots = torch.tensor([slots[source] for source, _ in moves], dtype=torch.long, device=self.device)
        target_slots = torch.tensor([slots[target] for _, target in moves], dtype=torch.long, device=self.device)
        for pages in self.kv_pages:
            for array in pages.tensors():
                flat = array.view(-1, *array.shape[2:])  # [N*S, ...]: one row per slot
                flat[target_slots] = flat[source_slots]
        if aux_hidden is not None:
            aux_hidden[target_rows.to(aux_hidden.device)] = aux_hidden[source_rows.to(aux_hidden.device)]

    def _sample(self, requests: tuple[ScheduledRequest, ...], logits: torch.Tensor, sampled: list[int],
                verify_rows: dict[int, int], decode_rows: tuple[int, ...]
                ) -> tuple[ModelOutput, list[tuple[int, int]]]:
        """logits [N, V]: a row per plain sampled request (in `sampled` order), then k + 1 per verified request
        (at verify_rows' offsets after the plain ones). Also -> the (from row, to row) moves of accepted tree
        drafts that did not sit where a chain would have."""
        moves: list[tuple[int, int]] = []
        first_decode_rows: dict[int, int] = {}
        for row, index in enumerate(decode_rows):
            first_decode_rows.setdefault(index, row)
        plain = [requests[index] for index in sampled]
        token_ids: list[tuple[int, ...]] = []
        logprobs: list[tuple] = []
        if plain:
            tokens = sample(logits[:len(plain)], [r.params for r in plain], [r.generator for r in plain],
                            [r.forced_token_id for r in plain])
            token_ids = [(token_id,) for token_id in tokens.token_ids]
            logprobs = [(entry,) for entry in tokens.logprobs]
        if verify_rows:
            greedy = argmax_rows(logits[len(plain):]).tolist()  # one batched argmax for every verified row
            for index, offset in verify_rows.items():
                request = requests[index]
                num_rows = len(request.draft_token_ids) + 1
                first_row = len(plain) + offset
                verified = verify_drafts(logits[first_row:first_row + num_rows], greedy[offset:offset + num_rows],
                                         request.draft_token_ids, request.params, request.generator,
                                         request.draft_probs, request.draft_parents)
                sampled.append(index)
                token_ids.append(verified.token_ids)
                logprobs.append(verified.logprobs)
                base = first_decode_rows[index] + 1  # the request's first draft row
                moves.extend((base + draft, base + depth) for depth, draft in enumerate(verified.accepted_drafts)
                             if draft != depth)
        return ModelOutput(sampled=tuple(sampled), token_ids=tuple(token_ids), logprobs=tuple(logprobs),
                           decode_rows=decode_rows), moves
