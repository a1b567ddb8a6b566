"""The prefill -> decode handoff between two engines in one process (the tiers' protocol without Ray).

The same engine steps the serving tiers take (decode.py, prefill.py), with the bytes moved by a local copy instead
of torch.distributed: prefill holds the prompt's encoded blocks (and the observation votes the decode
side's eviction policy asked for), decode reserves blocks, the bytes move, decode commits and runs.
Evals use it to prefill a prompt once and decode it under several eviction policies.
"""

from __future__ import annotations

from dataclasses import replace

from workers.engine import Engine, HeldKV
from workers.kv.block_scores import ScoreSpec
from workers.kv.transfer import pack_blocks, unpack_blocks
from workers.outputs import RequestOutput
from workers.sampling_params import SamplingParams


def prefill_and_hold(prefill: Engine, request_id: str, prompt: list[int], params: SamplingParams,
                     score_spec: ScoreSpec | None = None) -> HeldKV:
    """Run the prompt on `prefill` and keep its blocks; the caller releases them (prefill.release_kv)."""
    prefill.add_sequence(prefill.make_sequence(request_id, prompt_token_ids=prompt,
                                               params=replace(params, max_tokens=1), hold_kv=True), score_spec)
    while (held := prefill.held_kv(request_id)) is None:
        if not prefill.has_unfinished():
            raise RuntimeError(f"request {request_id!r} ended without holding its KV")
        prefill.step()
    return held


def import_held(prefill: Engine, held: HeldKV, decode: Engine, prompt: list[int],
                params: SamplingParams) -> RequestOutput:
    """Copy held blocks into `decode` and start the request there; returns the first token's output.

    The prefill side keeps its blocks (several decode engines may import the same prompt)."""
    seq = decode.make_sequence(held.request_id, prompt_token_ids=prompt, params=params)
    block_ids = decode.reserve_import(seq)
    if block_ids is None:
        raise MemoryError(f"decode engine has no room for {len(held.block_ids)} blocks")
    unpack_blocks(pack_blocks(prefill.kv_pages, list(held.block_ids)), decode.kv_pages, block_ids)
    return decode.commit_import(held.request_id, held.first_token_id, held.block_scores, held.drafter_features)
