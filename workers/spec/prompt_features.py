"""The prefill tier's share of drafting: capture what the decode tier's drafter reads of the prompt.

An EAGLE-3 head reads the target's states at every position it attends over; on a disaggregated deployment the
prompt's positions are computed on the prefill tier, so that tier captures them (the same layers the head reads)
and the KV ticket carries them (PromptFeatures). The decode tier's head then catches up over the prompt exactly
as a unified engine's would: its first draft is the same.

# P=prompt positions computed here, C*Et=captured width
"""

from __future__ import annotations

import torch

from workers.config import EngineConfig
from workers.spec.drafter import PromptFeatures
from workers.step import ModelOutput, SchedulerOutput


def prompt_feature_layers(config: EngineConfig, loaded) -> tuple[int, ...]:
    """The target layers a decode tier's drafter reads (only EAGLE-3 reads any); () when nothing is captured."""
    if config.speculative.method != "eagle3":
        return ()
    from workers.spec.eagle3 import head_layer_ids

    return head_layer_ids(loaded, config.speculative.eagle_head)


class PromptFeatureCollector:
    def __init__(self, layer_ids: tuple[int, ...]):
        self.layer_ids = layer_ids
        self._chunks: dict[str, tuple[int, list[torch.Tensor]]] = {}  # request id -> (start position, chunks)

    def observe(self, scheduler_output: SchedulerOutput, model_output: ModelOutput) -> None:
        if model_output.aux_hidden is None:
            return
        for index, request in enumerate(scheduler_output.scheduled):
            first = model_output.first_rows[index]
            rows = model_output.aux_hidden[first:first + request.num_new_tokens]
            start, chunks = self._chunks.get(request.request_id, (request.start_position, []))
            end = start + sum(chunk.shape[0] for chunk in chunks)
            if request.start_position != end:  # a recompute after preemption: start over from here
                start, chunks = request.start_position, []
            chunks.append(rows.detach().clone())
            self._chunks[request.request_id] = (start, chunks)

    def of(self, request_id: str) -> PromptFeatures | None:
        entry = self._chunks.get(request_id)
        if entry is None or not entry[1]:
            return None
        return PromptFeatures(entry[0], torch.cat(entry[1]))

    def forget(self, request_id: str) -> None:
        self._chunks.pop(request_id, None)
