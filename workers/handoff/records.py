"""Typed records of the KV handoff (pickled by Ray between tiers). Each carries only what the other side needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.kv.block_scores import ScoreSpec
from workers.spec.drafter import PromptFeatures
from workers.kv.transfer import PeerEndpoint
from workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class KVLayout:
    """What both tiers must agree on before a single byte moves (checked at the handshake)."""

    codec: str
    block_size: int
    block_nbytes: int
    num_layers: int


@dataclass(frozen=True)
class PrefillRequest:
    """Decode replica -> prefill tier: prefill this prompt and push its encoded blocks to me."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    decode_endpoint: PeerEndpoint  # where the decode replica's channel store listens
    decode_replica: str  # the channel's peer id on the prefill side
    layout: KVLayout
    num_blocks: int  # blocks the decode side reserved
    tag: int  # the decode replica's id for this transfer (frames on a channel carry it)
    score_spec: ScoreSpec | None = None  # the decode tier evicts: compute its observation-window block votes


@dataclass(frozen=True)
class KVTicket:
    """Prefill tier -> decode replica, once the bytes are sent (or could not be)."""

    request_id: str
    first_token_id: int
    num_tokens: int
    num_blocks: int
    nbytes: int
    num_cached_tokens: int  # prefix-cache hit on the prefill tier
    prefill_replica: str
    seconds: float  # prefill + transfer, on the prefill replica
    block_scores: torch.Tensor | None = None  # [voters, blocks] votes, when the request carried a score_spec
    drafter_features: PromptFeatures | None = None  # an EAGLE-3 decode tier's features of the prompt
    # Set only when the channel could not carry the bytes: the encoded blocks ride in the ticket itself
    # (through Ray's object store) instead of over torch.distributed.
    payload: torch.Tensor | None = None


class CodecMismatchError(ValueError):
    """Prefill and decode tiers store KV differently: refused at the handshake, before any transfer."""


class TransferFailedError(RuntimeError):
    """The KV handoff failed and the policy is `fail` (with `recompute`, decode computes the prefill)."""
