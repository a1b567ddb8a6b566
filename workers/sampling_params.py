"""SamplingParams: what a request asks of the sampler, validated once with messages that name the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """Bad request input. `field` names the offending request field (mapped to INVALID_ARGUMENT on the wire)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message

    def __reduce__(self):  # crosses process boundaries (Ray) intact, field included
        return (type(self), (self.field, self.message))


MAX_LOGPROBS = 20
# The one default for max_tokens: the engine's, the gRPC API's (a request that leaves it unset) and the CLI's.
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class SamplingParams:
    # Descriptions in `metadata` are the command line's help too (cluster/flags.py).
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"description": "tokens to generate at most"})
    temperature: float = field(default=1.0, metadata={"description": "0 = greedy"})
    top_k: int = field(default=0, metadata={"description": "sample from the k most likely tokens; 0 = off"})
    top_p: float = field(default=1.0, metadata={"description": "nucleus sampling: the smallest set of tokens "
                                                               "whose probability reaches p"})
    seed: int | None = field(default=None, metadata={"description": "per-request RNG seed (reproducible sampling)"})
    stop: tuple[str, ...] = field(default=(), metadata={"description": "stop string (repeatable)"})
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = field(default=False, metadata={"description": "keep generating past the end-of-sequence "
                                                                     "token"})
    # > 0 also scores the sampled token (0: none)
    logprobs: int = field(default=0, metadata={"description": "top-N logprobs per token"})
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    speculative: bool = field(default=True, metadata={"description": "let the engine draft and verify this "
                                                                     "request's tokens when it speculates (the "
                                                                     "output is the same either way)"})
    # Teacher forcing: output token i is forced_token_ids[i] (still scored by logprobs) while there is one. Evals
    # use it to score given text under decode-time conditions (a compressed cache, eviction). Not on the wire.
    forced_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "forced_token_ids", tuple(self.forced_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be a number >= 0, got {self.temperature!r}")
        if math.isinf(self.temperature):
            raise InvalidRequestError("temperature", "must be finite")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or math.isnan(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", "must be non-negative integers")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.speculative, bool):
            raise InvalidRequestError("speculative", f"must be a boolean, got {self.speculative!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.forced_token_ids):
            raise InvalidRequestError("forced_token_ids", "must be non-negative integers")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
