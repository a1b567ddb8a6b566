"""Typed records that cross deployments (pickled by Ray). Each carries only what the other side needs.
The handoff's own records live with the protocol (workers/handoff/records.py)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class DecodeRequest:
    """Router -> DecodeServer: a validated, tokenized request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
