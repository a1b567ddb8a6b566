"""Verify a request's drafts against the target's logits in one pass: greedy match, or rejection sampling.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023) keeps the target distribution exactly: draft d_i,
drawn from q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is
drawn from the residual max(p_i - q_i, 0) (renormalised); when all k drafts pass, a bonus token is drawn from
p_k. A drafter that proposes without sampling (n-gram lookup, greedy drafts) is a point mass q_i = 1[d_i]: the
acceptance is p_i(d_i) and the residual is p_i with d_i removed. p is the request's own filtered distribution
(temperature, top-k, top-p), so the output is what plain sampling with those params gives.

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


@dataclass(frozen=True)
class Verified:
    token_ids: tuple[int, ...]  # the accepted drafts, then the target's own token: 1 ... k + 1 tokens
    logprobs: tuple[TokenLogprobs | None, ...]

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def verify_drafts(logits: torch.Tensor, greedy_tokens: list[int], draft_token_ids: tuple[int, ...],
                  params: SamplingParams, generator: torch.Generator | None,
                  draft_probs: torch.Tensor | None = None) -> Verified:
    """logits [k + 1, V] float32: the target's at the last known token and at each draft; greedy_tokens: their
    argmaxes (computed batch-wide by the caller); draft_probs [k, V]: q, or None for point-mass drafts."""
    if params.is_greedy:
        tokens = _greedy_accept(greedy_tokens, draft_token_ids)
    else:
        tokens = _rejection_sample(logits, draft_token_ids, params, generator, draft_probs)
    num_rows = len(tokens)
    logprobs = score_tokens(logits[:num_rows], tokens, [params.logprobs] * num_rows)
    return Verified(tuple(tokens), tuple(logprobs))


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
