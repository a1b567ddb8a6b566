"""Prompt-lookup drafting (Saxena 2023; vLLM's `ngram`): find the context's last n tokens earlier in the context
and propose what followed them there. No weights; strong where outputs copy their input (code edits,
summaries quoting the text, extraction), and free to try: a miss proposes nothing.

The most recent earlier match wins (it is the likeliest continuation in repetitive output); the longest
suffix that matches at all is tried first. With ``tree_width`` W > 1 the W best distinct continuations (longer
suffixes first, then the more recent) are merged into a token tree (workers/spec/tree.py): code repeats a
name's several earlier continuations, and one pass verifies them all.

# L=context tokens, n=suffix length
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from workers.spec.drafter import Draft, DraftRequest
from workers.spec.tree import TreeBuilder

# A candidate's weight in the tree: its suffix length, shrunk by this for each more recent candidate of that length.
RECENCY_DECAY = 0.8


class NgramDrafter:
    name = "ngram"

    def __init__(self, ngram_min: int, ngram_max: int, tree_width: int = 1):
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self.tree_width = tree_width

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        if self.tree_width == 1:
            return [Draft(lookup(request.token_ids, self.ngram_min, self.ngram_max, request.num_draft_tokens))
                    for request in requests]
        drafts = []
        for request in requests:
            candidates = lookup_candidates(request.token_ids, self.ngram_min, self.ngram_max,
                                           request.num_draft_tokens, self.tree_width)
            token_ids, parents = TreeBuilder(request.num_draft_tokens).build(candidates)
            drafts.append(Draft(token_ids, parents=parents))
        return drafts

    def forget(self, request_id: str) -> None:
        pass  # stateless


def lookup(token_ids: Sequence[int], ngram_min: int, ngram_max: int, num_draft_tokens: int) -> tuple[int, ...]:
    """The tokens that followed the most recent earlier occurrence of the longest matching suffix (n in
    [ngram_min, ngram_max]), at most num_draft_tokens of them; () if no suffix recurs."""
    num_tokens = len(token_ids)
    if num_tokens < ngram_min + 1:
        return ()
    tokens = np.asarray(token_ids, dtype=np.int64)  # [L]
    for n in range(min(ngram_max, num_tokens - 1), ngram_min - 1, -1):
        suffix = tokens[-n:]
        # Windows starting at 0 .. L-n-1: every earlier occurrence (the suffix itself starts at L-n).
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # [L-n, n]
        starts = np.flatnonzero((windows == suffix).all(axis=1))
        if starts.size:
            follow = int(starts[-1]) + n
            return tuple(tokens[follow:follow + num_draft_tokens].tolist())
    return ()


def lookup_candidates(token_ids: Sequence[int], ngram_min: int, ngram_max: int, num_draft_tokens: int,
                      max_candidates: int) -> list[tuple[tuple[int, ...], float]]:
    """Up to max_candidates distinct continuations (each at most num_draft_tokens long) with their weights: every
    suffix length from the longest, each length's matches from the most recent."""
    num_tokens = len(token_ids)
    if num_tokens < ngram_min + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)  # [L]
    candidates: dict[tuple[int, ...], float] = {}
    for n in range(min(ngram_max, num_tokens - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # [L-n, n]
        starts = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        weight = float(n)
        for start in starts[::-1]:
            follow = int(start) + n
            continuation = tuple(tokens[follow:follow + num_draft_tokens].tolist())
            if continuation and continuation not in candidates:
                candidates[continuation] = weight
                weight *= RECENCY_DECAY
                if len(candidates) == max_candidates:
                    return list(candidates.items())
    return list(candidates.items())
