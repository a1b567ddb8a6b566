"""RequestIntake: validate and tokenize a request into a Sequence. Touches no engine state, so it is safe from
any thread (an AsyncEngine validates on the caller's side, before the request reaches the step loop); every
rejection is an InvalidRequestError naming the field."""

from __future__ import annotations

import secrets
import time

import torch

from workers.model.tokenizer import Tokenizer
from workers.sampling_params import InvalidRequestError, SamplingParams
from workers.sequence import Sequence


class RequestIntake:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(tokenizer.stop_token_ids)

    def make_sequence(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                      params: SamplingParams | None = None, hold_kv: bool = False) -> Sequence:
        params = params or SamplingParams()
        if not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if prompt_token_ids is None:
            if not isinstance(prompt, str) or not prompt:
                raise InvalidRequestError("prompt", "must be a non-empty string (or give prompt_token_ids)")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        for field_name, token_ids in (("prompt_token_ids", prompt_token_ids),
                                      ("forced_token_ids", params.forced_token_ids)):
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(field_name,
                                          f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"prompt has {len(prompt_token_ids)} tokens; the context window is {self.max_model_len} "
                          f"(prompt + at least one generated token must fit)")
        generator = None
        if not params.is_greedy:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return Sequence(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params,
                        arrival_time=time.monotonic(), eos_token_ids=self.eos_token_ids, generator=generator,
                        hold_kv=hold_kv)
