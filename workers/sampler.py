"""Sampler: greedy, temperature, top-k, top-p, per-request seeds, top-N logprobs.

Each random row draws from its own torch.Generator (the request's), so a seeded request gives the
same tokens whatever else shares the batch. Sampling uses the exponential race
(argmax p_i / q_i with q_i ~ Exp(1)), which is exact for the categorical distribution and needs
one vector of noise per row; masked tokens have p_i = 0 and can never win.

# N=rows to sample (one per sequence), V=vocab
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from kernels.fused_ops import argmax_rows
from workers.sampling_params import SamplingParams
from workers.sequence import TokenLogprobs


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def sample(logits: torch.Tensor, params: Seq[SamplingParams], generators: Seq[torch.Generator | None],
           forced: Seq[int | None] | None = None) -> SamplerOutput:
    """logits [N, V] float32 (raw model output) -> one token per row; a row's forced token replaces its draw."""
    token_ids = argmax_rows(logits)  # [N]; greedy rows keep this
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        probs = filtered_probs(logits[rows], [params[i] for i in random_rows])  # [R, V]
        for j, i in enumerate(random_rows):
            noise = torch.empty_like(probs[j]).exponential_(generator=generators[i])
            token_ids[i] = (probs[j] / noise).argmax()
    token_list = token_ids.tolist()
    for i, token_id in enumerate(forced or ()):
        if token_id is not None:
            token_list[i] = token_id
    logprobs = score_tokens(logits, token_list, [p.logprobs for p in params])
    return SamplerOutput(token_ids=token_list, logprobs=logprobs)


def score_tokens(logits: torch.Tensor, token_ids: Seq[int], num_logprobs: Seq[int]) -> list[TokenLogprobs | None]:
    """logits [N, V] raw -> each row's chosen token's logprob and its top-n alternatives (None where n is 0)."""
    logprobs: list[TokenLogprobs | None] = [None] * len(token_ids)
    wanted = [i for i, n in enumerate(num_logprobs) if n > 0]
    if not wanted:
        return logprobs
    log_probs = torch.log_softmax(logits[wanted], dim=-1)  # [W, V], of the raw distribution
    top_values, top_ids = log_probs.topk(max(num_logprobs[i] for i in wanted), dim=-1)
    for j, i in enumerate(wanted):
        n = num_logprobs[i]
        logprobs[i] = TokenLogprobs(
            token_id=token_ids[i],
            logprob=float(log_probs[j, token_ids[i]]),
            top=tuple(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist())),
        )
    return logprobs


def filtered_probs(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """[R, V] probabilities after temperature, top-k and top-p; excluded tokens get exactly 0."""
    temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
    logits = logits / temperatures
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        vocab_size = logits.shape[1]
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab_size).unsqueeze(0)  # [1, V]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params]).unsqueeze(1)
        remove = ranks >= top_k  # [R, V] in sorted order
        sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype).unsqueeze(1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass BEFORE it already does.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= mass_before >= top_p
        remove[:, 0] = False  # the most likely token always survives
        logits = logits.scatter(1, sorted_ids, sorted_logits.masked_fill(remove, float("-inf")))
    return torch.softmax(logits, dim=-1)
