"""Typed records at the cluster's boundaries. Each carries only what the other side needs.

- Router -> DecodeServer (pickled by Ray): `DecodeRequest`.
- An ingress (gRPC today, HTTP later) <-> the transport-free Frontend: `GenerateInput`, `TokenizeInput` in;
  `Admission`, `StreamChunk`, `TokenizeResult`, `ModelCard` out. No protobuf and no HTTP types here, so every
  ingress maps its own wire format onto the same records.
The handoff's own records live with the protocol (workers/handoff/records.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.outputs import RequestOutput
from workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class DecodeRequest:
    """Router -> DecodeServer: a validated, tokenized request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingInput:
    """The sampling fields a client set. None = not set: the server default (SamplingParams' own) applies."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0
    skip_special_tokens: bool | None = None
    speculative: bool | None = None


@dataclass(frozen=True)
class GenerateInput:
    """A generate request as an ingress received it, not yet validated: exactly one of prompt, chat, token_ids
    should be set (None = absent). Field names are the wire API's, so the frontend's errors name them."""

    prompt: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    sampling: SamplingInput = field(default_factory=SamplingInput)
    model: str = ""  # "" = the served model
    tier: str = ""  # decode-tier hint; "" = chosen by prompt length
    request_id: str = ""  # "" = the frontend makes one up


@dataclass(frozen=True)
class TokenizeInput:
    prompt: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    model: str = ""


@dataclass(frozen=True)
class StreamChunk:
    """One piece of a stream as the client sees it (tokens a migration replayed are already removed)."""

    output: RequestOutput
    tier: str
    ttft_s: float
    total_s: float
    prompt_tokens: int  # the client's own prompt ...
    completion_tokens: int  # ... and every token it has received so far, across migrations


@dataclass(frozen=True)
class TokenizeResult:
    token_ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class ModelCard:
    id: str
    max_model_len: int
    vocab_size: int
    tiers: tuple[str, ...]


@dataclass(frozen=True)
class Admission:
    """An admitted request: it holds a slot of the frontend's queue until its stream ends."""

    request: DecodeRequest
    tier: str
