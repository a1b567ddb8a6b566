"""The drafter interface: propose up to k next tokens for each decoding request, cheaply.

A drafter sees plain records (a request's id and tokens), never the scheduler's state, so drafters are
interchangeable policies: n-gram lookup (no weights), a smaller draft model, EAGLE heads. One that keeps
per-request state (a draft model's KV, EAGLE's hidden states) is told when a request is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class DraftRequest:
    request_id: str
    token_ids: Sequence[int]  # prompt + outputs so far; the last one is the token the next step computes
    num_draft_tokens: int  # propose at most this many (>= 1)


@dataclass(frozen=True)
class PromptFeatures:
    """What a drafter needs of a prompt computed elsewhere (a prefill tier): the target's captured states for the
    prompt positions start_position... (EAGLE-3's features; a prefix-cache hit's positions were never computed)."""

    start_position: int
    features: torch.Tensor  # [P, C*Et]


@dataclass(frozen=True)
class Draft:
    token_ids: tuple[int, ...]  # 0 ... num_draft_tokens proposed tokens
    probs: torch.Tensor | None = None  # [k, V] the distribution each was drawn from; None: chosen, not drawn
    # A tree: each draft's parent (workers/spec/tree.py; -1 = the request's last token, drafts in topological
    # order); () for a chain. Tree drafts are point masses (probs None).
    parents: tuple[int, ...] = ()


class Drafter(Protocol):
    name: str

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        """One Draft per request, in order (an empty one where there is nothing worth proposing)."""
        ...

    def forget(self, request_id: str) -> None:
        """The request finished or was preempted: drop any state kept for it."""
        ...
