"""Typed records that cross deployments (pickled by Ray). Each carries only what the other side needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.kv.block_scores import ScoreSpec
from workers.kv.transfer import PeerEndpoint
from workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class DecodeRequest:
    """Router -> DecodeServer: a validated, tokenized request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class KVLayout:
    """What both tiers must agree on before a single byte moves (checked at the handshake)."""

    codec: str
    block_size: int
    block_nbytes: int
    num_layers: int


@dataclass(frozen=True)
class PrefillRequest:
    """DecodeServer -> PrefillServer: prefill this prompt and push its encoded blocks to me."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    decode_endpoint: PeerEndpoint
    decode_replica: str
    layout: KVLayout
    num_blocks: int  # blocks the decode side reserved
    tag: int  # message tag on the pair's group (several transfers may share one group)
    score_spec: ScoreSpec | None = None  # the decode tier evicts: compute its observation-window block votes


@dataclass(frozen=True)
class KVTicket:
    """PrefillServer -> DecodeServer, after the bytes were sent."""

    request_id: str
    first_token_id: int
    num_tokens: int
    num_blocks: int
    nbytes: int
    num_cached_tokens: int  # prefix-cache hit on the prefill tier
    prefill_replica: str
    seconds: float  # prefill + transfer, on the prefill replica
    block_scores: torch.Tensor | None = None  # [voters, blocks] votes, when the request carried a score_spec
    # Set only when no process group could be formed: the encoded blocks ride in the ticket itself
    # (through Ray's object store) instead of over torch.distributed.
    payload: torch.Tensor | None = None


class CodecMismatchError(ValueError):
    """Prefill and decode tiers store KV differently: refused at the handshake, before any transfer."""


class TransferFailedError(RuntimeError):
    """The KV handoff failed and the policy is `fail` (with `recompute`, decode computes the prefill)."""
