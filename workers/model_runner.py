"""ModelRunner: ModelInput (plain records) -> flat tensors + AttentionMetadata -> model -> logits -> sampled tokens.

Decode rows come first in the flattened batch (one token each), then prefill chunks; logits are
computed only for rows that end a request's known tokens (the lm_head is the largest matmul).
The runner keeps no per-request state: everything it needs comes in the ModelInput.

# T=tokens in the step, N=rows to sample, V=vocab, Bd=decode sequences, M=max blocks per decode sequence
"""

from __future__ import annotations

import torch

from workers.attention import AttentionMetadata, PrefillChunk
from workers.kv.codecs import KVCodec, LayerPages
from workers.model.llama import LlamaForCausalLM
from workers.model.native_decode import NativeDecodeLayers
from workers.sampler import sample
from workers.step import ModelInput, ModelOutput


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

        for index in decode_rows:
            request = requests[index]
            position = request.start_position
            input_ids.append(request.token_ids[0])
            positions.append(position)  # the true position: RoPE never sees evictions
            held = position - request.num_evicted_tokens  # where its K/V goes among the held blocks
            slots.append(request.block_table[held // block_size] * block_size + held % block_size)
            if request.samples:
                sample_rows.append(len(input_ids) - 1)
                sampled.append(index)

        chunks: list[PrefillChunk] = []
        for index in prefill_rows:
            request = requests[index]
            assert not request.num_evicted_tokens, "eviction waits for prefill to finish"
            start, end = request.start_position, request.end_position
            table = request.block_table
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
        if decode_rows:
            tables = [requests[index].block_table for index in decode_rows]
            max_blocks = max(len(table) for table in tables)
            decode_block_tables = torch.tensor([table + (0,) * (max_blocks - len(table)) for table in tables],
                                               dtype=torch.int32, device=self.device)
            # Held K/V after this step's write: the positions before it, less the evicted ones, plus its own.
            decode_seq_lens = torch.tensor(
                [requests[index].start_position - requests[index].num_evicted_tokens + 1 for index in decode_rows],
                dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decode_tokens=len(decode_rows),
            decode_block_tables=decode_block_tables,
            decode_seq_lens=decode_seq_lens,
            prefills=tuple(chunks),
            probe=model_input.probe,
        )
        input_ids_tensor = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        positions_tensor = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = None
        if self.native_decode is not None and self.native_decode.applies(meta, len(input_ids)):
            hidden = self.native_decode.forward(input_ids_tensor, positions_tensor, meta)
        if hidden is None:
            hidden = self.model(input_ids_tensor, positions_tensor, self.kv_pages, self.codec, meta)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, dtype=torch.long, device=self.device)])
        rows = [requests[index] for index in sampled]
        tokens = sample(logits.cpu(), [r.params for r in rows], [r.generator for r in rows],
                        [r.forced_token_id for r in rows])
        return ModelOutput(sampled=tuple(sampled), token_ids=tuple(tokens.token_ids), logprobs=tuple(tokens.logprobs),
                           decode_rows=tuple(decode_rows))
