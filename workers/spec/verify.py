"""Verify a request's drafts against the target's logits in one pass: greedy match, or rejection sampling.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023) keeps the target distribution exactly: draft d_i,
drawn from q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is
drawn from the residual max(p_i - q_i, 0) (renormalised); when all k drafts pass, a bonus token is drawn from
p_k. A drafter that proposes without sampling (n-gram lookup, greedy drafts) is a point mass q_i = 1[d_i]: the
acceptance is p_i(d_i) and the residual is p_i with d_i removed. p is the request's own filtered distribution
(temperature, top-k, top-p), so the output is what plain sampling with those params gives.

A draft tree (workers/spec/tree.py) is walked from the root: greedy follows the child that matches the target's
token; sampling tries the children in order, each a point mass: child c is accepted with probability r(c), where r
is the target distribution with the children tried before it removed (renormalised), and if none is accepted the
token is drawn from what is left. Every token comes out with its p: sampling without replacement, stopped at the
first success (SpecInfer's multi-draft verification for deterministic drafts).

Every random draw comes from the request's generator: a seeded request repeats itself exactly (with the same
drafts), whatever else shares the batch.

# k=drafts of the request, V=vocab
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.sampler import filtered_probs, score_tokens
from workers.sampling_params import SamplingParams
from workers.sequence import TokenLogprobs
from workers.spec.tree import ROOT


@dataclass(frozen=True)
class Verified:
    token_ids: tuple[int, ...]  # the accepted drafts, then the target's own token: 1 ... k + 1 tokens
    logprobs: tuple[TokenLogprobs | None, ...]
    accepted_drafts: tuple[int, ...] = ()  # the accepted drafts' indices, root first (a chain: 0, 1, ...)

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def verify_drafts(logits: torch.Tensor, greedy_tokens: list[int], draft_token_ids: tuple[int, ...],
                  params: SamplingParams, generator: torch.Generator | None,
                  draft_probs: torch.Tensor | None = None, draft_parents: tuple[int, ...] = ()) -> Verified:
    """logits [k + 1, V] float32: the target's at the last known token and at each draft; greedy_tokens: their
    argmaxes (computed batch-wide by the caller); draft_probs [k, V]: q, or None for point-mass drafts;
    draft_parents: a tree's parents (workers/spec/tree.py), () for a chain."""
    if draft_parents:
        return _verify_tree(logits, greedy_tokens, draft_token_ids, params, generator, draft_probs, draft_parents)
    if params.is_greedy:
        tokens = _greedy_accept(greedy_tokens, draft_token_ids)
    else:
        tokens = _rejection_sample(logits, draft_token_ids, params, generator, draft_probs)
    num_rows = len(tokens)
    logprobs = score_tokens(logits[:num_rows], tokens, [params.logprobs] * num_rows)
    return Verified(tuple(tokens), tuple(logprobs), tuple(range(num_rows - 1)))


def _verify_tree(logits: torch.Tensor, greedy_tokens: list[int], draft_token_ids: tuple[int, ...],
                 params: SamplingParams, generator: torch.Generator | None, draft_probs: torch.Tensor | None,
                 draft_parents: tuple[int, ...]) -> Verified:
    if draft_probs is not None:
        raise ValueError("a draft tree's drafts are point masses (draft_probs must be None)")
    children: dict[int, list[int]] = {}
    for index, parent in enumerate(draft_parents):
        children.setdefault(parent, []).append(index)
    probs = None if params.is_greedy else filtered_probs(logits, [params] * logits.shape[0])  # [k + 1, V]
    node, rows, tokens, path = ROOT, [0], [], []
    while True:
        row = rows[-1]
        options = children.get(node, [])
        if probs is None:
            target = greedy_tokens[row]
            chosen = next((child for child in options if draft_token_ids[child] == target), None)
        else:
            target, chosen = _sample_children(probs[row], options, draft_token_ids, generator)
        tokens.append(target)
        if chosen is None:
            break
        path.append(chosen)
        node = chosen
        rows.append(chosen + 1)
    logprobs = score_tokens(logits[rows], tokens, [params.logprobs] * len(tokens))
    return Verified(tuple(tokens), tuple(logprobs), tuple(path))


def _sample_children(target: torch.Tensor, options: list[int], draft_token_ids: tuple[int, ...],
                     generator: torch.Generator | None) -> tuple[int, int | None]:
    """One token from target [V], trying the point-mass children in order: (token, the accepted child or None)."""
    residual = target
    for child in options:
        draft = draft_token_ids[child]
        remaining = float(residual.sum())
        if remaining <= 0.0:
            break
        if float(torch.rand((), generator=generator)) < float(residual[draft]) / remaining:
            return draft, child
        residual = residual.clone() if residual is target else residual
        residual[draft] = 0.0
    if float(residual.sum()) <= 0.0:  # only by rounding: keep p
        residual = target
    return _draw(residual, generator), None


def _greedy_accept(greedy_tokens: list[int], draft_token_ids: tuple[int, ...]) -> list[int]:
    tokens = []
    for draft, target in zip(draft_token_ids, greedy_tokens):
        tokens.append(target)
        if target != draft:
            return tokens  # the correction: what plain decoding would have produced here
    tokens.append(greedy_tokens[len(draft_token_ids)])  # all accepted: the bonus token
    return tokens


def _rejection_sample(logits: torch.Tensor, draft_token_ids: tuple[int, ...], params: SamplingParams,
                      generator: torch.Generator | None, draft_probs: torch.Tensor | None) -> list[int]:
    probs = filtered_probs(logits, [params] * logits.shape[0])  # [k + 1, V], the target distribution per row
    tokens = []
    for index, draft in enumerate(draft_token_ids):
        target = probs[index]
        if draft_probs is None:
            accept_probability = float(target[draft])
        else:
            proposal = draft_probs[index].to(target.dtype)
            accept_probability = min(1.0, float(target[draft]) / max(float(proposal[draft]), 1e-30))
        if float(torch.rand((), generator=generator)) < accept_probability:
            tokens.append(draft)
            continue
        if draft_probs is None:
            residual = target.clone()
            residual[draft] = 0.0
        else:
            residual = (target - proposal).clamp_min_(0.0)
        if float(residual.sum()) <= 0.0:  # only by rounding (a sure acceptance was rejected): keep p
            residual = target
        tokens.append(_draw(residual, generator))
        return tokens
    tokens.append(_draw(probs[len(draft_token_ids)], generator))
    return tokens


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from unnormalised weights [V] (the exponential race, as the plain sampler draws)."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    return int((weights / noise).argmax())
